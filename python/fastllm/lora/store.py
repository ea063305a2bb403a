"""AdapterStore: every registered adapter in host memory, the ones in use paged into a PagePool.

Layout of one adapter. For each target module m (in the store's module order) the adapter
contributes r_m rows of A (``in_m`` elements each) followed by r_m rows of B^T (``out_m`` elements
each). Rows are packed one after another into a run of whole pages; a row that would straddle a
page boundary starts on the next page instead, so every row is contiguous in the pool and the
kernels can address it with one offset. Rows start on 16-byte boundaries (for page sizes of whole
16-byte words), which the CUDA decode kernels' 16-byte loads rely on for speed, not for safety.
The packed host buffer is exactly the adapter's pages, so loading is one host-to-device copy plus
one ``pool_write`` of whole pages.

Adapters that share a rank pattern share the packing plan (cached), so registering thousands of
same-shaped adapters costs one ``torch.cat`` each (plus a transposed copy of every B).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections import OrderedDict
from typing import Iterable, Sequence

import torch
from torch import Tensor

from .._host import to_device
from ..memory import PagePool, PoolExhaustedError

OWNER = "lora"


def _locked(method):
    """Run an AdapterStore method under the pool's lock (see AdapterStore, Threads)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return run


@dataclasses.dataclass(frozen=True)
class ModuleSpec:
    """One target module: its name and the widths of its A rows (in) and B^T rows (out).

    Every row must fit in one page of the store's pool:

    >>> spec = fastllm.lora.ModuleSpec("q_proj", in_features=16, out_features=32)
    >>> pool = fastllm.memory.PagePool(4, 16, torch.float32, "cpu")
    >>> fastllm.lora.AdapterStore(pool, [spec])
    Traceback (most recent call last):
    ValueError: AdapterStore: a row of 32 elements does not fit in a page of 16 elements
    """
    name: str
    in_features: int
    out_features: int


@dataclasses.dataclass
class ModuleWeights:
    """One module of one adapter: A [r, in], B [out, r] and the scaling applied to B A x.

    >>> w = fastllm.lora.ModuleWeights(a=torch.ones(2, 16), b=torch.ones(32, 2), scaling=0.5)
    >>> (w.scaling * w.b @ w.a).shape        # the weight delta it adds to a 16 -> 32 linear
    torch.Size([32, 16])
    """
    a: Tensor
    b: Tensor
    scaling: float


@dataclasses.dataclass
class _Plan:
    """Where every row of an adapter with a given rank pattern goes inside its pages."""
    num_pages: int
    rows: Tensor        # int64 [M, 2, R]: logical element offset of row j of A (0) / B^T (1)
    # The packed buffer front to back: (module, kind, first row, end row) for rows stored back to
    # back, or an int, the length of a gap left before a page boundary. Packing is then one
    # torch.cat into the buffer; a copy per run costs ~10 us of Python each, 100+ per adapter.
    pieces: list
    used: int           # elements covered by `pieces`


@dataclasses.dataclass
class HostAdapter:
    name: str
    buffer: Tensor      # [num_pages, page_size] host (pinned when the pool is on CUDA)
    plan: _Plan
    ranks: Tensor       # int32 [M]
    scalings: Tensor    # float32 [M]
    max_rank: int

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


@dataclasses.dataclass
class ResidentAdapter:
    name: str
    page_ids: Tensor    # int64, CPU
    rows: Tensor        # int64 [M, 2, R_a] physical element offsets in the pool (device)
    ready: object = None  # CUDA event recorded after the copy (prefetch), or None


class AdapterStore:
    """Host-memory registry of adapters plus an LRU cache of them in a :class:`PagePool`.

    Args:
        pool: the page pool; adapters take pages tagged ``"lora"``. Rows must fit in a page.
        modules: the target modules, in a fixed order (index = module id in the row tables).
        max_rank: largest rank accepted at registration.

    Threads: the registry, the residency and the counters change under the pool's lock
    (``pool.lock``; one lock for the pool and every owner, so a KV cache reclaiming adapter pages
    and a loader thread taking them cannot deadlock). A loader thread may ``register``,
    ``unregister`` (of adapters outside the running batch) and ``prefetch`` while another thread
    runs a batch: the batch's adapters are never evicted or replaced. Packing an adapter
    (``register``) runs outside the lock.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> pool = fastllm.memory.PagePool(8, 64, torch.float32, "cpu")
        >>> store = fastllm.lora.AdapterStore(pool, [fastllm.lora.ModuleSpec("q_proj", 16, 16)],
        ...                                   max_rank=4)
        >>> a, b = torch.randn(4, 16), torch.randn(16, 4)
        >>> store.register("fr", {"q_proj": fastllm.lora.ModuleWeights(a, b, scaling=2.0)})
        >>> pool.used_pages                      # registered in host memory only
        0
        >>> [resident.name for resident in store.acquire(["fr"])]   # paged into the pool
        ['fr']
        >>> pool.used_pages > 0, store.stats()["misses"]
        (True, 1)
        >>> store.release()                      # still resident, now evictable
        >>> w = store.weights("fr", "q_proj")
        >>> torch.equal(w.a, a), torch.equal(w.b, b), w.scaling
        (True, True, 2.0)
    """

    def __init__(self, pool: PagePool, modules: Sequence[ModuleSpec], max_rank: int = 64) -> None:
        widest = max(max(m.in_features, m.out_features) for m in modules)
        if widest > pool.page_size:
            raise ValueError(f"AdapterStore: a row of {widest} elements does not fit in a page of "
                             f"{pool.page_size} elements")
        self.pool = pool
        self._lock = pool.lock
        self.modules = list(modules)
        self.module_index = {m.name: i for i, m in enumerate(self.modules)}
        self.max_rank = max_rank
        self.pin = pool.device.type == "cuda"
        self.host: dict[str, HostAdapter] = {}
        self.resident: OrderedDict[str, ResidentAdapter] = OrderedDict()  # LRU order: oldest first
        self._plans: dict[tuple, _Plan] = {}
        self._in_use: set[str] = set()
        self._side_stream = None
        self.hits = self.misses = self.evictions = self.bytes_moved = 0
        self._gap = torch.zeros(pool.page_size, dtype=pool.dtype)
        # Another owner of the pool (a KV cache) short of pages takes those of the adapters
        # outside the running batch, least recently used first.
        self._reclaimer = pool.add_reclaimer(OWNER, self)

    # ---- registration (host memory) --------------------------------------------------------------

    def register(self, name: str, weights: dict[str, ModuleWeights], replace: bool = False) -> None:
        """Pack an adapter's weights into host pages. ``weights`` maps module names to their A, B
        and scaling; modules left out have rank 0. A name already registered is refused unless
        ``replace=True`` (which unregisters the old adapter; it must not be in use)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"AdapterStore.register: name must be a non-empty str, got {name!r}")
        if not isinstance(replace, bool):
            raise TypeError(f"AdapterStore.register: replace must be a bool, got {replace!r}")
        self._check_new_name(name, replace)
        unknown = sorted(set(weights) - set(self.module_index))
        if unknown:
            raise KeyError(f"AdapterStore.register({name!r}): modules {unknown[:4]} are not target "
                           f"modules of this store")
        ranks = [0] * len(self.modules)
        scalings = [0.0] * len(self.modules)
        for i, spec in enumerate(self.modules):
            w = weights.get(spec.name)
            if w is None:
                continue
            r = w.a.shape[0]
            if w.a.shape != (r, spec.in_features) or w.b.shape != (spec.out_features, r):
                raise ValueError(
                    f"AdapterStore.register({name!r}): module {spec.name} expects A "
                    f"[r, {spec.in_features}] and B [{spec.out_features}, r], got A "
                    f"{list(w.a.shape)} and B {list(w.b.shape)}")
            if not 1 <= r <= self.max_rank:
                raise ValueError(f"AdapterStore.register({name!r}): module {spec.name} has rank {r}, "
                                 f"outside [1, max_rank={self.max_rank}]")
            scaling = w.scaling
            if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real) \
                    or not math.isfinite(scaling):
                raise ValueError(f"AdapterStore.register({name!r}): module {spec.name}'s scaling "
                                 f"must be a finite number, got {scaling!r}")
            ranks[i], scalings[i] = r, float(scaling)
        if not any(ranks):
            raise ValueError(f"AdapterStore.register({name!r}): the adapter has no weights for any "
                             "target module")
        plan = self._plan(tuple(ranks))
        dtype = self.pool.dtype
        matrices = {}
        same_shape_b: dict[tuple, list[int]] = {}
        for i, spec in enumerate(self.modules):
            w = weights.get(spec.name)
            if w is not None:
                matrices[i, 0] = w.a if w.a.dtype == dtype else w.a.to(dtype)
                same_shape_b.setdefault(tuple(w.b.shape), []).append(i)
        # B is stored transposed (rows of B^T are what the expand kernel reads). One stack per
        # shape transposes every module's B in a single op; per-module copies cost ~100x more in
        # call overhead than in bytes.
        for members in same_shape_b.values():
            stacked = torch.stack([weights[self.modules[i].name].b.t() for i in members])
            if stacked.dtype != dtype:
                stacked = stacked.to(dtype)
            for n, i in enumerate(members):
                matrices[i, 1] = stacked[n]
        # Gaps are never read by the kernels: fill them from one shared zero run. The tail of the
        # last page is left as allocated.
        parts = [self._gap[:piece] if isinstance(piece, int)
                 else matrices[piece[0], piece[1]][piece[2]:piece[3]].reshape(-1)
                 for piece in plan.pieces]
        buffer = torch.empty(plan.num_pages * self.pool.page_size, dtype=self.pool.dtype,
                             pin_memory=self.pin)
        torch.cat(parts, out=buffer[:plan.used])
        adapter = HostAdapter(
            name, buffer.view(plan.num_pages, self.pool.page_size), plan,
            torch.tensor(ranks, dtype=torch.int32), torch.tensor(scalings, dtype=torch.float32),
            max(ranks))
        with self._lock:
            # Checked again: another thread may have registered the name while this one packed.
            self._check_new_name(name, replace)
            if name in self.host:
                self.unregister(name)
            self.host[name] = adapter

    def _check_new_name(self, name: str, replace: bool) -> None:
        with self._lock:
            if name not in self.host:
                return
            if not replace:
                raise ValueError(f"AdapterStore.register: an adapter named {name!r} is already "
                                 "loaded; unload it first or pass replace=True")
            if name in self._in_use:
                raise RuntimeError(f"AdapterStore.register: cannot replace adapter {name!r}: it "
                                   "is in the running batch")

    def unregister(self, name: str) -> None:
        """Forget an adapter, freeing its pages if it is resident (it must not be in use)."""
        with self._lock:
            if name not in self.host:
                raise KeyError(f"AdapterStore.unregister: no adapter {name!r}; loaded adapters: "
                               f"{self.names()}")
            if name in self._in_use:
                raise RuntimeError(f"AdapterStore.unregister: adapter {name!r} is in the running "
                                   "batch")
            if name in self.resident:
                self._evict(name)
            del self.host[name]

    @_locked
    def close(self) -> None:
        """Give every resident adapter's pages back to the pool and stop offering them to its
        other owners (the host copies stay: a closed store can be read, not served from)."""
        if self._in_use:
            raise RuntimeError(f"AdapterStore.close: adapters {sorted(self._in_use)} are in the "
                               "running batch")
        for name in list(self.resident):
            self._evict(name)
        if self._reclaimer is not None:
            self.pool.remove_reclaimer(self._reclaimer)
            self._reclaimer = None

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self.host)

    def _plan(self, ranks: tuple) -> _Plan:
        plan = self._plans.get(ranks)
        if plan is not None:
            return plan
        page = self.pool.page_size
        max_rank = max(1, max(ranks))
        offsets = [[[0] * max_rank, [0] * max_rank] for _ in self.modules]
        pieces = []
        pos = 0
        # Rows start on 16-byte boundaries (with a page size of whole 16-byte words) so that the
        # CUDA decode kernels read them with 16-byte loads; widths that are multiples of 8
        # elements (every Llama-family shape) need no padding at all.
        word = max(1, 16 // self.pool.storage.element_size())
        for i, (spec, r) in enumerate(zip(self.modules, ranks)):
            for kind, width in ((0, spec.in_features), (1, spec.out_features)):
                for j in range(r):
                    if pos % word:
                        pieces.append(word - pos % word)
                        pos += word - pos % word
                    if pos % page + width > page:
                        next_page = (pos // page + 1) * page
                        pieces.append(next_page - pos)
                        pos = next_page
                    offsets[i][kind][j] = pos
                    last = pieces[-1] if pieces else None
                    if isinstance(last, list) and last[:2] == [i, kind] and last[3] == j:
                        last[3] = j + 1
                    else:
                        pieces.append([i, kind, j, j + 1])
                    pos += width
        rows = torch.tensor(offsets, dtype=torch.int64)
        pieces = [p if isinstance(p, int) else tuple(p) for p in pieces]
        plan = _Plan(num_pages=max(1, -(-pos // page)), rows=rows, pieces=pieces, used=pos)
        self._plans[ranks] = plan
        return plan

    # ---- residency -------------------------------------------------------------------------------

    @_locked
    def acquire(self, names: Iterable[str], keep: Iterable[str] = ()) -> list[ResidentAdapter]:
        """Make every named adapter resident and mark them in use (not evictable) until
        :meth:`release`. ``keep``: more adapters not to evict meanwhile (those resident stay;
        none is loaded). Raises :class:`PoolExhaustedError` if the pool cannot hold them all; the
        adapters already resident stay valid and nothing is half-loaded."""
        names = list(dict.fromkeys(names))
        keep = set(keep)
        missing = [n for n in names + sorted(keep) if n not in self.host]
        if missing:
            raise KeyError(f"unknown adapters {missing}; loaded adapters: {self.names()}")
        self._in_use = set(names) | keep
        residents = []
        try:
            for name in names:
                residents.append(self._make_resident(name, count=True))
        except BaseException:
            self._in_use = set()
            raise
        if self.pool.device.type == "cuda":
            current = torch.cuda.current_stream(self.pool.device)
            for resident in residents:
                if resident.ready is not None:
                    current.wait_event(resident.ready)
                    resident.ready = None
                    # Allocated on the side stream, read on this one: keep the allocator from
                    # handing its memory to the side stream while this stream may still read it.
                    resident.rows.record_stream(current)
        return residents

    @_locked
    def release(self) -> None:
        """End of a batch: its adapters stay resident but become evictable."""
        self._in_use = set()

    @_locked
    def prefetch(self, names: Iterable[str]) -> None:
        """Start loading adapters that a coming batch will use. On CUDA the host-to-device copies
        run on a side stream and overlap with compute on the current stream (the next
        :meth:`acquire` waits for them); nothing here waits on the host. On CPU this is a plain
        synchronous load. Adapters in the running batch are not evicted to make room; a prefetch
        that does not fit stops quietly (the batch will load it)."""
        wanted = list(dict.fromkeys(names))
        missing = [n for n in wanted if n not in self.host]
        if missing:
            raise KeyError(f"unknown adapters {missing}; loaded adapters: {self.names()}")
        # The requested adapters already resident are not evicted to load the others.
        protect = set(wanted)
        names = [n for n in wanted if n not in self.resident]
        if self.pool.device.type != "cuda":
            for name in names:
                try:
                    self._make_resident(name, count=False, protect=protect)
                except PoolExhaustedError:
                    return
            return
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.pool.device)
        side = self._side_stream
        compute = torch.cuda.current_stream(self.pool.device)
        # Pages handed out now may have been freed by work still queued on the compute stream (an
        # evicted adapter's last reads, a KV cache's): the side stream's writes into the pool
        # wait for that work, but its host-to-device copies (the slow part) do not.
        queued = torch.cuda.Event()
        queued.record(compute)
        with torch.cuda.stream(side):
            for name in names:
                try:
                    resident = self._make_resident(name, count=False, protect=protect,
                                                   compute=compute, before_write=queued)
                except PoolExhaustedError:
                    return
                resident.ready = torch.cuda.Event()
                resident.ready.record(side)

    def _make_resident(self, name: str, count: bool, protect: set | None = None,
                       compute=None, before_write=None) -> ResidentAdapter:
        """Page adapter ``name`` in (LRU eviction for room). ``compute``: the stream the batches
        run on when this is called from the prefetch side stream; ``before_write``: an event the
        pool write must wait for."""
        resident = self.resident.get(name)
        if resident is not None:
            self.resident.move_to_end(name)
            if count:
                self.hits += 1
            return resident
        if count:
            self.misses += 1
        host = self.host[name]
        need = host.buffer.shape[0]
        keep = self._in_use | (protect or set())
        if need > self.pool.free_pages:
            evictable = [n for n in self.resident if n not in keep]
            freeable = sum(self.resident[n].page_ids.numel() for n in evictable)
            others = sum(self.pool.reclaimable_pages(exclude=OWNER).values())
            if need > self.pool.free_pages + freeable + others:
                # Checked before evicting anything: a load that fails evicts nothing.
                raise self.pool.exhausted(
                    OWNER, need,
                    f"AdapterStore: adapter {name!r} needs {need} pages and does not fit "
                    f"beside the adapters in use "
                    f"{sorted(self._in_use)} and the pool's other owners (evicting every other "
                    f"adapter would free {freeable} pages); use fewer adapters or sequences per "
                    f"batch, or a larger pool")
            for victim in evictable:  # least recently used first
                if need <= self.pool.free_pages:
                    break
                self._evict(victim, compute)
        page_ids = self.pool.alloc(need, OWNER)  # other owners' reclaimers cover the rest
        device = self.pool.device
        slots = to_device(page_ids, device)
        # The buffer is pinned on CUDA (register), so this copy does not block the host.
        data = host.buffer.to(device, non_blocking=True) if device.type != "cpu" else host.buffer
        if before_write is not None:
            torch.cuda.current_stream(device).wait_event(before_write)
        self.pool.write(slots, data)
        self.bytes_moved += host.nbytes
        page = self.pool.page_size
        logical = host.plan.rows
        physical = page_ids[logical // page] * page + logical % page
        resident = ResidentAdapter(name, page_ids, to_device(physical, device))
        self.resident[name] = resident
        return resident

    # ---- the pool's reclaimer ---------------------------------------------------------------------

    @_locked
    def reclaimable_pages(self) -> int:
        """Pages of the resident adapters outside the running batch (and its ``keep``)."""
        return sum(r.page_ids.numel() for n, r in self.resident.items() if n not in self._in_use)

    @_locked
    def reclaim(self, pages: int) -> int:
        """Evict adapters outside the running batch, least recently used first, until ``pages``
        pages are freed or none is left to evict. Returns the pages freed."""
        freed = 0
        for victim in [n for n in self.resident if n not in self._in_use]:
            if freed >= pages:
                break
            freed += self.resident[victim].page_ids.numel()
            self._evict(victim)
        return freed

    def _evict(self, name: str, compute=None) -> None:
        resident = self.resident.pop(name)
        if resident.ready is not None and self.pool.device.type == "cuda":
            # A prefetched adapter's write may still be in flight on the side stream. Its pages go
            # back to the pool now and the next owner uses them on the compute stream, so that
            # stream (not the side stream we may be running on) must wait for the write.
            stream = compute if compute is not None else torch.cuda.current_stream(
                self.pool.device)
            stream.wait_event(resident.ready)
        self.pool.free(resident.page_ids)
        self.evictions += 1

    # ---- batch tables ----------------------------------------------------------------------------

    @_locked
    def tables(self, names: Sequence[str], residents: Sequence[ResidentAdapter]):
        """Row tables for a batch of distinct adapters, in the order given.

        Returns ``rows`` int64 [M, 2, U, R], ``ranks`` int32 [M, U], ``scalings`` float32 [M, U] on
        the pool's device, and per module the largest rank (0: no adapter of the batch targets it).
        """
        device = self.pool.device
        hosts = [self.host[n] for n in names]
        top = max(1, max(h.max_rank for h in hosts))
        rows = torch.zeros(len(self.modules), 2, len(hosts), top, dtype=torch.int64, device=device)
        for u, resident in enumerate(residents):
            rows[:, :, u, :resident.rows.shape[2]] = resident.rows
        ranks = torch.stack([h.ranks for h in hosts], 1)
        scalings = torch.stack([h.scalings for h in hosts], 1)
        module_rank = ranks.max(1).values.tolist()
        return rows, to_device(ranks, device), to_device(scalings, device), module_rank

    def weights(self, name: str, module: str) -> ModuleWeights | None:
        """An adapter's A, B and scaling for one module, read back from its host pages."""
        host = self.host[name]
        i = self.module_index[module]
        r = int(host.ranks[i])
        if r == 0:
            return None
        spec = self.modules[i]
        flat = host.buffer.view(-1)
        rows = host.plan.rows[i]
        a = flat[rows[0, :r].unsqueeze(1) + torch.arange(spec.in_features)]
        bt = flat[rows[1, :r].unsqueeze(1) + torch.arange(spec.out_features)]
        return ModuleWeights(a, bt.t(), float(host.scalings[i]))

    # ---- statistics ------------------------------------------------------------------------------

    @_locked
    def stats(self) -> dict:
        return {
            "registered": len(self.host),
            "resident": len(self.resident),
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "bytes_moved": self.bytes_moved,
            "pages_used": self.pool.used_bytes(OWNER) // self.pool.page_bytes,
            "bytes_used": self.pool.used_bytes(OWNER),
            "host_bytes": sum(h.nbytes for h in self.host.values()),
        }
