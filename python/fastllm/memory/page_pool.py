"""A pool of fixed-size pages in one preallocated tensor.

Every page holds ``page_size`` elements. A user of the pool picks a row width that divides the page
size (an adapter row of ``hidden`` elements, a KV head entry of ``head_dim`` elements) and sees the
pool as rows of that width: the pages it owns are runs of ``page_size // width`` consecutive slots.
Because LoRA weights and KV entries draw pages from the same free list, memory moves between them as
load changes instead of being split by a fixed budget.

Bookkeeping (free list, owners) lives on the host as small int tensors; only the storage is on the
device. Allocation and release are O(pages requested).

Threads: the pool's bookkeeping (allocation, release, reclaiming, statistics) runs under one
re-entrant lock, ``pool.lock``, which the owners that share the pool (the adapter store) take for
their own bookkeeping too, so that a loader thread may register, prefetch and evict adapters while
another thread runs the model on the same pool. Data movement (``write``, ``gather``) takes no
lock: owners only write pages they have just been given.

Test hook: :meth:`PagePool.fail_after` makes the n-th allocation inside a ``with`` block fail, so
that tests can inject a fault at every allocation point of a pool user. Outside such a block the
cost is one attribute test per allocation.
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Iterable, Protocol

import torch
from torch import Tensor

from .._ops import memory as ops

_POOL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_NO_OWNER = -1
MIN_KV_ROWS = 8


def _is_int(value) -> bool:
    # bool is a subclass of int: without this, True would count as 1 page (or element, or row).
    return isinstance(value, int) and not isinstance(value, bool)


class PoolExhaustedError(RuntimeError):
    """Raised when an allocation asks for more pages than the pool can give. Nothing is allocated.

    Attributes (None when raised without them):
        owner: the owner tag that asked.
        requested: pages it asked for.
        free_pages: pages free when it gave up (after the other owners gave back what they could).
        num_pages: the pool's size in pages.
        held: ``{owner: pages}`` every owner holds.
        needed: ``{owner: pages}`` every owner cannot do without: the asker's holdings plus its
            request; for an owner with a reclaimer, what it holds minus what it could give back
            (adapters of the running batch); for any other owner, all it holds.

    >>> pool = fastllm.memory.PagePool(2, 64, torch.float32, "cpu")
    >>> _ = pool.alloc(2, "lora")
    >>> try:
    ...     pool.alloc(1, "kv")
    ... except fastllm.memory.PoolExhaustedError as error:
    ...     print(error.owner, error.requested, error.free_pages, error.held)
    kv 1 0 {'lora': 2}
    >>> pool.used_pages                   # the failed allocation took nothing
    2
    """

    def __init__(self, message: str, *, owner: str | None = None, requested: int | None = None,
                 free_pages: int | None = None, num_pages: int | None = None,
                 held: dict | None = None, needed: dict | None = None) -> None:
        super().__init__(message)
        self.owner, self.requested = owner, requested
        self.free_pages, self.num_pages = free_pages, num_pages
        self.held = dict(held) if held is not None else None
        self.needed = dict(needed) if needed is not None else None

    def with_context(self, context: str) -> "PoolExhaustedError":
        """The same error (same class and attributes) with ``context`` before its message."""
        return type(self)(f"{context}: {self.args[0]}", owner=self.owner,
                                  requested=self.requested, free_pages=self.free_pages,
                                  num_pages=self.num_pages, held=self.held, needed=self.needed)


class InjectedFault(PoolExhaustedError):
    """The error :meth:`PagePool.fail_after` raises at the allocation it was told to fail. A
    :class:`PoolExhaustedError`, so that a pool user handles it exactly as a pool that ran dry.

    >>> pool = fastllm.memory.PagePool(8, 64, torch.float32, "cpu")
    >>> with pool.fail_after(0):
    ...     pool.alloc(1, "kv")
    Traceback (most recent call last):
    fastllm.memory.page_pool.InjectedFault: PagePool.alloc: injected fault
    (PagePool.fail_after(0)) at allocation 1: 'kv' asked for 1 pages (8 of 8 free)
    >>> issubclass(fastllm.memory.InjectedFault, fastllm.memory.PoolExhaustedError)
    True
    """


class AllocationFault:
    """Test hook returned by :meth:`PagePool.fail_after`; a context manager.

    Inside the ``with`` block the first ``n`` allocations of one page or more succeed and the
    next one raises ``error`` (default: an :class:`InjectedFault`) taking no page; later
    allocations succeed again (one fault per block). Allocations of zero pages, which no pool
    can fail, are not counted. The fault fires when the allocation starts, or, with
    ``after_reclaim=True``, once the other owners' reclaimers have given back the pages it was
    short of (an owner's pages evicted for an allocation that then fails); if that allocation
    fails for real first, the fault moves on to the next one.

    Attributes:
        allocations: allocations of one page or more attempted inside the block so far (the
            failed one included); with ``n`` larger than any run, the number of allocation
            points that run has.
        short: how many of them found too few free pages and asked the reclaimers.
        fired: whether the fault was raised.
        log: ``(owner, pages)`` of each of those allocations, in order.

    >>> pool = fastllm.memory.PagePool(8, 64, torch.float32, "cpu")
    >>> with pool.fail_after(1) as fault:
    ...     first = pool.alloc(1, "kv")
    ...     try:
    ...         pool.alloc(2, "kv")
    ...     except fastllm.memory.InjectedFault:
    ...         print("second allocation refused;", pool.used_pages, "page used")
    second allocation refused; 1 page used
    >>> fault.fired, fault.allocations, fault.log
    (True, 2, [('kv', 1), ('kv', 2)])
    """

    def __init__(self, pool: "PagePool", n: int, error: BaseException | None,
                 after_reclaim: bool = False) -> None:
        self.pool, self.n, self.error, self.after_reclaim = pool, n, error, after_reclaim
        self.allocations = self.short = 0
        self.fired = False
        self.log: list[tuple[str, int]] = []
        self._due = False

    def __enter__(self) -> "AllocationFault":
        with self.pool.lock:
            if self.pool._fault is not None:
                raise RuntimeError("PagePool.fail_after: a fault is already armed on this pool")
            self.pool._fault = self
        return self

    def __exit__(self, *exc) -> None:
        with self.pool.lock:
            self.pool._fault = None

    def _arrive(self, n: int, owner: str) -> None:
        """An allocation starts (before reclaiming)."""
        if n == 0:
            return
        self.allocations += 1
        self.short += n > self.pool.free_pages
        self.log.append((owner, n))
        if self.fired or self.allocations <= self.n:
            return
        self._due = True
        if not self.after_reclaim:
            self._raise(n, owner)

    def _reclaimed(self, n: int, owner: str) -> None:
        """The allocation has the pages it asked for (after reclaiming)."""
        if self._due:
            self._raise(n, owner)

    def _raise(self, n: int, owner: str) -> None:
        self._due, self.fired = False, True
        if self.error is not None:
            raise self.error
        pool = self.pool
        when = " after reclaiming" if self.after_reclaim else ""
        raise InjectedFault(
            f"PagePool.alloc: injected fault (PagePool.fail_after({self.n})) at allocation "
            f"{self.allocations}{when}: {owner!r} asked for {n} pages ({pool.free_pages} of "
            f"{pool.num_pages} free)", owner=owner, requested=n, free_pages=pool.free_pages,
            num_pages=pool.num_pages,
            held={t: p for t, p in zip(pool._owner_tags, pool._pages_by_code) if p})


class Reclaimer(Protocol):
    """What a pool owner registers with :meth:`PagePool.add_reclaimer` so that another owner's
    allocation can take pages it does not need right now (the adapter store: adapters outside the
    running batch).

    >>> class Spare:                       # holds pages it can give back at any time
    ...     def __init__(self, pool):
    ...         self.pool, self.pages = pool, pool.alloc(2, "spare")
    ...     def reclaimable_pages(self):
    ...         return len(self.pages)
    ...     def reclaim(self, pages):
    ...         freed, self.pages = self.pages, self.pages[:0]
    ...         self.pool.free(freed)
    ...         return len(freed)
    >>> pool = fastllm.memory.PagePool(3, 64, torch.float32, "cpu")
    >>> spare = Spare(pool)
    >>> _ = pool.add_reclaimer("spare", spare)
    >>> pool.alloc(3, "kv").tolist()       # 1 page free: the other 2 come from the reclaimer
    [0, 1, 2]
    >>> pool.stats()["by_owner"]
    {'kv': {'pages': 3, 'bytes': 768}}
    """

    def reclaimable_pages(self) -> int:
        """Pages it could give back now."""

    def reclaim(self, pages: int) -> int:
        """Give back at least ``pages`` pages if it can (freeing them with ``pool.free``); returns
        how many it freed."""


def unified_page_size(model, *, target_modules=None, rank: int = 16, kv_entries: int = 64,
                      dtype: torch.dtype | None = None, max_page: int = 1 << 16) -> int:
    """A page size (elements) for one pool shared by a model's LoRA adapters and its per-head KV
    caches, such that neither owner wastes much of its pages.

    The two owners waste memory differently. An adapter packs rows of its modules' widths into a
    run of pages and never lets a row straddle a page boundary (the kernels address a row by one
    offset), so a page a little smaller than a multiple of the widths loses the tail of every
    page. A KV cache (one per layer, sequence and KV head) holds rows of ``2 * head_dim`` and
    loses the unfilled part of its last page, so large pages waste most of a short cache.

    Candidates are the multiples of ``2 * head_dim`` (and of 16 bytes) from the widest adapter row
    (and at least ``MIN_KV_ROWS`` KV entries) up to ``max_page``; the one whose worse waste of the two is smallest wins (the smaller page
    on a tie): the LoRA waste of an adapter of rank ``rank`` on every target module, and the KV
    waste averaged over caches of 1 .. ``2 * kv_entries`` entries (``kv_entries``: a typical
    cache's kept entries, after FastGen's compression).

    Args:
        model: a transformers model (its config gives ``head_dim``; its linears named by
            ``target_modules`` give the adapter rows; an AdapterManager's wrapped modules count).
        target_modules: last components of the adapted modules' names (default: the Llama
            projections, ``fastllm.lora.LLAMA_TARGETS``); empty for a pool without adapters.
        rank: the adapter rank to size for (1..256).
        kv_entries: typical entries per KV cache (> 0).
        dtype: the pool's dtype (default: the model's); sets the 16-byte row alignment.
        max_page: the largest page size considered.

    Any model with a transformers-style ``config`` will do:

    >>> import types
    >>> model = nn.Module()
    >>> model.config = types.SimpleNamespace(num_attention_heads=4, hidden_size=256)
    >>> model.q_proj, model.v_proj = nn.Linear(256, 256), nn.Linear(256, 64)
    >>> page = fastllm.memory.unified_page_size(model, target_modules=["q_proj", "v_proj"],
    ...                                         rank=8, kv_entries=64)
    >>> page % (2 * 64) == 0, page >= 256    # whole KV entries (key + value of head_dim 64)
    (True, True)
    >>> pool = fastllm.memory.PagePool(16, page, torch.float32, "cpu")
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= 256:
        raise ValueError(f"unified_page_size: rank must be an int in [1, 256], got {rank!r}")
    if isinstance(kv_entries, bool) or not isinstance(kv_entries, int) or kv_entries <= 0:
        raise ValueError(f"unified_page_size: kv_entries must be a positive int, got "
                         f"{kv_entries!r}")
    if isinstance(max_page, bool) or not isinstance(max_page, int) or max_page <= 0:
        raise ValueError(f"unified_page_size: max_page must be a positive int, got {max_page!r}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_attention_heads"):
        raise ValueError("unified_page_size: model must be a transformers model with a config "
                         "(num_attention_heads, hidden_size)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if target_modules is None:
        from ..lora.manager import LLAMA_TARGETS
        target_modules = LLAMA_TARGETS
    if isinstance(target_modules, str):
        raise TypeError("unified_page_size: target_modules must be a sequence of names, not a str")
    widths = lora_row_widths(model, target_modules)
    if dtype is None:
        dtype = next(model.parameters()).dtype
    element = torch.empty((), dtype=dtype).element_size()
    word = max(1, 16 // element)
    kv_width = 2 * head_dim
    unit = kv_width * word // math.gcd(kv_width, word)
    widest = max((max(w) for w in widths), default=unit)
    # At least MIN_KV_ROWS entries per page: without adapters the KV waste alone would pick one
    # entry per page, and page tables that long cost more than the memory they save.
    first = -(-max(widest, MIN_KV_ROWS * kv_width) // unit)
    last = max(first, max_page // unit)
    best = None
    for k in range(first, last + 1):
        page = k * unit
        waste = max(kv_page_waste(page // kv_width, kv_entries),
                    lora_page_waste(widths, rank, page, word))
        if best is None or waste < best[0] - 1e-12:
            best = (waste, page)
    return best[1]


def lora_row_widths(model, target_modules) -> list[tuple[int, int]]:
    """``(in_features, out_features)`` of every module named by ``target_modules`` (last name
    component), in the model's order: nn.Linear, or the LoRALinear wrapping one."""
    targets = set(target_modules)
    out = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if isinstance(in_f, int) and isinstance(out_f, int):
            out.append((in_f, out_f))
    return out


def kv_page_waste(page_rows: int, kv_entries: int) -> float:
    """Share of a KV cache's page memory left empty, averaged over caches of 1 .. 2*kv_entries
    entries, with ``page_rows`` entries per page."""
    n = torch.arange(1, 2 * kv_entries + 1, dtype=torch.float64)
    held = torch.ceil(n / page_rows) * page_rows
    return float(1 - n.sum() / held.sum())


def lora_page_waste(widths: list[tuple[int, int]], rank: int, page: int, word: int) -> float:
    """Share of an adapter's pages (rank ``rank`` on every module of ``widths``) left empty by the
    adapter store's packing: rows start on ``word``-element boundaries and never straddle a page
    (``fastllm.lora.store.AdapterStore``; its tests check that both agree)."""
    if not widths:
        return 0.0
    pos = payload = 0
    for in_f, out_f in widths:
        for width in (in_f, out_f):
            if width > page:
                return 1.0
            payload += rank * width
            left = rank
            while left:
                pos += -pos % word
                if pos % page + width > page:
                    pos = (pos // page + 1) * page
                # Rows of a width of whole words stay aligned: place all that fit in this page.
                fit = (page - pos % page) // width if width % word == 0 else 1
                placed = min(left, fit)
                pos += placed * width
                left -= placed
    pages = max(1, -(-pos // page))
    return 1 - payload / (pages * page)


class PagePool:
    """One device buffer of ``num_pages`` pages of ``page_size`` elements each.

    Args:
        num_pages: number of pages (> 0).
        page_size: elements per page (> 0).
        dtype: float32, float16, bfloat16 (or float64, for gradient checks).
        device: where the storage lives (default: the current default device).

    ``alloc(n, owner)`` hands out page ids (an int64 CPU tensor); ``free(ids)`` takes them back.
    ``rows(width)``, ``slots(...)``, ``write(...)`` and ``gather(...)`` move data in and out.

    Examples:
        >>> pool = fastllm.memory.PagePool(num_pages=4, page_size=64, dtype=torch.float32,
        ...                                device="cpu")
        >>> pages = pool.alloc(2, "kv")
        >>> pages
        tensor([0, 1])
        >>> slots = pool.slots(pages, width=16)          # 4 rows of 16 elements per page
        >>> slots.tolist()
        [0, 1, 2, 3, 4, 5, 6, 7]
        >>> rows = torch.arange(8 * 16, dtype=torch.float32).view(8, 16)
        >>> pool.write(slots, rows)
        >>> torch.equal(pool.gather(slots.flip(0), 16), rows.flip(0))
        True
        >>> pool.stats()["by_owner"]
        {'kv': {'pages': 2, 'bytes': 512}}
        >>> pool.free(pages)
        >>> pool.free_pages
        4
    """

    def __init__(self, num_pages: int, page_size: int, dtype: torch.dtype = torch.float16,
                 device: torch.device | str | None = None) -> None:
        if not _is_int(num_pages) or num_pages <= 0:
            raise ValueError(f"PagePool: num_pages must be a positive int, got {num_pages!r}")
        if not _is_int(page_size) or page_size <= 0:
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
        # (owner, weak reference to a Reclaimer): asked for pages when an allocation of another
        # owner finds too few free. Weak, so that a pool outliving its adapter store does not keep
        # the store (and its host copies of every adapter) alive.
        self._reclaimers: dict[int, tuple[str, weakref.ref]] = {}
        self._next_reclaimer = 0
        # Re-entrant: an allocation short of pages calls a reclaimer, which frees pages under it.
        self.lock = threading.RLock()
        self._fault: AllocationFault | None = None

    @classmethod
    def for_model(cls, model, *, nbytes: int | None = None, num_pages: int | None = None,
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                  page_size: int | None = None, **sizing) -> "PagePool":
        """A pool to share between a model's LoRA adapters and its KV caches, with a page size
        that suits both (:func:`unified_page_size`; keyword arguments ``target_modules``,
        ``rank`` and ``kv_entries`` go to it).

        Args:
            model: the transformers model (before or after an AdapterManager wrapped it).
            nbytes: the pool's size in bytes (rounded down to whole pages), or
            num_pages: its size in pages; exactly one of the two.
            dtype, device: default to the model's.
            page_size: elements per page, overriding the computed size.
        """
        if (nbytes is None) == (num_pages is None):
            raise ValueError("PagePool.for_model: give exactly one of nbytes and num_pages")
        parameter = next(model.parameters())
        dtype = dtype if dtype is not None else parameter.dtype
        device = device if device is not None else parameter.device
        if page_size is None:
            page_size = unified_page_size(model, dtype=dtype, **sizing)
        elif sizing:
            raise ValueError(f"PagePool.for_model: {sorted(sizing)} only apply when page_size is "
                             "computed (page_size=None)")
        if nbytes is not None:
            if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
                raise ValueError(f"PagePool.for_model: nbytes must be a positive int, got "
                                 f"{nbytes!r}")
            page_bytes = page_size * torch.empty((), dtype=dtype).element_size()
            num_pages = nbytes // page_bytes
            if num_pages == 0:
                raise ValueError(f"PagePool.for_model: nbytes={nbytes} is less than one page "
                                 f"({page_bytes} bytes)")
        return cls(num_pages, page_size, dtype, device)

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
        if not _is_int(n) or n < 0:
            raise ValueError(f"PagePool.alloc: n must be a non-negative int, got {n!r}")
        if not isinstance(owner, str) or not owner:
            raise ValueError(f"PagePool.alloc: owner must be a non-empty str, got {owner!r}")
        with self.lock:
            fault = self._fault
            if fault is not None:
                fault._arrive(n, owner)
            if n > self._num_free:
                self._reclaim_for(owner, n)
            if fault is not None:
                fault._reclaimed(n, owner)
            code = self._code_for(owner)
            page_ids = self._free_stack[self._num_free - n:self._num_free].flip(0).clone()
            self._num_free -= n
            self._owner_code[page_ids] = code
            self._pages_by_code[code] += n
            return page_ids

    def fail_after(self, n: int, error: BaseException | None = None, *,
                   after_reclaim: bool = False) -> AllocationFault:
        """Test hook: a context manager inside which the first ``n`` allocations succeed and the
        next one raises (``error``, default an :class:`InjectedFault`, a
        :class:`PoolExhaustedError`), taking no page; with ``after_reclaim=True`` it raises
        after the reclaimers gave back what it was short of. See :class:`AllocationFault`.

            with pool.fail_after(10**9) as probe:   # count the allocation points of a run
                run()
            for n in range(probe.allocations):      # then fail at each of them
                with pool.fail_after(n), pytest.raises(PoolExhaustedError):
                    run()
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"PagePool.fail_after: n must be a non-negative int, got {n!r}")
        if error is not None and not isinstance(error, BaseException):
            raise TypeError(f"PagePool.fail_after: error must be an exception instance or None, "
                            f"got {type(error).__name__}")
        if not isinstance(after_reclaim, bool):
            raise TypeError(f"PagePool.fail_after: after_reclaim must be a bool, got "
                            f"{after_reclaim!r}")
        return AllocationFault(self, n, error, after_reclaim)

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
        with self.lock:
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

    # ---- cooperation between owners --------------------------------------------------------------

    def add_reclaimer(self, owner: str, reclaimer: Reclaimer) -> int:
        """Let allocations of other owners take pages ``reclaimer`` can give back (it is asked
        only when too few pages are free, and only if what all reclaimers could give back makes
        the allocation fit: nothing is evicted for an allocation that fails anyway). Held by a
        weak reference. Returns a handle for :meth:`remove_reclaimer`."""
        if not isinstance(owner, str) or not owner:
            raise ValueError(f"PagePool.add_reclaimer: owner must be a non-empty str, got "
                             f"{owner!r}")
        for method in ("reclaimable_pages", "reclaim"):
            if not callable(getattr(reclaimer, method, None)):
                raise TypeError(f"PagePool.add_reclaimer: reclaimer must have a {method}() method, "
                                f"got {type(reclaimer).__name__}")
        with self.lock:
            handle = self._next_reclaimer
            self._next_reclaimer += 1
            self._reclaimers[handle] = (owner, weakref.ref(reclaimer))
            return handle

    def remove_reclaimer(self, handle: int) -> None:
        # True == 1 as a dict key: a bool would remove the reclaimer with handle 1.
        if isinstance(handle, bool) or not isinstance(handle, int):
            raise TypeError(f"PagePool.remove_reclaimer: handle must be the int add_reclaimer "
                            f"returned, got {handle!r}")
        with self.lock:
            if handle not in self._reclaimers:
                raise ValueError(f"PagePool.remove_reclaimer: no reclaimer with handle "
                                 f"{handle!r}")
            del self._reclaimers[handle]

    def reclaimable_pages(self, exclude: str | None = None) -> dict[str, int]:
        """``{owner: pages}`` the reclaimers of owners other than ``exclude`` could give back."""
        out: dict[str, int] = {}
        with self.lock:
            for owner, ref in list(self._reclaimers.values()):
                reclaimer = ref()
                if reclaimer is None:
                    self._prune_reclaimers()
                elif owner != exclude:
                    out[owner] = out.get(owner, 0) + int(reclaimer.reclaimable_pages())
        return out

    def exhausted(self, owner: str, n: int, context: str | None = None) -> PoolExhaustedError:
        """The error for ``owner`` asking for ``n`` pages that the pool cannot give: which owner
        holds how many pages and how many it needs (cannot give back)."""
        with self.lock:
            return self._exhausted(owner, n, context)

    def _exhausted(self, owner: str, n: int, context: str | None) -> PoolExhaustedError:
        held = {tag: pages for tag, pages in zip(self._owner_tags, self._pages_by_code) if pages}
        reclaimable = self.reclaimable_pages()
        needed = {tag: pages - min(pages, reclaimable.get(tag, 0)) for tag, pages in held.items()}
        needed[owner] = needed.get(owner, 0) + n
        reclaimable.pop(owner, None)
        parts = []
        for tag in sorted(set(held) | {owner}):
            h, nd = held.get(tag, 0), needed[tag]
            if tag == owner:
                parts.append(f"{tag!r} holds {h} and needs {nd} (with these {n})")
            else:
                parts.append(f"{tag!r} holds {h} and needs {nd}")
        message = (f"{owner!r} asked for {n} pages but only {self._num_free} of {self.num_pages} "
                   f"are free and the other owners can give back "
                   f"{sum(reclaimable.values())} more; pages by owner: {', '.join(parts)}")
        if context:
            message = f"{context}: {message}"
        return PoolExhaustedError(message, owner=owner, requested=n, free_pages=self._num_free,
                                  num_pages=self.num_pages, held=held, needed=needed)

    def _prune_reclaimers(self) -> None:
        self._reclaimers = {h: entry for h, entry in self._reclaimers.items()
                            if entry[1]() is not None}

    def _reclaim_for(self, owner: str, n: int) -> None:
        """Ask the other owners' reclaimers for ``n - free`` pages, or raise (evicting nothing)
        if they cannot give that many between them."""
        short = n - self._num_free
        if short > sum(self.reclaimable_pages(exclude=owner).values()):
            raise self.exhausted(owner, n, "PagePool.alloc")
        for tag, ref in list(self._reclaimers.values()):
            reclaimer = ref()
            if reclaimer is None or tag == owner:
                continue
            short = n - self._num_free
            if short <= 0:
                break
            reclaimer.reclaim(short)
        if n > self._num_free:  # a reclaimer gave back less than it said it could
            raise self.exhausted(owner, n, "PagePool.alloc")

    def owner_of(self, page_id: int) -> str | None:
        """The owner tag of an allocated page, or None if it is free."""
        if not _is_int(page_id) or not 0 <= page_id < self.num_pages:
            raise ValueError(f"PagePool.owner_of: page_id must be an int in "
                             f"0..{self.num_pages - 1}, got {page_id!r}")
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
        with self.lock:
            return self._stats()

    def _stats(self) -> dict:
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
        if not _is_int(width) or width <= 0 or self.page_size % width:
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
