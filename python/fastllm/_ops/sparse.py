"""The sparse MLP op: typed wrapper and fake implementation.

Re-exported by :mod:`fastllm.ops`; the schema lives in ``csrc/registration.cpp``. No autograd:
the op serves inference (decode); training goes through the dense MLP.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import require_kernels_for as _require_kernels_for

__all__ = ["sparse_mlp"]


def sparse_mlp(x: Tensor, w_up: Tensor, w_down_t: Tensor, active_idx: Tensor, *,
               w_gate: Tensor | None = None, b_up: Tensor | None = None,
               b_gate: Tensor | None = None, b_down: Tensor | None = None,
               counts: Tensor | None = None, activation: str = "silu",
               deterministic: bool = False) -> Tensor:
    """MLP output reading only the active neurons' weights.

    ``h_j = act(x . w_gate[j] + b_gate[j]) * (x . w_up[j] + b_up[j])`` with a gate, else
    ``act(x . w_up[j] + b_up[j])``; ``out = b_down + sum_j h_j * w_down_t[j]`` over the active j.

    Args:
        x: ``[..., d_in]`` float32, float16 or bfloat16 (accumulation is fp32).
        w_up, w_gate: ``[n, d_in]`` as stored by ``nn.Linear`` (one neuron per row).
        w_down_t: ``[n, d_out]``, the down projection's weight transposed and contiguous.
        active_idx: int32/int64. 1-D ``[k]``: one set shared by every row of ``x``; 2-D
            ``[rows, k]``: a set per row of the flattened ``x`` (the first ``counts[r]`` entries
            when ``counts`` is given; the padding after them is never read).
        counts: ``[rows]`` with ``active_idx``'s dtype, only with a 2-D ``active_idx``.
        activation: ``"relu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"silu"``.
        deterministic: on CUDA, sum partial results in a fixed order instead of with atomics
            (CPU is always deterministic).

    An empty set gives ``b_down`` (or zeros). Indices outside ``[0, n)`` raise IndexError.
    """
    _require_kernels_for(x, "sparse_mlp")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    out = torch.ops.fastllm.sparse_mlp.default(
        x2.contiguous(), w_up, w_gate, w_down_t, b_up, b_gate, b_down, active_idx, counts,
        activation, deterministic)
    return out.reshape(*lead, w_down_t.shape[1])


@torch.library.register_fake("fastllm::sparse_mlp")
def _sparse_mlp_fake(x, w_up, w_gate, w_down_t, b_up, b_gate, b_down, active_idx, counts,
                     activation, deterministic=False):
    torch._check(x.dim() == 2, lambda: "fastllm.sparse_mlp: x must be 2-D")
    torch._check(w_down_t.dim() == 2, lambda: "fastllm.sparse_mlp: w_down_t must be 2-D")
    return x.new_empty((x.shape[0], w_down_t.shape[1]))
