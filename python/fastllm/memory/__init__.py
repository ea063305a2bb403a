"""The unified page pool: one preallocated block of device memory shared by LoRA adapter weights
and per-head KV cache entries (S-LoRA's Unified Paging)."""

from .page_pool import AllocationFault, InjectedFault, PagePool, PoolExhaustedError, Reclaimer, \
    unified_page_size

__all__ = ["AllocationFault", "InjectedFault", "PagePool", "PoolExhaustedError", "Reclaimer",
           "unified_page_size"]
