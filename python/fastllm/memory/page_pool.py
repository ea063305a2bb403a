"""A pool of fixed-size pages in one preallocated tensor.

Every page holds ``page_size`` elements. A user of the pool picks a row width that divides the page
size (an adapter row of ``hidden`` elements, a KV head entry of ``head_dim`` elements) and sees the
pool as rows of that width: the pages it owns are runs of ``page_size // width`` consecutive slots.
Because LoRA weights and KV entries draw pages from the same free list, memory moves between them as
load changes instead of being split by a fixed budget.

Bookkeeping (free list, owners) lives on the host as small int tensors; only the storage is on the
device. Allocation and release are O(pages requested). The pool is not thread-safe.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from .._ops import memory as ops

_POOL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_NO_OWNER = -1


class PoolExhaustedError(RuntimeError):
    """Raised when an allocation asks for more pages than are free. Nothing is allocated."""


class PagePool:
    """One device buffer of ``num_pages`` pages of ``page_size`` elements each.

    Args:
        num_pages: number of pages (> 0).
        page_size: elements per page (> 0).
        dtype: float32, float16, bfloat16 (or float64, for gradient checks).
        device: where the storage lives (default: the current default device).

    ``alloc(n, owner)`` hands out page ids (an int64 CPU tensor); ``free(ids)`` takes them back.
    ``rows(width)``, ``slots(...)``, ``write(...)`` and ``gather(...)`` move data in and out.
    """

    def __init__(self, num_pages: int, page_size: int, dtype: torch.dtype = torch.float16,
                 device: torch.device | str | None = None) -> None:
        if not isinstance(num_pages, int) or num_pages <= 0:
            raise ValueError(f"PagePool: num_pages must be a positive int, got {num_pages!r}")
        if not isinstance(page_size, int) or page_size <= 0:
            raise ValueError(f"PagePool: page_size must be a positive int, got {page_size!r}")
        if dtype not in _POOL_DTYPES:
            raise TypeError(f"PagePool: dtype must be one of {_POOL_DTYPES}, got {dtype}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.dtype = dtype
        self.storage = torch.empty(num_pages * page_size, dtype=dtype, device=device)
        self.device = self.storage.device
        self.page_bytes = page_size * self.storage.element_size()
        # Free pages form a stack; popping from the end hands out low page ids first.
        self._free_stack = torch.arange(num_pages - 1, -1, -1, dtype=torch.int64)
        self._num_free = num_pages
        self._owner_code = torch.full((num_pages,), _NO_OWNER, dtype=torch.int32)
        self._owner_tags: list[str] = []
        self._owner_codes: dict[str, int] = {}
        self._pages_by_code: list[int] = []

    # ---- allocation ------------------------------------------------------------------------------

    @property
    def free_pages(self) -> int:
        return self._num_free

    @property
    def used_pages(self) -> int:
        return self.num_pages - self._num_free

    def alloc(self, n: int, owner: str) -> Tensor:
        """Take ``n`` free pages for ``owner`` (a tag such as ``"lora"`` or ``"kv"``).

        Returns their ids as an int64 CPU tensor. Raises :class:`PoolExhaustedError`, allocating
        nothing, when fewer than ``n`` pages are free.
        """
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"PagePool.alloc: n must be a non-negative int, got {n!r}")
        if not isinstance(owner, str) or not owner:
            raise ValueError(f"PagePool.alloc: owner must be a non-empty str, got {owner!r}")
        if n > self._num_free:
            raise PoolExhaustedError(
                f"PagePool.alloc: {owner!r} asked for {n} pages but only {self._num_free} of "
                f"{self.num_pages} are free (in use by owner: {self._usage_summary()})"
            )
        code = self._code_for(owner)
        page_ids = self._free_stack[self._num_free - n:self._num_free].flip(0).clone()
        self._num_free -= n
        self._owner_code[page_ids] = code
        self._pages_by_code[code] += n
        return page_ids

    def free(self, page_ids: Tensor | Iterable[int]) -> None:
        """Return pages to the pool.

        Raises ``ValueError`` and frees nothing if any id is outside the pool, repeated, or not
        currently allocated (a double free).
        """
        ids = torch.as_tensor(page_ids).reshape(-1)
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"PagePool.free: page_ids must be integers, got dtype {ids.dtype}")
        ids = ids.to(device="cpu", dtype=torch.int64)
        if ids.numel() == 0:
            return
        foreign = ids[(ids < 0) | (ids >= self.num_pages)]
        if foreign.numel():
            raise ValueError(
                f"PagePool.free: page_ids {foreign.tolist()[:8]} are not pages of this pool "
                f"(valid ids are 0..{self.num_pages - 1})"
            )
        unique_ids, counts = ids.unique(return_counts=True)
        if (counts > 1).any():
            raise ValueError(
                f"PagePool.free: page_ids repeat {unique_ids[counts > 1].tolist()[:8]}")
        codes = self._owner_code[ids]
        not_allocated = ids[codes == _NO_OWNER]
        if not_allocated.numel():
            raise ValueError(
                f"PagePool.free: pages {not_allocated.tolist()[:8]} are not allocated "
                "(double free?)"
            )
        for code, count in zip(*codes.unique(return_counts=True)):
            self._pages_by_code[int(code)] -= int(count)
        self._owner_code[ids] = _NO_OWNER
        self._free_stack[self._num_free:self._num_free + ids.numel()] = ids.flip(0)
        self._num_free += ids.numel()

    def owner_of(self, page_id: int) -> str | None:
        """The owner tag of an allocated page, or None if it is free."""
        if not 0 <= page_id < self.num_pages:
            raise ValueError(f"PagePool.owner_of: page {page_id} is not in 0..{self.num_pages - 1}")
        code = int(self._owner_code[page_id])
        return None if code == _NO_OWNER else self._owner_tags[code]

    # ---- statistics ------------------------------------------------------------------------------

    def used_bytes(self, owner: str | None = None) -> int:
        """Bytes in allocated pages, in all or of one owner."""
        if owner is None:
            return self.used_pages * self.page_bytes
        code = self._owner_codes.get(owner)
        return 0 if code is None else self._pages_by_code[code] * self.page_bytes

    @property
    def free_bytes(self) -> int:
        return self._num_free * self.page_bytes

    def stats(self) -> dict:
        """Pages and bytes used and free, overall and per owner tag."""
        return {
            "num_pages": self.num_pages,
            "page_size": self.page_size,
            "page_bytes": self.page_bytes,
            "used_pages": self.used_pages,
            "free_pages": self.free_pages,
            "used_bytes": self.used_bytes(),
            "free_bytes": self.free_bytes,
            "by_owner": {
                tag: {"pages": pages, "bytes": pages * self.page_bytes}
                for tag, pages in zip(self._owner_tags, self._pages_by_code) if pages
            },
        }

    # ---- addressing and data movement ------------------------------------------------------------

    def slots_per_page(self, width: int) -> int:
        if not isinstance(width, int) or width <= 0 or self.page_size % width:
            raise ValueError(
                f"PagePool: row width must be a positive divisor of page_size {self.page_size}, "
                f"got {width!r}"
            )
        return self.page_size // width

    def rows(self, width: int) -> Tensor:
        """The whole pool as a ``[num_pages * page_size // width, width]`` view."""
        self.slots_per_page(width)
        return self.storage.view(-1, width)

    def slots(self, page_ids: Tensor, width: int) -> Tensor:
        """Slot indices, in order, of every row of width ``width`` in the given pages."""
        per_page = self.slots_per_page(width)
        page_ids = torch.as_tensor(page_ids, dtype=torch.int64, device=self.device).reshape(-1, 1)
        within = torch.arange(per_page, dtype=torch.int64, device=self.device)
        return (page_ids * per_page + within).reshape(-1)

    def slots_at(self, page_table: Tensor, positions: Tensor, width: int) -> Tensor:
        """Slot indices of logical row ``positions`` of a sequence whose pages are ``page_table``.

        Row ``p`` lives in page ``page_table[p // per_page]`` at offset ``p % per_page``.
        """
        per_page = self.slots_per_page(width)
        page_table = torch.as_tensor(page_table, dtype=torch.int64, device=self.device)
        positions = torch.as_tensor(positions, dtype=torch.int64, device=self.device)
        return page_table[positions // per_page] * per_page + positions % per_page

    def write(self, slots: Tensor, rows: Tensor) -> None:
        """Write ``rows`` (``[n, width]``) into the given slots of the width-``width`` row view."""
        if rows.dim() != 2:
            raise ValueError(f"PagePool.write: rows must be 2-D, got shape {tuple(rows.shape)}")
        ops.pool_write(self.rows(rows.shape[1]), slots, rows)

    def gather(self, slots: Tensor, width: int) -> Tensor:
        """Read the rows held in ``slots`` of the width-``width`` row view into a new tensor."""
        return ops.pool_gather(self.rows(width), slots)

    # ---- helpers ---------------------------------------------------------------------------------

    def _code_for(self, owner: str) -> int:
        code = self._owner_codes.get(owner)
        if code is None:
            code = len(self._owner_tags)
            self._owner_codes[owner] = code
            self._owner_tags.append(owner)
            self._pages_by_code.append(0)
        return code

    def _usage_summary(self) -> str:
        used = {t: p for t, p in zip(self._owner_tags, self._pages_by_code) if p}
        return ", ".join(f"{tag}={pages}" for tag, pages in used.items()) or "none"

    def __repr__(self) -> str:
        return (
            f"PagePool(num_pages={self.num_pages}, page_size={self.page_size}, dtype={self.dtype}, "
            f"device={self.device}, used_pages={self.used_pages})"
        )
