"""Paged multi-adapter LoRA ops: typed wrappers, fake implementations and autograd.

Re-exported by :mod:`fastllm.ops`; the schemas live in ``csrc/registration.cpp`` and the layout is
described in ``csrc/lora/lora_index.h``. In short: adapter rows live anywhere in ``pool`` (a 1-D
page-pool storage); ``a_rows[s, a, j]`` / ``b_rows[s, a, j]`` are the element offsets of row ``j`` of
A / of B^T for output slice ``s`` of the batch's adapter ``a``; ``ranks[s, a]`` says how many rows
are real; ``token_adapter[t]`` is the batch adapter of token ``t`` (``-1``: base model only).

SGMV (tokens grouped by adapter) needs a plan, ``(sgmv_order, sgmv_tiles)`` from
:func:`lora_sgmv_plan`: build it once per batch on the host, where the adapters of the batch are
known, and copy it to the device with the batch. The CUDA kernels never read ``token_adapter``
on the host, so without a plan they run BGMV (the CPU kernels build a plan themselves). The
GPU's tensor-core kernels take the plan's tokens in chunks of up to ``SGMV_MAX_CHUNK`` of one
adapter, ``sgmv_chunks`` from :func:`lora_sgmv_chunks` (built with the plan); without one they
work on the 8-token tiles.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import _C
from .._host import to_device
from ._common import require_kernels_for as _require_kernels_for

__all__ = ["lora_shrink", "lora_expand", "lora_sgmv_plan", "lora_sgmv_chunks", "PATH_AUTO",
           "PATH_BGMV", "PATH_SGMV"]

PATH_AUTO, PATH_BGMV, PATH_SGMV = 0, 1, 2
# Tokens per SGMV tile, and the most per tensor-core chunk (csrc/lora/lora_index.h).
SGMV_TILE = int(_C.lora_tile)
SGMV_MAX_CHUNK = int(_C.lora_max_chunk)
# An H100's / H200's SM count: the chunk rule's default, and what fake CUDA tensors get.
DEFAULT_SMS = 132


def lora_sgmv_plan(token_adapter: Tensor, adapters: int) -> tuple[Tensor, Tensor]:
    """The SGMV work list for a batch: ``(order, tiles)``, int32 CPU tensors.

    ``order`` lists the tokens that have an adapter, grouped by adapter (in token order within an
    adapter); ``tiles[i] = (first, end, adapter)`` covers ``order[first:end]``, at most
    ``SGMV_TILE`` tokens of one adapter. Pass both to :func:`lora_shrink` / :func:`lora_expand`
    (on the op's device). ``token_adapter`` should be a CPU tensor (a CUDA one is copied to the
    host: a synchronisation); values must lie in ``[-1, adapters)``.

    >>> order, tiles = fastllm.ops.lora_sgmv_plan(torch.tensor([1, 0, 1, -1, 1]), adapters=2)
    >>> order.tolist()                   # adapter 0's tokens, then adapter 1's; token 3 has none
    [1, 0, 2, 4]
    >>> tiles.tolist()                   # (first, end, adapter) over order
    [[0, 1, 0], [1, 4, 1]]
    """
    if not isinstance(token_adapter, Tensor) or token_adapter.dim() != 1:
        raise ValueError(f"lora_sgmv_plan: token_adapter must be a 1-D tensor, got "
                         f"{getattr(token_adapter, 'shape', type(token_adapter).__name__)}")
    if token_adapter.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"lora_sgmv_plan: token_adapter must be int32 or int64, got "
                        f"{token_adapter.dtype}")
    if not isinstance(adapters, int) or adapters < 0:
        raise ValueError(f"lora_sgmv_plan: adapters must be an int >= 0, got {adapters!r}")
    ids = token_adapter.to("cpu", torch.int64)
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= adapters):
        raise IndexError(f"lora_sgmv_plan: token_adapter must lie in [-1, {adapters}), got values "
                         f"in [{int(ids.min())}, {int(ids.max())}]")
    order = torch.argsort(ids, stable=True)
    order = order[ids[order] >= 0]
    counts = torch.bincount(ids[ids >= 0], minlength=adapters)
    starts = torch.cumsum(counts, 0) - counts
    per_adapter = (counts + SGMV_TILE - 1) // SGMV_TILE
    adapter = torch.repeat_interleave(torch.arange(adapters), per_adapter)
    first_tile = torch.cumsum(per_adapter, 0) - per_adapter
    within = torch.arange(adapter.numel()) - first_tile[adapter]
    first = starts[adapter] + within * SGMV_TILE
    end = torch.minimum(first + SGMV_TILE, starts[adapter] + counts[adapter])
    tiles = torch.stack([first, end, adapter], 1).to(torch.int32)
    return order.to(torch.int32), tiles.contiguous()


def lora_sgmv_chunks(tiles: Tensor, rows: int | None = None, sms: int | None = None) -> Tensor:
    """The tokens of an SGMV plan in chunks for the GPU's tensor-core kernels: an int32 CPU
    tensor ``[chunks, 3]`` of ``(first, end, adapter)`` over the plan's ``order``, like ``tiles``
    but up to ``rows`` tokens each (consecutive tiles of one adapter merged; each adapter's last
    chunk ragged). Each adapter row the kernels stage then serves up to ``rows`` tokens.

    Args:
        tiles: the plan's tiles from :func:`lora_sgmv_plan` (a CPU tensor).
        rows: 8 to ``SGMV_MAX_CHUNK`` (64), a multiple of 8; default: the largest of 64, 32, 16
            that still gives a GPU of ``sms`` SMs two waves of blocks (csrc/lora/lora_index.h,
            plan_sgmv_chunk_rows; a model, never timed).
        sms: the GPU's SM count for the default ``rows`` (default 132, an H100 / H200).

    Pass the result as ``sgmv_chunks`` to :func:`lora_shrink` / :func:`lora_expand` with the plan
    (on the op's device). Pure host work: nothing here reads device memory.

    >>> ids = torch.tensor([0] * 20 + [1] * 3)
    >>> order, tiles = fastllm.ops.lora_sgmv_plan(ids, adapters=2)
    >>> tiles.tolist()                                   # tiles of at most 8 tokens
    [[0, 8, 0], [8, 16, 0], [16, 20, 0], [20, 23, 1]]
    >>> fastllm.ops.lora_sgmv_chunks(tiles, rows=16).tolist()   # merged into chunks of 16
    [[0, 16, 0], [16, 20, 0], [20, 23, 1]]
    """
    if not isinstance(tiles, Tensor) or tiles.dim() != 2 or tiles.shape[1] != 3:
        raise ValueError(f"lora_sgmv_chunks: tiles must be a [tiles, 3] tensor from "
                         f"lora_sgmv_plan, got "
                         f"{getattr(tiles, 'shape', type(tiles).__name__)}")
    if tiles.dtype != torch.int32 or tiles.device.type != "cpu":
        raise TypeError(f"lora_sgmv_chunks: tiles must be an int32 CPU tensor (the plan before it "
                        f"is copied to the device), got {tiles.dtype} on {tiles.device}")
    if sms is not None and (not isinstance(sms, int) or sms < 1):
        raise ValueError(f"lora_sgmv_chunks: sms must be an int >= 1, got {sms!r}")
    flat = tiles.reshape(-1).tolist()
    if rows is None:
        rows = _C.lora_plan_sgmv_chunk_rows(flat, DEFAULT_SMS if sms is None else sms)
    elif not isinstance(rows, int) or isinstance(rows, bool):
        raise TypeError(f"lora_sgmv_chunks: rows must be an int, got {type(rows).__name__}")
    chunks = _C.lora_sgmv_chunks(flat, rows)  # checks rows
    return torch.tensor(chunks, dtype=torch.int32).reshape(-1, 3)


def sm_count(device: torch.device) -> int:
    """SMs of a CUDA device (a property read, no synchronisation), ``DEFAULT_SMS`` without a GPU
    (fake CUDA tensors in tests)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return DEFAULT_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count


def _plan_for(token_adapter: Tensor, adapters: int, path: int, order, tiles, chunks):
    # The wrappers' convenience for direct callers: a CUDA SGMV call without a plan gets one built
    # here (reading token_adapter: one synchronisation). Batched code passes its own plan.
    if order is not None or tiles is not None or path != PATH_SGMV \
            or token_adapter.device.type != "cuda":
        return order, tiles, chunks
    order, tiles = lora_sgmv_plan(token_adapter, adapters)
    chunks = lora_sgmv_chunks(tiles, sms=sm_count(token_adapter.device))
    device = token_adapter.device
    return to_device(order, device), to_device(tiles, device), to_device(chunks, device)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lora_shrink(x: Tensor, pool: Tensor, a_rows: Tensor, ranks: Tensor, token_adapter: Tensor,
                path: int = PATH_AUTO, sgmv_order: Tensor | None = None,
                sgmv_tiles: Tensor | None = None, sgmv_chunks: Tensor | None = None) -> Tensor:
    """``h[s, t, j] = x[t] . A[s, a_t, j]`` for ``j < ranks[s, a_t]``, else 0.

    Args:
        x: ``[tokens, in]`` contiguous, float32/float16/bfloat16 (float64 for gradient checks).
        pool: 1-D contiguous page-pool storage, ``x``'s dtype and device.
        a_rows: ``[slices, adapters, max_rank]`` int64 element offsets of A's rows in ``pool``.
        ranks: ``[slices, adapters]`` int32, each in ``[0, max_rank]``.
        token_adapter: ``[tokens]`` int32/int64 in ``[-1, adapters)``.
        path: ``PATH_AUTO`` (choose: on CPU by tokens per adapter; on CUDA SGMV only with a plan
            whose tiles keep the GPU busy for less traffic), ``PATH_BGMV`` (per token, for decode)
            or ``PATH_SGMV`` (tokens grouped by adapter in tiles, for prefill).
        sgmv_order, sgmv_tiles: the plan from :func:`lora_sgmv_plan` on ``x``'s device, or None.
            A CUDA ``PATH_SGMV`` call without one builds it here, reading ``token_adapter``
            (one synchronisation).
        sgmv_chunks: the plan's chunks from :func:`lora_sgmv_chunks` on ``x``'s device, or None
            (the tensor-core kernels then take the tiles as chunks). Only with a plan; the CPU
            checks it and keeps its tiles.

    Index values are checked on the host for CPU tensors; on CUDA the kernels guard them and
    report through :func:`fastllm.ops.raise_index_errors` (see :mod:`fastllm._ops.index_checks`).

    Returns ``h`` of shape ``[slices, tokens, max_rank]`` in float32 (float64 for float64 ``x``):
    the intermediate stays fp32 whatever the input dtype. Differentiable in ``x`` and ``pool``.

    One adapter of rank 2 on a 4 -> 3 linear, its rows anywhere in a pool (here back to back:
    A's two rows of 4 elements at offsets 0 and 4, then B^T's two rows of 3 at 8 and 11):

    >>> _ = torch.manual_seed(0)
    >>> a, b = torch.randn(2, 4), torch.randn(3, 2)
    >>> pool = torch.cat([a.reshape(-1), b.T.reshape(-1)])
    >>> a_rows = torch.tensor([[[0, 4]]])                # [slices, adapters, max_rank]
    >>> b_rows = torch.tensor([[[8, 11]]])
    >>> ranks = torch.tensor([[2]], dtype=torch.int32)
    >>> x = torch.randn(3, 4)
    >>> token_adapter = torch.tensor([0, -1, 0])        # token 1 runs the base model only
    >>> h = fastllm.ops.lora_shrink(x, pool, a_rows, ranks, token_adapter)
    >>> h.shape, torch.allclose(h[0, 0], a @ x[0]), h[0, 1].tolist()
    (torch.Size([1, 3, 2]), True, [0.0, 0.0])
    """
    _require_kernels_for(x, "lora_shrink")
    sgmv_order, sgmv_tiles, sgmv_chunks = _plan_for(token_adapter, a_rows.shape[1], path,
                                                    sgmv_order, sgmv_tiles, sgmv_chunks)
    return torch.ops.fastllm.lora_shrink.default(x, pool, a_rows, ranks, token_adapter, path,
                                                 sgmv_order, sgmv_tiles, sgmv_chunks)


def lora_expand(y: Tensor, h: Tensor, pool: Tensor, b_rows: Tensor, ranks: Tensor,
                scalings: Tensor, token_adapter: Tensor, slice_sizes: Sequence[int],
                path: int = PATH_AUTO, sgmv_order: Tensor | None = None,
                sgmv_tiles: Tensor | None = None, sgmv_chunks: Tensor | None = None) -> Tensor:
    """Add ``scalings[s, a_t] * h[s, t, :r] @ B^T[s, a_t, :r]`` into slice ``s`` of ``y[t]``, in place.

    Args:
        y: ``[tokens, sum(slice_sizes)]`` contiguous base-layer output; slices side by side (for a
            fused qkv or gate/up projection). Rows of tokens without an adapter are not touched.
        h: ``[slices, tokens, max_rank]`` from :func:`lora_shrink` (float32; float64 for float64).
        pool, b_rows, ranks, token_adapter, path, sgmv_order, sgmv_tiles, sgmv_chunks: as for
            :func:`lora_shrink`; ``b_rows`` holds offsets of B^T's rows (``slice_sizes[s]``
            elements each). At most 16 slices.
        scalings: ``[slices, adapters]`` float32, the adapter's ``alpha / r`` (or rsLoRA's).

    Returns ``y``. Differentiable in ``y``, ``h`` and ``pool`` (autograd records it as an in-place
    update of ``y``).

    Continuing :func:`lora_shrink`'s example (scaling 0.5):

    >>> _ = torch.manual_seed(0)
    >>> a, b = torch.randn(2, 4), torch.randn(3, 2)
    >>> pool = torch.cat([a.reshape(-1), b.T.reshape(-1)])
    >>> a_rows, b_rows = torch.tensor([[[0, 4]]]), torch.tensor([[[8, 11]]])
    >>> ranks, scalings = torch.tensor([[2]], dtype=torch.int32), torch.tensor([[0.5]])
    >>> x, token_adapter = torch.randn(3, 4), torch.tensor([0, -1, 0])
    >>> h = fastllm.ops.lora_shrink(x, pool, a_rows, ranks, token_adapter)
    >>> y = torch.zeros(3, 3)                            # the base layer's output
    >>> _ = fastllm.ops.lora_expand(y, h, pool, b_rows, ranks, scalings, token_adapter, [3])
    >>> torch.allclose(y[0], 0.5 * b @ a @ x[0], atol=1e-6), y[1].tolist()
    (True, [0.0, 0.0, 0.0])
    """
    _require_kernels_for(y, "lora_expand")
    sizes = [int(size) for size in slice_sizes]
    sgmv_order, sgmv_tiles, sgmv_chunks = _plan_for(token_adapter, b_rows.shape[1], path,
                                                    sgmv_order, sgmv_tiles, sgmv_chunks)
    if torch.is_grad_enabled() and (y.requires_grad or h.requires_grad or pool.requires_grad):
        return _ExpandInPlace.apply(y, h, pool, b_rows, ranks, scalings, token_adapter, sizes, path,
                                    sgmv_order, sgmv_tiles, sgmv_chunks)
    torch.ops.fastllm.lora_expand.default(y, h, pool, b_rows, ranks, scalings, token_adapter, sizes,
                                          path, sgmv_order, sgmv_tiles, sgmv_chunks)
    return y


# ---- fakes ---------------------------------------------------------------------------------------

@torch.library.register_fake("fastllm::lora_shrink")
def _lora_shrink_fake(x, pool, a_rows, ranks, token_adapter, path=0, sgmv_order=None,
                      sgmv_tiles=None, sgmv_chunks=None):
    return x.new_empty((a_rows.shape[0], x.shape[0], a_rows.shape[2]),
                       dtype=_accumulate_dtype(x.dtype))


@torch.library.register_fake("fastllm::lora_expand")
def _lora_expand_fake(y, h, pool, b_rows, ranks, scalings, token_adapter, slice_sizes, path=0,
                      sgmv_order=None, sgmv_tiles=None, sgmv_chunks=None):
    return None


# ---- autograd ------------------------------------------------------------------------------------

def _add_row_grads(grad_pool: Tensor, rows: Tensor, ranks: Tensor, token_adapter: Tensor,
                   coeff: Tensor, data: Tensor) -> None:
    """grad_pool[rows[a, j] + k] += sum over tokens t of adapter a of coeff[t, j] * data[t, k].

    rows: [adapters, R] offsets of one slice; coeff: [tokens, R]; data: [tokens, width]. Written
    without data-dependent shapes (one-hot tokens, masked rows) so that it traces under
    torch.compile.
    """
    adapters, max_rank = rows.shape
    dtype = grad_pool.dtype
    one_hot = (token_adapter.unsqueeze(1) == torch.arange(adapters, device=rows.device)).to(dtype)
    block = torch.einsum("tu,tr,tw->urw", one_hot, coeff.to(dtype), data.to(dtype))
    real = torch.arange(max_rank, device=rows.device) < ranks.unsqueeze(1)  # [adapters, R]
    # A row outside the pool contributes nothing (the forward kernels skip it too), so an
    # index_add_ never sees it: on CUDA the values are not checked on the host.
    real &= (rows >= 0) & (rows <= grad_pool.numel() - data.shape[1])
    index = rows.unsqueeze(-1) + torch.arange(data.shape[1], device=rows.device)
    # Rows past an adapter's rank may hold any offset: send their (zero) sums to element 0.
    index = torch.where(real.unsqueeze(-1), index, torch.zeros_like(index))
    block = block * real.unsqueeze(-1).to(dtype)
    grad_pool.index_add_(0, index.reshape(-1), block.reshape(-1))


def _shrink_setup_context(ctx, inputs, output) -> None:
    x, pool, a_rows, ranks, token_adapter, path, sgmv_order, sgmv_tiles, sgmv_chunks = inputs
    ctx.save_for_backward(x, pool, a_rows, ranks, token_adapter)
    ctx.path, ctx.plan = path, (sgmv_order, sgmv_tiles, sgmv_chunks)


def _shrink_backward(ctx, grad_h: Tensor):
    x, pool, a_rows, ranks, token_adapter = ctx.saved_tensors
    slices, adapters, _ = a_rows.shape
    grad_h = grad_h.contiguous()
    grad_x = grad_pool = None
    if ctx.needs_input_grad[0]:
        # dL/dx[t] = sum_s sum_j grad_h[s, t, j] A[s, a_t, j]: an expand with A's rows and scale 1.
        wide = x.new_zeros(x.shape[0], slices * x.shape[1])
        ones = torch.ones(slices, adapters, dtype=torch.float32, device=x.device)
        torch.ops.fastllm.lora_expand.default(wide, grad_h, pool, a_rows, ranks, ones,
                                              token_adapter, [x.shape[1]] * slices, ctx.path,
                                              *ctx.plan)
        grad_x = wide.view(x.shape[0], slices, x.shape[1]).sum(1)
    if ctx.needs_input_grad[1]:
        grad_pool = torch.zeros_like(pool)
        for s in range(slices):
            _add_row_grads(grad_pool, a_rows[s], ranks[s], token_adapter, grad_h[s], x)
    return grad_x, grad_pool, None, None, None, None, None, None, None


torch.library.register_autograd("fastllm::lora_shrink", _shrink_backward,
                                setup_context=_shrink_setup_context)


class _ExpandInPlace(torch.autograd.Function):
    # torch.library.register_autograd does not accept ops that mutate an input, so the in-place
    # expand gets its backward from a Function that marks y dirty.

    @staticmethod
    def forward(ctx, y, h, pool, b_rows, ranks, scalings, token_adapter, slice_sizes, path,
                sgmv_order, sgmv_tiles, sgmv_chunks):
        torch.ops.fastllm.lora_expand.default(y, h, pool, b_rows, ranks, scalings, token_adapter,
                                              slice_sizes, path, sgmv_order, sgmv_tiles,
                                              sgmv_chunks)
        ctx.mark_dirty(y)
        ctx.save_for_backward(h, pool, b_rows, ranks, scalings, token_adapter)
        ctx.slice_sizes, ctx.path = slice_sizes, path
        ctx.plan = (sgmv_order, sgmv_tiles, sgmv_chunks)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        h, pool, b_rows, ranks, scalings, token_adapter = ctx.saved_tensors
        grad_h = grad_pool = None
        grad_y = grad_y.contiguous()
        # Per-token scaling (0 for tokens without an adapter), one column per slice.
        adapters = scalings.shape[1]
        valid = (token_adapter >= 0) & (token_adapter < adapters)
        safe = token_adapter.clamp(0, max(adapters - 1, 0)).long()
        if adapters == 0:
            token_scale = scalings.new_zeros(scalings.shape[0], token_adapter.shape[0])
        else:
            token_scale = torch.where(valid.unsqueeze(0), scalings[:, safe],
                                      torch.zeros((), dtype=scalings.dtype,
                                                  device=scalings.device))
        begin = 0
        if ctx.needs_input_grad[1]:
            grad_h = torch.zeros_like(h)
        if ctx.needs_input_grad[2]:
            grad_pool = torch.zeros_like(pool)
        for s, size in enumerate(ctx.slice_sizes):
            g = grad_y[:, begin:begin + size].contiguous()
            scale = token_scale[s].to(h.dtype).unsqueeze(1)
            if grad_h is not None:
                # dL/dh[s, t, j] = scale_t * g[t] . B^T[s, a_t, j]: a shrink over B's rows.
                grad_h[s] = torch.ops.fastllm.lora_shrink.default(
                    g, pool, b_rows[s:s + 1].contiguous(), ranks[s:s + 1].contiguous(),
                    token_adapter, ctx.path, *ctx.plan)[0] * scale
            if grad_pool is not None:
                _add_row_grads(grad_pool, b_rows[s], ranks[s], token_adapter, h[s] * scale, g)
            begin += size
        return grad_y, grad_h, grad_pool, None, None, None, None, None, None, None, None, None
