"""The unified page pool: one preallocated block of device memory shared by LoRA adapter weights
and per-head KV cache entries (S-LoRA's Unified Paging)."""

from .page_pool import PagePool, PoolExhaustedError

__all__ = ["PagePool", "PoolExhaustedError"]
