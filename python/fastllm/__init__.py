"""fastllm: compiled kernels for efficient LLMs, as PyTorch ops and drop-in modules.

Importing fastllm loads the compiled extension ``fastllm._C``, which registers every op under
``torch.ops.fastllm``. There is no pure-Python fallback: if the extension cannot load, import fails
and says why.

fastllm needs only torch and numpy. ``fastllm.kv`` (a transformers Cache) needs transformers, from
the ``hf`` extra (``pip install 'fastllm[hf]'``); it is imported on first use, so ``import
fastllm`` stays fast and works without it.
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

    >>> info = fastllm.build_info()
    >>> info["version"] == fastllm.__version__, info["torch"] == torch.__version__
    (True, True)
    >>> sorted(info)
    ['cuda', 'cuda_archs', 'cuda_version', 'torch', 'version']
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
from . import lora, nn, optim, sparse  # noqa: E402,F401

# Imported on first use (PEP 562): fastllm.kv needs transformers, which fastllm does not depend on
# (the ``hf`` extra installs it), and importing it takes seconds.
_LAZY_SUBMODULES = ("kv",)


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["build_info", "ops", "memory", "kv", "lora", "nn", "optim", "sparse", "__version__"]
