"""References for the unified page pool ops."""

from __future__ import annotations

from torch import Tensor


def pool_write_reference(pool: Tensor, slots: Tensor, rows: Tensor) -> None:
    pool.index_copy_(0, slots.long(), rows)


def pool_gather_reference(pool: Tensor, slots: Tensor) -> Tensor:
    return pool.index_select(0, slots)
