"""Helpers shared by every capability's op wrappers."""

from __future__ import annotations

from torch import Tensor

from .. import _C


def require_kernels_for(tensor: Tensor, op: str) -> None:
    """Fail clearly, instead of with a dispatcher error, when CUDA kernels were not compiled."""
    if tensor.device.type == "cuda" and not _C.with_cuda:
        raise RuntimeError(
            f"fastllm.{op}: got a CUDA tensor but this fastllm was built without CUDA kernels "
            "(see fastllm.build_info()); rebuild with FASTLLM_CUDA=ON on a machine with nvcc"
        )
