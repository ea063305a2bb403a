"""fastllm: compiled kernels for efficient LLMs, as PyTorch ops and drop-in modules.

Importing fastllm loads the compiled extension ``fastllm._C``, which registers every op under
``torch.ops.fastllm``. There is no pure-Python fallback: if the extension cannot load, import fails
and says why.
"""

from __future__ import annotations

import torch

from . import _build_info

__version__ = _build_info.VERSION

_REBUILD_HINT = (
    "rebuild it against the torch in this environment: "
    "python -m pip install --no-build-isolation --no-deps --force-reinstall <path to fastllm>"
)


def _check_torch_matches_build() -> None:
    # The C++ ABI of libtorch changes between releases (and between CPU and CUDA builds), so a
    # mismatch would crash or fail with an undefined symbol; refuse early with a useful message.
    if torch.__version__ != _build_info.TORCH_VERSION:
        raise ImportError(
            f"fastllm {__version__} was built against torch {_build_info.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed; {_REBUILD_HINT}"
        )


_check_torch_matches_build()

from . import _C  # noqa: E402  (loads the kernels; must follow the version check)


def build_info() -> dict:
    """What this installation of fastllm was compiled with.

    Returns a dict with ``version``, ``torch`` (the torch version built against), ``cuda``
    (whether CUDA kernels are compiled in), ``cuda_version`` and ``cuda_archs`` (the
    ``TORCH_CUDA_ARCH_LIST`` used; empty strings for a CPU-only build).
    """
    return {
        "version": _build_info.VERSION,
        "torch": _build_info.TORCH_VERSION,
        "cuda": bool(_C.with_cuda),
        "cuda_version": _build_info.CUDA_VERSION,
        "cuda_archs": _build_info.CUDA_ARCHS,
    }


from . import ops  # noqa: E402
from . import memory  # noqa: E402
from . import kv, lora, nn, optim, sparse  # noqa: E402,F401

__all__ = ["build_info", "ops", "memory", "kv", "lora", "nn", "optim", "sparse", "__version__"]
