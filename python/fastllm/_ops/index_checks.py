"""How fastllm checks index values (slots, page tables, adapter ids, neuron sets).

CPU tensors are checked on the host before any kernel writes, always. For CUDA tensors a host check
would read device memory and synchronise the stream at every call (and make CUDA-graph capture
impossible), so by default only shapes, dtypes and devices are checked on the host; the kernels
bounds-guard every index (an index out of range is skipped, never dereferenced) and set a bit in a
per-device error word. Read it where you already synchronise (end of a generate, a logging step)::

    out = model.generate(...)
    fastllm.ops.raise_index_errors()        # IndexError naming the op and argument, if any

To get the error at the offending call instead (one synchronisation per check), set
``FASTLLM_CHECK_INDICES=1`` or use ``with fastllm.ops.checked_indices(): ...``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .. import _C

__all__ = ["index_error_word", "raise_index_errors", "checked_indices"]


def index_error_word(device: torch.device | str | None = None) -> Tensor:
    """The device's error word: an int32 ``[1]`` CUDA tensor, non-zero once a kernel has met an
    index out of range. Returned without reading it (no synchronisation). ``device`` defaults to
    the current CUDA device.

    >>> fastllm.ops.index_error_word("cpu")           # CPU indices raise at the call instead
    Traceback (most recent call last):
    ValueError: index_error_word: device must be a CUDA device ...
    """
    device = torch.device("cuda", torch.cuda.current_device()) if device is None \
        else torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"index_error_word: device must be a CUDA device (CPU indices are checked "
                         f"at each call), got {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return torch.ops.fastllm.index_error_word.default(device)


def raise_index_errors(device: torch.device | str | None = None) -> None:
    """Raise ``IndexError`` if a fastllm kernel on ``device`` met an index out of range since the
    last call, naming each (op, argument), and clear the word. Synchronises with the device: call
    it where you would anyway. Does nothing on a machine without CUDA.

    >>> out = fastllm.ops.pool_gather(torch.zeros(4, 2), torch.tensor([0, 3]))  # a decode loop
    >>> fastllm.ops.raise_index_errors()              # nothing was out of range
    """
    if not (_C.with_cuda and torch.cuda.is_available()):
        return
    word = index_error_word(device)
    # Every stream's kernels (prefetch runs on a side stream) must have finished writing it.
    torch.cuda.synchronize(word.device)
    bits = int(word.item())
    if bits:
        word.zero_()
        raise IndexError(f"fastllm kernels skipped out-of-range indices: "
                         f"{_C.describe_index_errors(bits & 0xFFFFFFFF)}")


@contextlib.contextmanager
def checked_indices(enabled: bool = True):
    """Check CUDA index values on the host at every call inside the block (the debug mode that
    ``FASTLLM_CHECK_INDICES=1`` turns on for the whole process). Each check synchronises.

    On CPU the check always runs; inside the block CUDA calls raise the same way:

    >>> with fastllm.ops.checked_indices():
    ...     fastllm.ops.pool_gather(torch.zeros(4, 2), torch.tensor([4]))
    Traceback (most recent call last):
    IndexError: ...
    """
    previous = _C.index_debug_mode()
    _C.set_index_debug_mode(enabled)
    try:
        yield
    finally:
        _C.set_index_debug_mode(previous)
