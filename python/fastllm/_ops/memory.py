"""The unified page pool's ops: typed wrappers, fake implementations and autograd.

Re-exported by :mod:`fastllm.ops`; the schemas live in ``csrc/registration.cpp``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import require_kernels_for as _require_kernels_for

__all__ = ["pool_write", "pool_gather"]


def pool_write(pool: Tensor, slots: Tensor, rows: Tensor) -> None:
    """Write ``rows[i]`` into ``pool[slots[i]]`` in place.

    Args:
        pool: ``[num_slots, width]`` contiguous float tensor, a row view of a page pool.
        slots: ``[n]`` int32 or int64 slot indices in ``[0, num_slots)``. Duplicate slots leave
            the slot holding one of the written rows, unspecified which (as ``index_copy_``).
        rows: ``[n, width]`` contiguous, same dtype and device as ``pool``.

    Bad arguments raise before anything is written, so a rejected call leaves ``pool`` unchanged.
    On CUDA, slot *values* are checked only in the debug mode (:func:`fastllm.ops.checked_indices`);
    otherwise the kernel skips an out-of-range slot's row and reports it through
    :func:`fastllm.ops.raise_index_errors`, with no host synchronisation.

    >>> pool = torch.zeros(4, 3)                      # 4 slots of width 3
    >>> fastllm.ops.pool_write(pool, torch.tensor([2, 0]), torch.ones(2, 3))
    >>> pool.sum(1)
    tensor([3., 0., 3., 0.])
    """
    _require_kernels_for(pool, "pool_write")
    torch.ops.fastllm.pool_write.default(pool, slots, rows)


def pool_gather(pool: Tensor, slots: Tensor) -> Tensor:
    """Return ``pool[slots]``: a new ``[n, width]`` tensor of the rows held in the given slots.

    Args:
        pool: ``[num_slots, width]`` contiguous float tensor, a row view of a page pool.
        slots: ``[n]`` int32 or int64 slot indices in ``[0, num_slots)``; repeats allowed. On
            CUDA an out-of-range slot gives a row of zeros and is reported through
            :func:`fastllm.ops.raise_index_errors` (no host synchronisation).

    Differentiable with respect to ``pool``.

    >>> pool = torch.arange(8.0).view(4, 2).requires_grad_()
    >>> rows = fastllm.ops.pool_gather(pool, torch.tensor([3, 1, 3]))
    >>> rows
    tensor([[6., 7.],
            [2., 3.],
            [6., 7.]], grad_fn=<...>)
    >>> rows.sum().backward()
    >>> pool.grad[:, 0]                               # slot 3 was read twice
    tensor([0., 1., 0., 2.])
    """
    _require_kernels_for(pool, "pool_gather")
    return torch.ops.fastllm.pool_gather.default(pool, slots)


@torch.library.register_fake("fastllm::pool_write")
def _pool_write_fake(pool: Tensor, slots: Tensor, rows: Tensor) -> None:
    return None


@torch.library.register_fake("fastllm::pool_gather")
def _pool_gather_fake(pool: Tensor, slots: Tensor) -> Tensor:
    return pool.new_empty((slots.shape[0], pool.shape[1]))


def _pool_gather_setup_context(ctx, inputs, output) -> None:
    pool, slots = inputs
    ctx.save_for_backward(slots)
    ctx.pool_shape = pool.shape


def _pool_gather_backward(ctx, grad_out: Tensor):
    (slots,) = ctx.saved_tensors
    # Repeated slots must accumulate, so this is an index_add rather than a pool_write.
    grad_pool = grad_out.new_zeros(ctx.pool_shape).index_add_(0, slots, grad_out)
    return grad_pool, None


torch.library.register_autograd(
    "fastllm::pool_gather", _pool_gather_backward, setup_context=_pool_gather_setup_context
)
