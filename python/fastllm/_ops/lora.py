"""Paged multi-adapter LoRA ops: typed wrappers, fake implementations and autograd.

Re-exported by :mod:`fastllm.ops`; the schemas live in ``csrc/registration.cpp`` and the layout is
described in ``csrc/lora/lora_index.h``. In short: adapter rows live anywhere in ``pool`` (a 1-D
page-pool storage); ``a_rows[s, a, j]`` / ``b_rows[s, a, j]`` are the element offsets of row ``j`` of
A / of B^T for output slice ``s`` of the batch's adapter ``a``; ``ranks[s, a]`` says how many rows
are real; ``token_adapter[t]`` is the batch adapter of token ``t`` (``-1``: base model only).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ._common import require_kernels_for as _require_kernels_for

__all__ = ["lora_shrink", "lora_expand", "PATH_AUTO", "PATH_BGMV", "PATH_SGMV"]

PATH_AUTO, PATH_BGMV, PATH_SGMV = 0, 1, 2


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lora_shrink(x: Tensor, pool: Tensor, a_rows: Tensor, ranks: Tensor, token_adapter: Tensor,
                path: int = PATH_AUTO) -> Tensor:
    """``h[s, t, j] = x[t] . A[s, a_t, j]`` for ``j < ranks[s, a_t]``, else 0.

    Args:
        x: ``[tokens, in]`` contiguous, float32/float16/bfloat16 (float64 for gradient checks).
        pool: 1-D contiguous page-pool storage, ``x``'s dtype and device.
        a_rows: ``[slices, adapters, max_rank]`` int64 element offsets of A's rows in ``pool``.
        ranks: ``[slices, adapters]`` int32, each in ``[0, max_rank]``.
        token_adapter: ``[tokens]`` int32/int64 in ``[-1, adapters)``.
        path: ``PATH_AUTO`` (choose by tokens per adapter), ``PATH_BGMV`` (per token, for decode)
            or ``PATH_SGMV`` (tokens grouped by adapter in tiles, for prefill).

    Returns ``h`` of shape ``[slices, tokens, max_rank]`` in float32 (float64 for float64 ``x``):
    the intermediate stays fp32 whatever the input dtype. Differentiable in ``x`` and ``pool``.
    """
    _require_kernels_for(x, "lora_shrink")
    return torch.ops.fastllm.lora_shrink.default(x, pool, a_rows, ranks, token_adapter, path)


def lora_expand(y: Tensor, h: Tensor, pool: Tensor, b_rows: Tensor, ranks: Tensor,
                scalings: Tensor, token_adapter: Tensor, slice_sizes: Sequence[int],
                path: int = PATH_AUTO) -> Tensor:
    """Add ``scalings[s, a_t] * h[s, t, :r] @ B^T[s, a_t, :r]`` into slice ``s`` of ``y[t]``, in place.

    Args:
        y: ``[tokens, sum(slice_sizes)]`` contiguous base-layer output; slices side by side (for a
            fused qkv or gate/up projection). Rows of tokens without an adapter are not touched.
        h: ``[slices, tokens, max_rank]`` from :func:`lora_shrink` (float32; float64 for float64).
        pool, b_rows, ranks, token_adapter, path: as for :func:`lora_shrink`; ``b_rows`` holds
            offsets of B^T's rows (``slice_sizes[s]`` elements each).
        scalings: ``[slices, adapters]`` float32, the adapter's ``alpha / r`` (or rsLoRA's).

    Returns ``y``. Differentiable in ``y``, ``h`` and ``pool`` (autograd records it as an in-place
    update of ``y``).
    """
    _require_kernels_for(y, "lora_expand")
    sizes = [int(size) for size in slice_sizes]
    if torch.is_grad_enabled() and (y.requires_grad or h.requires_grad or pool.requires_grad):
        return _ExpandInPlace.apply(y, h, pool, b_rows, ranks, scalings, token_adapter, sizes, path)
    torch.ops.fastllm.lora_expand.default(y, h, pool, b_rows, ranks, scalings, token_adapter, sizes,
                                          path)
    return y


# ---- fakes ---------------------------------------------------------------------------------------

@torch.library.register_fake("fastllm::lora_shrink")
def _lora_shrink_fake(x, pool, a_rows, ranks, token_adapter, path=0):
    return x.new_empty((a_rows.shape[0], x.shape[0], a_rows.shape[2]),
                       dtype=_accumulate_dtype(x.dtype))


@torch.library.register_fake("fastllm::lora_expand")
def _lora_expand_fake(y, h, pool, b_rows, ranks, scalings, token_adapter, slice_sizes, path=0):
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
    index = rows.unsqueeze(-1) + torch.arange(data.shape[1], device=rows.device)
    # Rows past an adapter's rank may hold any offset: send their (zero) sums to element 0.
    index = torch.where(real.unsqueeze(-1), index, torch.zeros_like(index))
    block = block * real.unsqueeze(-1).to(dtype)
    grad_pool.index_add_(0, index.reshape(-1), block.reshape(-1))


def _shrink_setup_context(ctx, inputs, output) -> None:
    x, pool, a_rows, ranks, token_adapter, path = inputs
    ctx.save_for_backward(x, pool, a_rows, ranks, token_adapter)
    ctx.path = path


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
                                              token_adapter, [x.shape[1]] * slices, ctx.path)
        grad_x = wide.view(x.shape[0], slices, x.shape[1]).sum(1)
    if ctx.needs_input_grad[1]:
        grad_pool = torch.zeros_like(pool)
        for s in range(slices):
            _add_row_grads(grad_pool, a_rows[s], ranks[s], token_adapter, grad_h[s], x)
    return grad_x, grad_pool, None, None, None, None


torch.library.register_autograd("fastllm::lora_shrink", _shrink_backward,
                                setup_context=_shrink_setup_context)


class _ExpandInPlace(torch.autograd.Function):
    # torch.library.register_autograd does not accept ops that mutate an input, so the in-place
    # expand gets its backward from a Function that marks y dirty.

    @staticmethod
    def forward(ctx, y, h, pool, b_rows, ranks, scalings, token_adapter, slice_sizes, path):
        torch.ops.fastllm.lora_expand.default(y, h, pool, b_rows, ranks, scalings, token_adapter,
                                              slice_sizes, path)
        ctx.mark_dirty(y)
        ctx.save_for_backward(h, pool, b_rows, ranks, scalings, token_adapter)
        ctx.slice_sizes, ctx.path = slice_sizes, path
        return y

    @staticmethod
    def backward(ctx, grad_y):
        h, pool, b_rows, ranks, scalings, token_adapter = ctx.saved_tensors
        grad_h = grad_pool = None
        grad_y = grad_y.contiguous()
        # Per-token scaling (0 for tokens without an adapter), one column per slice.
        valid = token_adapter >= 0
        safe = token_adapter.clamp(min=0).long()
        token_scale = torch.where(valid.unsqueeze(0), scalings[:, safe],
                                  torch.zeros((), dtype=scalings.dtype, device=scalings.device))
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
                    token_adapter, ctx.path)[0] * scale
            if grad_pool is not None:
                _add_row_grads(grad_pool, b_rows[s], ranks[s], token_adapter, h[s] * scale, g)
            begin += size
        return grad_y, grad_h, grad_pool, None, None, None, None, None, None
