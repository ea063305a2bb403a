"""Where a FastGenCache's entries live: each (layer, sequence, KV head) cache's pages in the
unified page pool, its bookkeeping on the pool's device, and the host's mirror of it.

* ``_HeadCaches``: one layer's ragged caches (page table, lengths, per-entry position, score and
  flags on the device; the host mirror of the lengths that page allocation needs), with the
  storage operations (reserve, fill, write, read, release) and the device work of a decode step
  (one ``kv_decode_step``: append, attend, evict).
* ``_ClassLog``: what the host knows of the token classes (special, punctuation) each sequence's
  tokens belong to, learned from the device without waiting for it.
* ``_upload`` and ``_host_only``: moving host decisions to the device without synchronising,
  and keeping host bookkeeping real under the tests' FakeTensorMode.

Needs only torch and numpy (no transformers).
"""

from __future__ import annotations

import collections
import contextlib

import numpy as np
import torch
from torch import Tensor

from .. import _C
from ..memory import PagePool, PoolExhaustedError
from .._ops import kv as kv_ops
from .._reference.kv import KEEP
from .policies import HeadPolicy

# The page pool owner name of every KV cache page.
OWNER = "kv"

try:
    # Host bookkeeping (numpy, the page pool's free list) never runs under a tensor mode: under
    # FakeTensorMode (the tests' proof that a decode step reads no device data) it stays real,
    # while every device tensor stays fake, so reading one still raises.
    from torch._subclasses.fake_tensor import unset_fake_temporarily as _host_only
except ImportError:  # pragma: no cover - older torch
    _host_only = contextlib.nullcontext


def _real_gpu(device: torch.device) -> bool:
    """Whether work on ``device`` reaches a real GPU now: not fake tensors (a FakeTensorMode is
    active), not a stream being captured into a CUDA graph."""
    return (device.type == "cuda" and torch.cuda.is_available()
            and not torch.cuda.is_current_stream_capturing()
            and torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None)


def _upload(values, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Host values (a list or numpy array) as a tensor on ``device`` without blocking the host: a
    pinned, non-blocking copy on a GPU (the caching host allocator keeps the pinned block until the
    copy has run). Without a real GPU (fake CUDA tensors in the tests) a plain copy is equally
    free of synchronisation."""
    host = torch.as_tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    if _real_gpu(device):
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class _ClassLog:
    """What the host knows of the token classes (1 special, 2 punctuation) of each sequence, by
    real position: ``by_pos [B, capacity]``, valid for mask columns ``< known``.

    The prompt's classes are known at prefill. A decode step's token lives on the device: on the
    CPU it is read at once; on a GPU its classes are copied to pinned memory without blocking and
    read once the copy's event has completed (usually by the next step), so no decode step waits.
    Until then the host mirror of a cache whose length depends on them (a policy keeping special or
    punctuation tokens) holds an upper bound. ``settle()`` (which may synchronise) learns the rest.
    """

    def __init__(self, by_pos: np.ndarray, offset: np.ndarray, known: int):
        self.by_pos = by_pos      # uint8 [B, capacity]
        self.offset = offset      # int64 [B]: pad columns of each sequence's prompt
        self.known = known        # classes of mask columns < known are in by_pos
        self.pending: collections.deque = collections.deque()
        self.steps = 0
        # Tests only: keep CPU steps pending this many steps, as a GPU's copies may be.
        self.delay = 0

    def at(self, seq: np.ndarray, pos: np.ndarray) -> np.ndarray:
        return self.by_pos[seq, np.clip(pos, 0, self.by_pos.shape[1] - 1)]

    def store(self, column: int, data: np.ndarray) -> None:
        """Classes ``data [B, n]`` of mask columns ``column ..``; columns arrive in order."""
        if column != self.known:
            raise RuntimeError(f"fastllm.kv: internal error: classes of column {column} arrived "
                               f"while the host knows {self.known} columns")
        n = data.shape[1]
        pos = column - self.offset
        need = int(pos.max()) + n
        if need > self.by_pos.shape[1]:
            grown = np.zeros((self.by_pos.shape[0], max(need, 2 * self.by_pos.shape[1])), np.uint8)
            grown[:, :self.by_pos.shape[1]] = self.by_pos
            self.by_pos = grown
        self.by_pos[np.arange(data.shape[0])[:, None], pos[:, None] + np.arange(n)] = data
        self.known = column + n

    def record(self, column: int, classes: Tensor) -> None:
        """A step's classes ``[B, n]`` on the cache's device, for columns ``column ..``."""
        self.steps += 1
        if classes.device.type == "cpu" and not self.delay and not self.pending:
            self.store(column, classes.numpy())
            return
        host = event = None
        if type(classes) is torch.Tensor and _real_gpu(classes.device):
            host = torch.empty(classes.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(classes, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(classes.device))
        self.pending.append((column, classes, host, event, self.steps))
        self.poll()

    def poll(self) -> None:
        """Learn the pending steps whose copies have completed; never waits."""
        if self.pending and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return  # no event queries while a CUDA graph is being captured
        while self.pending:
            column, classes, host, event, step = self.pending[0]
            if event is not None:
                if not event.query():
                    return
                data = host.numpy()
            elif classes.device.type == "cpu" and self.steps - step >= self.delay:
                data = classes.numpy()
            else:  # fake tensors, or a step captured in a CUDA graph: only settle() reads them
                return
            self.pending.popleft()
            self.store(column, data)

    def settle(self) -> None:
        """Learn every pending step (synchronises with the device)."""
        while self.pending:
            column, classes, host, event, _ = self.pending.popleft()
            if event is not None:
                event.synchronize()
                data = host.numpy()
            else:
                data = classes.cpu().numpy()
            self.store(column, data)

    def select(self, order: list[int]) -> None:
        self.settle()
        self.by_pos = self.by_pos[order]
        self.offset = self.offset[order]

    def shift(self, columns: int) -> None:
        """``columns`` more pad columns before every sequence (settled logs only)."""
        self.settle()
        self.offset = self.offset + columns
        self.known += columns

    def concat(self, other: "_ClassLog") -> None:
        """Append another (settled) log's sequences, numbered by the same mask columns."""
        self.settle()
        other.settle()
        if other.known != self.known:
            raise RuntimeError(f"fastllm.kv: internal error: joining a class log of {other.known} "
                               f"columns to one of {self.known}")
        width = max(self.by_pos.shape[1], other.by_pos.shape[1])
        grown = np.zeros((self.by_pos.shape[0] + other.by_pos.shape[0], width), np.uint8)
        grown[:self.by_pos.shape[0], :self.by_pos.shape[1]] = self.by_pos
        grown[self.by_pos.shape[0]:, :other.by_pos.shape[1]] = other.by_pos
        self.by_pos = grown
        self.offset = np.concatenate([self.offset, other.offset])


class _HeadCaches:
    """One layer's ``C = B * Hkv`` ragged caches.

    The bookkeeping the kernels use lives on the pool's device: ``table`` (int32 page ids),
    ``lengths``, and per entry ``pos``, ``score``, ``flags``, plus each cache's policy. A decode
    step appends and evicts there (``kv_evict_round``) without the host reading any of it.

    The host keeps a mirror of what page allocation needs (numpy, per cache): the length
    ``m_len`` and the number of evictable entries ``m_evictable`` after the mask columns
    ``< m_seen``. Both follow from the policy without the scores: each step appends one entry; the
    entry that leaves the local window (position ``newest - window``) becomes evictable unless its
    policy keeps it for good; and a cache evicts one entry iff more than ``heavy`` are evictable.
    Only the classes of decode tokens come from the device (``_ClassLog``): a cache whose policy
    keeps special or punctuation tokens advances once they are known, and meanwhile its length is
    bounded by ``m_len + (seen - m_seen)``. Pages are allocated for that bound and returned as soon
    as it drops, so on the CPU (classes known at once) a cache holds exactly the pages its entries
    fill; on a GPU, at most the pages of the steps whose classes are still in flight more.
    """

    DEVICE_TENSORS = ("table", "lengths", "pos", "score", "flags", "keep_classes", "sinks",
                      "window", "heavy", "grow", "offset")

    def __init__(self, pool: PagePool, page_rows: int, width: int, policies: list[HeadPolicy],
                 offset: np.ndarray, hkv: int):
        self.pool, self.page_rows, self.width = pool, page_rows, width
        self.device = pool.device
        count = len(policies)
        self.policies = policies
        self.pages: list[list[int]] = [[] for _ in range(count)]
        # Host copies of the policies (the mirror's inputs).
        self.h_keep = np.array([int(p.keep_special) | 2 * int(p.keep_punct) for p in policies],
                               dtype=np.uint8)
        self.h_sinks = np.array([p.sinks for p in policies], dtype=np.int64)
        self.h_window = np.array([p.window for p in policies], dtype=np.int64)
        self.h_heavy = np.array([p.heavy for p in policies], dtype=np.int64)
        self.h_grow = np.array([p.grow for p in policies], dtype=bool)
        # Padding columns of each cache's sequence: a token at mask column c has position
        # c - offset among its sequence's real tokens (what sinks and windows count).
        self.h_offset = np.asarray(offset, dtype=np.int64).copy()
        self.hkv = hkv
        self.h_seq = np.arange(count, dtype=np.int64) // hkv
        # Caches whose length depends on the classes of decode tokens.
        self.h_dep = (self.h_keep != 0) & ~self.h_grow
        self.npages = np.zeros(count, dtype=np.int64)
        self.m_len = np.zeros(count, dtype=np.int64)
        self.m_evictable = np.zeros(count, dtype=np.int64)
        self.m_seen = np.zeros(count, dtype=np.int64)
        # Device copies: the kernels' inputs.
        self.keep_classes = _upload(self.h_keep, torch.uint8, self.device)
        self.sinks = _upload(self.h_sinks, torch.int64, self.device)
        self.window = _upload(self.h_window, torch.int64, self.device)
        self.heavy = _upload(self.h_heavy, torch.int64, self.device)
        self.grow = _upload(self.h_grow, torch.bool, self.device)
        self.offset = _upload(self.h_offset, torch.int64, self.device)
        self.table = torch.zeros(count, 1, dtype=torch.int32, device=self.device)
        self.lengths = torch.zeros(count, dtype=torch.int64, device=self.device)
        self.pos = torch.zeros(count, 16, dtype=torch.int64, device=self.device)
        self.score = torch.zeros(count, 16, dtype=torch.float32, device=self.device)
        # The token's class bits, plus KEEP when the policy keeps the entry whatever its age and
        # score (specials, punctuation, sinks): set when written, so eviction never re-derives it.
        self.flags = torch.zeros(count, 16, dtype=torch.uint8, device=self.device)

    # ---- the host mirror -------------------------------------------------------------------------

    def _host_flags(self, cache: int, pos: np.ndarray, cls: np.ndarray) -> np.ndarray:
        keep = ((cls & self.h_keep[cache]) != 0) | (pos < self.h_sinks[cache])
        return cls | keep.astype(np.uint8) * KEEP

    def bound(self, seen: int) -> np.ndarray:
        """Upper bound of each cache's length once mask columns ``< seen`` are in (exact where
        the mirror has caught up)."""
        return self.m_len + (seen - self.m_seen)

    def advance(self, seen: int, classes: _ClassLog) -> None:
        """Advance the mirror over mask columns ``< seen`` as far as the token classes are known:
        each column appends one entry; the entry leaving the local window becomes evictable
        unless the policy keeps it for good; a cache that does not grow evicts one entry when
        more than ``heavy`` are evictable. In place, one compiled call (csrc/kv/kv_mirror.h): per
        layer and step it replaced two dozen numpy operations on arrays of a few caches."""
        _C.kv_advance_mirror(self.h_seq, self.h_offset, self.h_window, self.h_sinks,
                             self.h_heavy, self.h_keep, self.h_grow, self.h_dep, self.m_len,
                             self.m_evictable, self.m_seen, seen, classes.by_pos, classes.known)

    def resync(self, seen: int) -> None:
        """Rebuild the mirror from the device state (synchronises; after multi-token steps)."""
        lengths = self.lengths.cpu().numpy()
        cap = self.pos.shape[1]
        newest = seen - 1 - self.h_offset
        evictable = ((self.flags.cpu().numpy() & KEEP) == 0) \
            & (newest[:, None] - self.pos.cpu().numpy() >= self.h_window[:, None]) \
            & (np.arange(cap)[None, :] < lengths[:, None])
        self.m_len = lengths.astype(np.int64)
        self.m_evictable = evictable.sum(1).astype(np.int64)
        self.m_seen = np.full_like(self.m_len, seen)

    # ---- storage ---------------------------------------------------------------------------------

    def room(self, seen: int) -> tuple[int, int]:
        """(pages the caches lack, longest length bound) once mask columns ``< seen`` are in:
        the decode step's question to the mirror, one compiled call (kv_mirror.h)."""
        short, longest = _C.kv_mirror_room(self.m_len, self.m_seen, self.npages, seen,
                                           self.page_rows)
        if longest >= 2**31:  # the decode kernels take int32 lengths
            raise PoolExhaustedError(f"fastllm.kv: a cache of {longest} entries is past the "
                                     "kernels' int32 lengths")
        return short, longest

    def shortfall(self, entries: np.ndarray) -> int:
        """Pages ``reserve(entries)`` would have to take from the pool."""
        if int(entries.max(initial=0)) >= 2**31:
            # the decode kernels take int32 lengths
            raise PoolExhaustedError(f"fastllm.kv: a cache of {int(entries.max())} entries is "
                                     "past the kernels' int32 lengths")
        return int(np.maximum(-(-entries // self.page_rows) - self.npages, 0).sum())

    def reserve(self, entries: np.ndarray, ids: list[int] | None = None) -> None:
        """Pages and bookkeeping columns for ``entries [C]`` entries per cache (host decision;
        the device table is updated without blocking). ``ids``: the ``shortfall(entries)`` pages
        to use, already taken from the pool (a step reserving every layer in one allocation)."""
        taken = self.shortfall(entries)
        need = -(-entries // self.page_rows)
        short = np.nonzero(need > self.npages)[0]
        if ids is not None and len(ids) != taken:
            raise RuntimeError(f"fastllm.kv: internal error: {len(ids)} pages given for a "
                               f"shortfall of {taken}")
        if short.size:
            counts = need[short] - self.npages[short]
            if ids is None:
                with _host_only():
                    ids = self.pool.alloc(int(counts.sum()), OWNER).tolist()
            ids = list(ids)
            rows, cols = [], []
            for cache, n in zip(short.tolist(), counts.tolist()):
                have = len(self.pages[cache])
                self.pages[cache].extend(ids[:n])
                del ids[:n]
                rows += [cache] * n
                cols += range(have, have + n)
            new = [self.pages[r][c] for r, c in zip(rows, cols)]
            self.npages[short] = need[short]
            width = self.table.shape[1]
            if int(need.max()) > width:
                grown = torch.zeros(self.table.shape[0], max(int(need.max()), 2 * width),
                                    dtype=torch.int32, device=self.device)
                grown[:, :width] = self.table
                self.table = grown
            where = _upload([rows, cols, new], torch.int64, self.device)
            self.table[where[0], where[1]] = where[2].to(torch.int32)
        longest = int(entries.max(initial=0))
        if longest > self.pos.shape[1]:
            cap = max(longest, 2 * self.pos.shape[1])
            for name in ("pos", "score", "flags"):
                old = getattr(self, name)
                new_t = torch.zeros(old.shape[0], cap, dtype=old.dtype, device=self.device)
                new_t[:, :old.shape[1]] = old
                setattr(self, name, new_t)

    def release_excess(self, seen: int) -> None:
        """Give back the pages past each cache's length bound (its entries fill a prefix)."""
        if not _C.kv_mirror_has_excess(self.m_len, self.m_seen, self.npages, seen,
                                       self.page_rows):
            return  # nearly every decode step: no cache shrank by a page
        keep = -(-self.bound(seen) // self.page_rows)
        extra = np.nonzero(self.npages > keep)[0]
        if not extra.size:
            return
        freed = []
        for cache, k in zip(extra.tolist(), keep[extra].tolist()):
            freed += self.pages[cache][k:]
            del self.pages[cache][k:]
        self.npages[extra] = keep[extra]
        if freed:
            with _host_only():
                self.pool.free(freed)

    def slots(self, caches: Tensor, entries: Tensor) -> Tensor:
        """Pool slots of entries ``entries`` of caches ``caches`` (device, any matching shape)."""
        pages = self.table[caches, entries // self.page_rows].to(torch.int64)
        return pages * self.page_rows + entries % self.page_rows

    def _own_slots(self, entries: Tensor) -> Tensor:
        """Pool slots of entries ``entries [C, k]``, row c of cache c."""
        pages = self.table.gather(1, entries // self.page_rows).to(torch.int64)
        return pages * self.page_rows + entries % self.page_rows

    def rows_view(self) -> Tensor:
        return self.pool.rows(self.width)

    def fill(self, entries: list, seen: int) -> None:
        """The prompt's kept entries: ``(positions, classes, scores, rows)`` per cache (host
        positions, classes and scores; rows ``[n, 2D]`` on the pool's device). One allocation,
        one pool write and one upload per tensor for the layer."""
        count = len(entries)
        counts = np.array([e[0].shape[0] for e in entries], dtype=np.int64)
        need = -(-counts // self.page_rows)
        with _host_only():
            ids = self.pool.alloc(int(need.sum()), OWNER).tolist()
        table = np.zeros((count, max(1, int(need.max(initial=0)))), dtype=np.int32)
        cap = max(16, int(counts.max(initial=0)) + 1)
        pos = np.zeros((count, cap), dtype=np.int64)
        flags = np.zeros((count, cap), dtype=np.uint8)
        score = torch.zeros(count, cap, dtype=torch.float32)
        slots, rows = [], []
        for c, (positions, cls, sc, r) in enumerate(entries):
            n = int(counts[c])
            self.pages[c] = ids[:int(need[c])]
            del ids[:int(need[c])]
            table[c, :len(self.pages[c])] = self.pages[c]
            p = positions.numpy()
            pos[c, :n] = p
            flags[c, :n] = self._host_flags(c, p, cls.numpy())
            score[c, :n] = sc.float()
            e = np.arange(n)
            slots.append(table[c, e // self.page_rows].astype(np.int64) * self.page_rows
                         + e % self.page_rows)
            rows.append(r)
        self.npages = need.copy()
        if counts.sum():
            self.pool.write(_upload(np.concatenate(slots), torch.int64, self.device),
                            torch.cat(rows).contiguous())
        self.table = _upload(table, torch.int32, self.device)
        self.pos = _upload(pos, torch.int64, self.device)
        self.flags = _upload(flags, torch.uint8, self.device)
        self.score = _upload(score, torch.float32, self.device)
        self.lengths = _upload(counts, torch.int64, self.device)
        newest = seen - 1 - self.h_offset
        evictable = ((flags & KEEP) == 0) & (newest[:, None] - pos >= self.h_window[:, None]) \
            & (np.arange(cap)[None, :] < counts[:, None])
        self.m_len = counts.copy()
        self.m_evictable = evictable.sum(1).astype(np.int64)
        self.m_seen = np.full(count, seen, dtype=np.int64)

    def write(self, cache: int, rows: Tensor, pos: Tensor, cls: Tensor, score: Tensor) -> None:
        """Append entries (rows [n, 2D], pos, cls and score [n], all on the pool's device) to one
        cache: the multi-token path, whose mirror is exact (``resync`` follows)."""
        n = rows.shape[0]
        start = int(self.m_len[cache])
        entries = self.m_len.copy()
        entries[cache] = start + n
        self.reserve(entries)
        index = torch.arange(start, start + n, device=self.device)
        self.pool.write(self.slots(torch.full_like(index, cache), index), rows.contiguous())
        self.pos[cache, start:start + n] = pos
        keep = ((cls & self.keep_classes[cache]) != 0) | (pos < self.sinks[cache])
        self.flags[cache, start:start + n] = cls | keep.to(torch.uint8) * KEEP
        self.score[cache, start:start + n] = score.float()
        self.lengths[cache] = start + n
        self.m_len[cache] = start + n

    def read(self, cache: int) -> Tensor:
        """All entries of one cache as [n, 2D] (the dense fallback for multi-token steps; the
        mirror must be exact)."""
        index = torch.arange(int(self.m_len[cache]), device=self.device)
        return self.pool.gather(self.slots(torch.full_like(index, cache), index), self.width)

    # ---- a decode step, on the device ------------------------------------------------------------

    def decode_step(self, q: Tensor, rows: Tensor, cls: Tensor, newest: Tensor, scale: float,
                    splits: int, work: Tensor | None, capacity: Tensor | None = None) -> Tensor:
        """One decode step on the device, one op (``kv_decode_step``): append one entry to every
        cache (rows [C, 2D], classes [C] and positions [C]), attend with ``q`` [B, Hq, D], add the
        probabilities to the scores and evict at most one entry per cache that holds more than
        its policy allows (its last entry's row and bookkeeping move into the hole: order is
        irrelevant to attention once positions are baked into the keys). The caller reserved
        room; ``capacity`` [C] (device), where given, is the room each cache has (graph steps:
        the host does not know the lengths), and a full cache overwrites its last entry. Returns
        the attention output [B, Hq, D]; the host learns nothing of which caches evicted."""
        out, _ = kv_ops.kv_decode_step(
            q, rows, newest, cls, self.rows_view(), self.table, self.lengths, self.pos,
            self.score, self.flags, self.keep_classes, self.sinks, self.window, self.heavy,
            self.grow, self.page_rows, scale, splits, work, capacity)
        return out

    def capacity(self) -> Tensor:
        """Entries each cache has room for [C] (device): its pages, within the bookkeeping
        columns."""
        room = np.minimum(self.npages * self.page_rows, self.pos.shape[1])
        return _upload(room, torch.int64, self.device)

    def evict_round(self, newest: Tensor) -> Tensor:
        """Evict at most one entry per cache that holds more than its policy allows (after a
        multi-token step); ``newest`` [C] is each cache's newest token position (sequences are
        padded differently). Returns the op's moves [C, 2] (device).

        The bookkeeping is one op, ``kv_evict_round``; the pool rows then move in one gather and
        one write over every cache, whether it evicted or not (one that did not copies its newest
        row onto itself)."""
        moves = kv_ops.kv_evict_round(self.pos, self.score, self.flags, self.lengths,
                                      torch.empty(len(self.pages), 0, device=self.device), newest,
                                      self.window, self.heavy, self.grow)
        newest_entry = (self.lengths - 1).clamp_(min=0)[:, None]
        entries = torch.where(moves[:, :1] >= 0, moves.flip(1), newest_entry)  # (from, to)
        slots = self._own_slots(entries).t().contiguous()
        self.pool.write(slots[1], self.pool.gather(slots[0], self.width))
        return moves

    # ---- batch -----------------------------------------------------------------------------------

    def select(self, order: list[int]) -> None:
        """Keep caches in ``order`` (no repeats); free the pages of the others. The mirror must
        be exact (the caller settles first)."""
        kept = set(order)
        freed = [p for cache in range(len(self.pages)) if cache not in kept
                 for p in self.pages[cache]]
        if freed:
            with _host_only():
                self.pool.free(freed)
        self.pages = [self.pages[i] for i in order]
        self.policies = [self.policies[i] for i in order]
        index = np.array(order, dtype=np.int64)
        for name in ("h_keep", "h_sinks", "h_window", "h_heavy", "h_grow", "h_offset", "h_dep",
                     "npages", "m_len", "m_evictable", "m_seen"):
            setattr(self, name, getattr(self, name)[index].copy())
        self.h_seq = np.arange(index.size, dtype=np.int64) // self.hkv
        device_index = _upload(index, torch.int64, self.device)
        for name in self.DEVICE_TENSORS:
            setattr(self, name, getattr(self, name)[device_index].clone())

    def release(self) -> None:
        freed = [p for pages in self.pages for p in pages]
        if freed:
            with _host_only():
                self.pool.free(freed)
        self.pages = [[] for _ in self.pages]
        self.npages[:] = 0
        self.m_len[:] = 0
        self.m_evictable[:] = 0
        self.lengths.zero_()

    def shift(self, columns: int) -> None:
        """Renumber the mask columns: ``columns`` more (or, negative, fewer) pad columns before
        every sequence. Positions (what the policies count) do not change."""
        # New arrays, not in place: on the CPU the device copy may share the host array's memory.
        self.h_offset = self.h_offset + columns
        self.m_seen = self.m_seen + columns
        self.offset = self.offset + columns

    def concat(self, other: "_HeadCaches") -> None:
        """Append another layer state's caches (a sequence joining the batch; same pool, same
        mask-column numbering) after these, taking over its pages."""
        if other.pool is not self.pool or other.hkv != self.hkv or other.width != self.width:
            raise RuntimeError("fastllm.kv: internal error: joining caches of another pool")
        self.pages = self.pages + other.pages
        self.policies = self.policies + other.policies
        for name in ("h_keep", "h_sinks", "h_window", "h_heavy", "h_grow", "h_offset", "h_dep",
                     "npages", "m_len", "m_evictable", "m_seen"):
            setattr(self, name, np.concatenate([getattr(self, name), getattr(other, name)]))
        self.h_seq = np.arange(len(self.pages), dtype=np.int64) // self.hkv
        for name in ("keep_classes", "sinks", "window", "heavy", "grow", "offset", "lengths"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        for name in ("table", "pos", "score", "flags"):
            mine, theirs = getattr(self, name), getattr(other, name)
            width = max(mine.shape[1], theirs.shape[1])
            setattr(self, name, torch.cat([_pad_columns(mine, width), _pad_columns(theirs, width)]))
        other.pages = [[] for _ in other.pages]  # now ours: the other must not free them
        other.npages = np.zeros_like(other.npages)


def _pad_columns(t: Tensor, width: int) -> Tensor:
    if t.shape[1] == width:
        return t
    out = torch.zeros(t.shape[0], width, dtype=t.dtype, device=t.device)
    out[:, :t.shape[1]] = t
    return out
