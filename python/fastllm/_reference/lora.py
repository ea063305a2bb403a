"""Reference for the paged LoRA ops: a plain loop over the batch's adapters (PEFT's strategy), each
adapter's rows gathered out of the pool with ordinary indexing, sums in float64."""

from __future__ import annotations

import torch
from torch import Tensor


def _rows(pool: Tensor, offsets: Tensor, width: int) -> Tensor:
    index = offsets.long().reshape(-1, 1) + torch.arange(width, device=pool.device)
    return pool[index]


def lora_shrink_reference(x: Tensor, pool: Tensor, a_rows: Tensor, ranks: Tensor,
                          token_adapter: Tensor) -> Tensor:
    slices, adapters, max_rank = a_rows.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = torch.zeros(slices, x.shape[0], max_rank, dtype=torch.float64, device=x.device)
    for s in range(slices):
        for a in range(adapters):
            tokens = (token_adapter == a).nonzero().flatten()
            r = int(ranks[s, a])
            if tokens.numel() == 0 or r == 0:
                continue
            weight = _rows(pool, a_rows[s, a, :r], x.shape[1]).double()  # [r, in]
            h[s, tokens, :r] = x[tokens].double() @ weight.T
    return h.to(acc)


def lora_expand_reference(y: Tensor, h: Tensor, pool: Tensor, b_rows: Tensor, ranks: Tensor,
                          scalings: Tensor, token_adapter: Tensor, slice_sizes: list[int]) -> Tensor:
    """Returns the new y (does not modify its argument)."""
    out = y.double().clone()
    slices, adapters, _ = b_rows.shape
    begin = 0
    for s in range(slices):
        size = slice_sizes[s]
        for a in range(adapters):
            tokens = (token_adapter == a).nonzero().flatten()
            r = int(ranks[s, a])
            if tokens.numel() == 0 or r == 0:
                continue
            weight = _rows(pool, b_rows[s, a, :r], size).double()  # [r, out]
            out[tokens, begin:begin + size] += float(scalings[s, a]) * (
                h[s, tokens, :r].double() @ weight)
        begin += size
    return out.to(y.dtype)
