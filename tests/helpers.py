"""Assertions and input makers used across the test suite."""

from __future__ import annotations

import torch

# (rtol, atol) per dtype, for results compared against a float64/float32 reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None):
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol)


def poison(tensor: torch.Tensor) -> torch.Tensor:
    """Fill a tensor with NaN (or -1 for integers), so an element a kernel forgot to write shows."""
    return tensor.fill_(float("nan") if tensor.dtype.is_floating_point else -1)


def random_tensor(*shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Normal random values, never all zeros: a kernel that writes nothing cannot pass."""
    return torch.randn(*shape, dtype=torch.float32, device=device).to(dtype)


def value_checks(device):
    """Where index *values* are checked at the call: always on the CPU; on CUDA only in the debug
    mode (otherwise the kernels skip bad indices and report them through the error word), so
    rejection tests of values turn it on for CUDA."""
    import contextlib

    import fastllm.ops as ops
    return ops.checked_indices() if torch.device(device).type == "cuda" else contextlib.nullcontext()


def cache_arg(cache) -> dict:
    """``{keyword: cache}`` for a transformers Llama call: ``cache=`` on the transformers releases
    that renamed ``past_key_values`` (which still works there but warns on every call)."""
    import types

    from transformers import LlamaForCausalLM

    from fastllm.kv import cache_keyword

    return {cache_keyword(types.SimpleNamespace(forward=LlamaForCausalLM.forward)): cache}
