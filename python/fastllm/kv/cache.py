"""FastGenCache: a transformers Cache whose every (layer, sequence, KV head) keeps its own entries,
at its own length, in pages of the unified page pool.

How it plugs into transformers: the model's attention implementation becomes ``"fastllm_kv"``
(registered with ``AttentionInterface``). ``Cache.update`` only hands the new keys and values
(already rotated by RoPE at their true positions) to the attention function, which

* on the prompt: runs ordinary causal attention, profiles every KV head (``kv_attention_scores``,
  ``kv_policy_recovery``), picks its policy and writes only the kept entries into freshly
  allocated pages;
* on a decode step: appends the token to every head's cache, runs ``kv_ragged_decode`` over the
  ragged caches, adds the returned probabilities to the heavy-hitter scores and evicts at most one
  entry per head (``kv_evict_round``: swap with the last entry, free the last page when it
  empties).

Every other attention call (a model used with another cache) goes to transformers' SDPA.

On a GPU a decode step never waits for the device (issue 13). The bookkeeping (page table,
lengths, each entry's position, score and flags) lives on the cache's device and the step's
append, attention, score update and eviction are all device work. The host decides pages from a
mirror of each cache's length (``_HeadCaches``), which follows from the policy alone, never from
the scores; only the classes of generated tokens (special, punctuation) come from the device, by
a non-blocking copy the host reads a step or so later, and until then the mirror is an upper
bound. The prompt (profiling and compaction), multi-token steps, ``stats()`` and batch reorders
may synchronise.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import sys
import time
import warnings
import weakref

import numpy as np
import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .. import _C
from ..memory import PagePool, PoolExhaustedError
from .._ops import kv as kv_ops
from .._reference.kv import KEEP
from .policies import (
    POLICIES,
    HeadPolicy,
    _check_source,
    _class_table,
    adakv_policies,
    budget_tokens,
    check_ratio,
    fastgen_profile,
    kept_at_prefill,
    snapkv_scores,
    token_classes,
)

ATTENTION_NAME = "fastllm_kv"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
OWNER = "kv"

try:
    # Host bookkeeping (numpy, the page pool's free list) never runs under a tensor mode: under
    # FakeTensorMode (the tests' proof that a decode step reads no device data) it stays real,
    # while every device tensor stays fake, so reading one still raises.
    from torch._subclasses.fake_tensor import unset_fake_temporarily as _host_only
except ImportError:  # pragma: no cover - older torch
    _host_only = contextlib.nullcontext

# The layer whose update() ran last, with the tensors it returned: the attention function that
# follows in the same layer picks it up (identity-checked, so a stale entry is never used).
_pending: dict = {}


def _check_supported(model) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"fastllm.kv: unsupported architecture {model_type!r}; FastGenCache supports the "
            f"Llama family: {', '.join(SUPPORTED_MODEL_TYPES)} (SmolLM2 is 'llama')")


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
        self.any_dep = bool(self.h_dep.any())
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

    def advance(self, seen: int, classes: _ClassLog):
        """Advance the mirror over mask columns ``< seen`` as far as the token classes are known.
        Returns the eviction verdict [C] of column ``seen - 1``, or None if some cache could not
        be advanced over it."""
        verdict = None
        for column in range(int(self.m_seen.min()), seen):
            active = self.m_seen == column
            if self.any_dep:
                active &= ~self.h_dep | (column - self.h_window < classes.known)
            if not active.any():
                if column >= self.m_seen.max():
                    break  # every cache waits for a class: nothing later can advance
                continue
            cross = column - self.h_offset - self.h_window  # the entry leaving the window
            keep = (((classes.at(self.h_seq, cross) & self.h_keep) != 0)
                    | (cross < self.h_sinks))
            evictable = self.m_evictable + (active & (cross >= 0) & ~keep)
            evicts = active & ~self.h_grow & (evictable > self.h_heavy)
            self.m_evictable = evictable - evicts
            self.m_len += active.astype(np.int64) - evicts
            self.m_seen += active
            if column == seen - 1 and active.all():
                verdict = evicts
        return verdict

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

    def append_one(self, rows: Tensor, cls: Tensor, newest: Tensor,
                   capacity: Tensor | None = None) -> None:
        """Append one entry to every cache (rows [C, 2D], classes [C] and positions [C] on the
        device), its score 0 until the step's attention adds to it. The caller reserved room;
        ``capacity`` [C] (device), where given, is the room each cache has (graph steps: the
        host does not know the lengths), and a cache that is full overwrites its last entry
        rather than touch a page or column it does not own."""
        entries = self.lengths if capacity is None else torch.minimum(self.lengths, capacity - 1)
        entries = entries[:, None]
        self.pool.write(self._own_slots(entries)[:, 0], rows.contiguous())
        self.pos.scatter_(1, entries, newest[:, None])
        keep = ((cls & self.keep_classes) != 0) | (newest < self.sinks)
        self.flags.scatter_(1, entries, (cls | keep.to(torch.uint8) * KEEP)[:, None])
        self.score.scatter_(1, entries, 0.0)
        if capacity is None:
            self.lengths += 1
        else:
            self.lengths.copy_(entries[:, 0] + 1)

    def capacity(self) -> Tensor:
        """Entries each cache has room for [C] (device): its pages, within the bookkeeping
        columns."""
        room = np.minimum(self.npages * self.page_rows, self.pos.shape[1])
        return _upload(room, torch.int64, self.device)

    def evict_round(self, newest: Tensor, step_scores: Tensor | None = None,
                    move: bool = True) -> Tensor:
        """Add ``step_scores`` [C, W] (this step's attention per entry) into the scores, then
        evict at most one entry per cache that holds more than its policy allows; ``newest``
        [C] is each cache's newest token position (sequences are padded differently). Returns
        the op's moves [C, 2] (device).

        The bookkeeping (choice of victims, each cache's last entry moved into its hole: order is
        irrelevant to attention once positions are baked into the keys) is one op,
        ``kv_evict_round``. The pool rows then move in one gather and one write over every
        cache, whether it evicted or not (one that did not copies its newest row onto itself),
        so the host never learns which did. ``move=False`` skips that when the host mirror knows
        that no cache evicts."""
        if step_scores is None:
            step_scores = torch.empty(len(self.pages), 0, device=self.device)
        moves = kv_ops.kv_evict_round(self.pos, self.score, self.flags, self.lengths,
                                      step_scores, newest, self.window, self.heavy, self.grow)
        if move:
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
        self.any_dep = bool(self.h_dep.any())
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
        self.any_dep = bool(self.h_dep.any())
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


class _LayerGraphSteps:
    """One layer's decode-step state inside ``FastGenCache.graph_steps``: what an eager step
    takes from the host, kept where a replayed step can read and advance it."""

    def __init__(self, heads: _HeadCaches, seen: int, splits: int, work: Tensor | None):
        # The mask column of the next token, advanced by every step (eager or replayed).
        self.seen = torch.full((1,), seen, dtype=torch.int64, device=heads.device)
        # Each cache's room: its pages, reserved on entry for every step allowed.
        self.capacity = heads.capacity()
        # The attention's work, fixed at entry from the lengths the steps can reach, as a replay
        # cannot change it.
        self.splits, self.work = splits, work


class _GraphSteps:
    """``FastGenCache.graph_steps`` state shared by the layers."""

    def __init__(self, start: int, steps: int, batch: int, device: torch.device):
        self.start, self.steps = start, steps
        # The class bits of every step's token [B, steps], for the host's class log on exit.
        self.classes = torch.zeros(batch, steps, dtype=torch.uint8, device=device)


# An H100's / H200's SM count, for fake CUDA tensors on a machine without a GPU.
_DEFAULT_SMS = 132


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count  # no synchronisation


def _device_sms(device: torch.device) -> int:
    if torch.cuda.is_available():
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return _DEFAULT_SMS


def _cpu_decode_splits(longest: int) -> int:
    """Even splits of the ragged decode on the CPU: one per 512 entries of the longest cache, at
    most 32 (the CPU kernel's tasks)."""
    return max(1, min(32, longest // 512))


class _DecodeWork:
    """A layer's decode work list on its GPU (kv_math.h, plan_decode_work): each cache cut into
    items of one chunk size, balanced over the SMs by the caches' length bounds, instead of one
    split count sized by the longest cache. A list stays correct as the caches grow (a cache's
    last item runs to its length), so a layer keeps its list while no cache has outgrown the
    entries its items were planned for by more than half a chunk (its last item at most 1.5
    chunks) and the total has not halved. After a replan every cache is within its items, so the
    next one is at least ``chunk / 2`` steps away however many caches grow: one small pinned
    upload per layer every few hundred steps at serving sizes."""

    def __init__(self, bounds: np.ndarray, device: torch.device):
        with _host_only():  # host work (numpy), real even under the tests' FakeTensorMode
            chunk, rows = kv_ops.kv_decode_plan(bounds, _device_sms(device))
            rows = rows.numpy()
        self.chunk = chunk
        self.cover = np.maximum(-(-bounds // chunk), 1) * chunk
        self.total = int(bounds.sum())
        self.work = _upload(rows, torch.int32, device)

    def serves(self, bounds: np.ndarray) -> bool:
        return (bounds.shape == self.cover.shape
                and int((bounds - self.cover).max(initial=0)) <= self.chunk // 2
                and 2 * int(bounds.sum()) >= self.total)


def _decode_work(layer: "FastGenLayer", bounds: np.ndarray, device: torch.device):
    """(num_splits, work) of the layer's next decode from its caches' length bounds: even splits
    on the CPU, the layer's (re)planned work list on a GPU."""
    if device.type != "cuda":
        return _cpu_decode_splits(int(bounds.max(initial=0))), None
    if layer.decode_work is None or not layer.decode_work.serves(bounds):
        layer.decode_work = _DecodeWork(bounds, device)
    return 1, layer.decode_work.work


class FastGenLayer(CacheLayerMixin):
    """One model layer of a :class:`FastGenCache`; holds no dense tensors."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, owner: "FastGenCache", layer_idx: int):
        super().__init__()
        self._owner = weakref.ref(owner)
        self.layer_idx = layer_idx
        self.seen = 0
        self.heads: _HeadCaches | None = None
        # [B, prompt] bool (host): which mask columns of each prompt are real tokens (pads are
        # never stored; every later column is real); later steps must present the same padding.
        self.prompt_valid: Tensor | None = None
        self.padded = False
        # Inside FastGenCache.graph_steps: this layer's step state on the device.
        self.graph: _LayerGraphSteps | None = None
        # On a GPU: the decode work list the last steps used (kept while it serves).
        self.decode_work: _DecodeWork | None = None

    @property
    def valid(self) -> Tensor | None:
        """[B, seen] bool: which mask columns of each sequence are real tokens."""
        if self.prompt_valid is None:
            return None
        extra = self.seen - self.prompt_valid.shape[1]
        if extra == 0:
            return self.prompt_valid
        return torch.cat([self.prompt_valid,
                          torch.ones(self.prompt_valid.shape[0], extra, dtype=torch.bool)], dim=1)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        stale = _pending.get("layer")
        if stale is self:
            raise RuntimeError(
                f"fastllm.kv: layer {self.layer_idx} was updated twice without attention running; "
                f"the model's attention implementation must be {ATTENTION_NAME!r} "
                "(FastGenCache sets it; was it changed afterwards?)")
        _pending.update(layer=self, key=key_states, value=value_states)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self.heads is not None:
            self.heads.release()
        self.heads = None
        self.prompt_valid = None
        self.padded = False
        self.seen = 0
        self.graph = None
        self.decode_work = None

    def reorder_cache(self, beam_idx) -> None:  # handled by FastGenCache
        raise NotImplementedError


class FastGenCache(Cache):
    """FastGen adaptive KV cache (Ge et al., "Model Tells You What to Discard", ICLR 2024).

    Args:
        model: a Llama-family transformers model (Llama, Mistral, Qwen2, SmolLM2). Its attention
            implementation is switched to ``"fastllm_kv"``; other caches keep working through SDPA.
        tokenizer: its tokenizer (special and punctuation token ids).
        recovery: FastGen's T in (0, 1]: share of attention mass each head must keep.
        locality: r_l in [0, 1], local window as a share of the prompt.
        frequency: r_f in [0, 1], heavy hitters as a share of the prompt.
        policy: "fastgen", or a fixed policy for every head: "full", "streaming" (sinks + recent
            window), "h2o" (heavy hitters + recent), "snapkv" (prompt selection by pooled scores of
            the last queries, then grows), "adakv" (SnapKV's scores, the layer's budget allotted
            across its KV heads by their score mass, AdaKV).
        budget: the fixed policies' kept tokens per head: a ratio of the prompt (float) or a count
            (int).
        heavy_pool: FastGen's frequency policy ranks keys by the accumulated attention of this
            many keys centred on each: the strongest of them plus its own (odd; 1 = the paper's
            ranking by single keys), so a phrase around a heavy hitter survives whole; see
            ``policies.heavy_scores``.
        observe: FastGen's heavy-hitter ranking and recovery check also weigh the attention of
            the prompt's last ``observe`` queries, which attend the way decode will (0 = the
            paper's whole-prompt attention only); see ``policies.fastgen_profile``.
        heavy_from, recovery_on: which prompt queries FastGen's heavy-hitter ranking and its
            recovery check read: ``"prompt"`` (all, the paper), ``"observed"`` (the last
            ``observe``) or ``"both"``; see ``policies.fastgen_profile``.
        adaptive: FastGen's frequency heads of a layer share their heavy-hitter slots, allotted
            by attention mass (AdaKV-style; False = the paper's equal count per head).
        adaptive_floor: share of an equal split each head is guaranteed under ``adaptive`` and
            under policy ``"adakv"`` (AdaKV's safeguard; 1 = equal counts).
        sinks: tokens at the start StreamingLLM always keeps (policy ``"streaming"``).
        snap_window: last prompt queries whose attention SnapKV's selection uses (policy
            ``"snapkv"``).
        pool: a :class:`fastllm.memory.PagePool` to draw pages from (shared with other users), or
            None to create one holding ``max_tokens`` full-cache tokens.
        max_tokens: size of the pool created when ``pool`` is None: room for this many tokens in
            every (layer, KV head) cache uncompressed; a prompt that does not fit raises.
        page_rows: entries (one key and its value) per page of that pool; ignored with ``pool``
            (its page size decides). Smaller pages waste less memory per cache, larger ones
            need fewer page-table entries.
        chunk: query rows per pass of the profiling ops; bounds their working memory
            (``chunk x prompt length`` scores at a time), not their results.

    Example::

        cache = FastGenCache(model, tokenizer)
        out = model.generate(**batch, cache=cache, max_new_tokens=32)
        stats = cache.stats()   # kept_bytes, full_bytes, policies[layer][kv head], ...
        cache.release()

    On a GPU, decode steps read nothing back from the device (prefill does: it picks the
    policies). CUDA graphs: capture a decode step inside :meth:`graph_steps`, which keeps the
    step's position on the device and reserves the pages of the steps ahead; the capture then
    replays correctly step after step. Outside it a capture is refused (the step's position and
    pages would be host decisions baked into the graph).
    """

    def __init__(self, model, tokenizer, recovery: float = 0.95, locality: float = 0.3,
                 frequency: float = 0.3, policy: str = "fastgen", budget: float | int = 0.5,
                 sinks: int = 4, snap_window: int = 32, pool: PagePool | None = None,
                 max_tokens: int = 4096, page_rows: int = 16, chunk: int = 128,
                 heavy_pool: int = 11, observe: int = 64, heavy_from: str = "both",
                 recovery_on: str = "both", adaptive: bool = False,
                 adaptive_floor: float = 0.2):
        _check_supported(model)
        if isinstance(heavy_pool, bool) or not isinstance(heavy_pool, int) or heavy_pool < 1 \
                or heavy_pool % 2 == 0:
            raise ValueError(f"fastllm.kv: heavy_pool must be a positive odd int, got {heavy_pool!r}")
        if isinstance(observe, bool) or not isinstance(observe, int) or observe < 0:
            raise ValueError(f"fastllm.kv: observe must be an int >= 0, got {observe!r}")
        self.heavy_pool, self.observe = heavy_pool, observe
        self.heavy_from = _check_source("heavy_from", heavy_from)
        self.recovery_on = _check_source("recovery_on", recovery_on)
        if not isinstance(adaptive, bool):
            raise TypeError(f"fastllm.kv: adaptive must be a bool, got {adaptive!r}")
        self.adaptive = adaptive
        self.adaptive_floor = check_ratio("adaptive_floor", adaptive_floor)
        self.recovery = check_ratio("recovery", recovery, low_open=True)
        self.locality = check_ratio("locality", locality)
        self.frequency = check_ratio("frequency", frequency)
        if policy not in POLICIES:
            raise ValueError(f"fastllm.kv: policy must be one of {POLICIES}, got {policy!r}")
        budget_tokens(budget, 1)  # validates
        self.policy, self.budget, self.sinks, self.snap_window = policy, budget, sinks, snap_window
        self.chunk = chunk
        # What a sibling cache needs to profile a joining sequence's prompt exactly as this one
        # would (join()).
        self._settings = dict(recovery=recovery, locality=locality, frequency=frequency,
                              policy=policy, budget=budget, sinks=sinks, snap_window=snap_window,
                              chunk=chunk, heavy_pool=heavy_pool, observe=observe)
        self._model_ref = weakref.ref(model)
        self._warned_pages = False
        cfg = model.config
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.width = 2 * self.head_dim
        param = next(model.parameters())
        if pool is None:
            pages_per_cache = -(-max_tokens // page_rows)
            pool = PagePool(self.num_layers * self.num_kv_heads * pages_per_cache,
                            page_rows * self.width, dtype=param.dtype, device=param.device)
        if pool.page_size % self.width:
            raise ValueError(f"fastllm.kv: pool page_size {pool.page_size} must be a multiple of "
                             f"2 * head_dim = {self.width}")
        self.pool = pool
        self.page_rows = pool.page_size // self.width
        self.tokenizer = tokenizer
        self._ids: Tensor | None = None
        self._step_classes: Tensor | None = None
        # This forward's token classes on the device, per sequence [B, n] and per cache [C]
        # (decode steps), and the host's knowledge of every position's class.
        self._step_device_classes: tuple | None = None
        self._class_log: _ClassLog | None = None
        self._class_tables: dict = {}
        self._mask_memo = None
        self._mask_checked = None
        self._graph: _GraphSteps | None = None
        self.last_profile_seconds = 0.0
        super().__init__(layers=[FastGenLayer(self, i) for i in range(self.num_layers)])
        _register()
        if model.config._attn_implementation != ATTENTION_NAME:
            model.set_attn_implementation(ATTENTION_NAME)
        ref = weakref.ref(self)

        def remember_ids(module, args, kwargs):
            cache = ref()
            if cache is None:
                return
            ids = args[0] if args else kwargs.get("input")
            cache._ids = ids
            cache._step_classes = None  # a new forward call: its ids may be reused in place
            cache._step_device_classes = None

        self._hook = model.get_input_embeddings().register_forward_pre_hook(remember_ids,
                                                                            with_kwargs=True)

    # ---- transformers Cache API ------------------------------------------------------------------

    def reorder_cache(self, beam_idx) -> None:
        order = [int(i) for i in torch.as_tensor(beam_idx).tolist()]
        batch = self._batch()
        if order == list(range(batch)):
            return
        if sorted(order) != list(range(batch)):
            raise ValueError(
                f"fastllm.kv: cannot honour the batch reorder {order[:16]}: FastGenCache can "
                "permute its sequences but not repeat or drop them (beam search is unsupported)")
        self._select(order)

    def batch_select_indices(self, indices) -> None:
        order = [int(i) for i in torch.as_tensor(indices).tolist()]
        if len(set(order)) != len(order):
            raise ValueError(f"fastllm.kv: cannot select repeated sequences {order[:16]}")
        self._select(order)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise ValueError("fastllm.kv: FastGenCache cannot repeat sequences "
                             f"(repeats={repeats}); use num_return_sequences=1 and num_beams=1")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("fastllm.kv: evicted entries cannot be restored, so "
                                  "FastGenCache does not support crop (assisted decoding)")

    @contextlib.contextmanager
    def graph_steps(self, steps: int):
        """Decode up to ``steps`` more tokens per sequence with each step's state on the device,
        so that one decode step captured with ``torch.cuda.graph`` replays correctly step after
        step::

            with cache.graph_steps(64):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    logits = model(ids, position_ids=positions, cache=cache).logits
                for _ in range(64):
                    graph.replay()          # then write the next token into ids, positions += 1

        On entry (synchronises): learns the token classes still in flight, reserves every
        cache's pages for ``steps`` more tokens and fixes the attention's work list. Inside,
        each decode step (eager or replayed) reads its position from a counter on the device and
        advances it, always moves the rows an eviction displaces, and frees no page; the host
        learns nothing of the steps. So pass the model the positions it cannot derive:
        ``position_ids`` (and ``cache_position`` on transformers versions that take it) as
        device tensors you advance, because ``get_seq_length()`` stays at its value on entry
        until exit; the attention mask is not read (a decode step never reads it on a GPU). Only
        one-token decode steps may run inside. On exit (synchronises): reads how many steps
        ran, brings the host mirror and the class log up to date and gives back the pages no
        cache needs. Raises there if more than ``steps`` steps ran: the extra steps' outputs are
        invalid (a full cache overwrote its last entry; no other cache's pages were touched).
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"fastllm.kv: graph_steps: steps must be a positive int, got "
                             f"{steps!r}")
        if self._graph is not None:
            raise RuntimeError("fastllm.kv: graph_steps: already inside graph_steps")
        if self.layers[0].heads is None:
            raise RuntimeError("fastllm.kv: graph_steps: run the prompt (prefill) first")
        self._settle()
        self._class_table_on(self.pool.device)  # a capture cannot upload it
        start = self.layers[0].seen
        try:
            for layer in self.layers:
                heads = layer.heads
                need = heads.bound(layer.seen) + steps
                heads.reserve(need)
                layer.graph = _LayerGraphSteps(heads, layer.seen,
                                               *_decode_work(layer, need, heads.device))
        except PoolExhaustedError as err:
            for layer in self.layers:
                layer.graph = None
                layer.heads.release_excess(layer.seen)
            raise PoolExhaustedError(
                f"fastllm.kv: graph_steps: no room for {steps} more tokens per sequence (pool of "
                f"{self.pool.num_pages} pages, {self.pool.free_pages} free); ask for fewer "
                "steps or give FastGenCache a larger pool") from err
        self._graph = _GraphSteps(start, steps, self._batch(), self.pool.device)
        try:
            yield self
        finally:
            self._end_graph_steps()

    def _end_graph_steps(self) -> None:
        if self._graph is None:  # released inside graph_steps: nothing left to learn
            return
        graph, self._graph = self._graph, None
        counters = torch.cat([layer.graph.seen for layer in self.layers]).cpu()
        ran = sorted(set((counters - graph.start).tolist()))
        for layer in self.layers:
            layer.graph = None
        if len(ran) != 1:
            # A forward stopped part-way: the layers disagree and the cache cannot be repaired.
            self.release()
            raise RuntimeError(f"fastllm.kv: graph_steps: the layers ran different numbers of "
                               f"steps {ran}; the cache was released")
        ran = ran[0]
        known = min(ran, graph.steps)
        if known:
            self._class_log.store(graph.start, graph.classes[:, :known].cpu().numpy())
        if ran > known:  # steps past the reservation: their classes were not kept (class 0)
            self._class_log.store(graph.start + known,
                                  np.zeros((graph.classes.shape[0], ran - known), np.uint8))
        for layer in self.layers:
            layer.seen = graph.start + ran
            layer.heads.resync(layer.seen)
            layer.heads.release_excess(layer.seen)
        self._step_device_classes = None
        if ran > graph.steps:
            raise RuntimeError(
                f"fastllm.kv: graph_steps({graph.steps}): {ran} decode steps ran; the outputs of "
                f"the {ran - graph.steps} steps past the reserved ones are invalid")

    # ---- a running batch: sequences join and leave ----------------------------------------------

    @property
    def batch_size(self) -> int:
        """Sequences in the cache (0 before the prompt and after the last one left)."""
        return self._batch()

    def join(self, input_ids: Tensor, attention_mask: Tensor | None = None, **model_kwargs):
        """Add a sequence to the running batch: run its prompt through the model alone (with a
        sibling cache on the same pool and settings, so it is profiled exactly as it would be on
        its own) and append its caches as the last sequence of this batch. The others keep their
        caches; the batch's pad columns are renumbered so that every sequence ends at the same
        mask column (positions, which the policies count, do not change).

        Args:
            input_ids: ``[1, L]`` token ids of the prompt (``L >= 1``), on the model's device.
            attention_mask: optional ``[1, L]`` 0/1 padding of the prompt.
            **model_kwargs: passed to the model call (an AdapterManager batch applies the
                sequence's adapter if the call runs inside ``manager.batch([name], ...)``).

        Returns the model's output for the prompt (``.logits [1, L, vocab]``).

        All or nothing: if the pool cannot hold the prompt's kept entries, the sibling's pages
        go back, :class:`~fastllm.memory.PoolExhaustedError` is raised and this cache is
        unchanged. Not a decode step (it synchronises). The next steps must pass
        ``attention_mask=cache.attention_mask(1)`` and ``position_ids=cache.position_ids(1)``.
        """
        self._refuse_inside_graph_steps("join")
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1 \
                or input_ids.shape[1] < 1 or input_ids.is_floating_point():
            raise ValueError(f"fastllm.kv: join: input_ids must be an integer tensor [1, L] with "
                             f"L >= 1, got {getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if attention_mask is not None and (not isinstance(attention_mask, Tensor)
                                           or tuple(attention_mask.shape) != tuple(input_ids.shape)):
            raise ValueError(f"fastllm.kv: join: attention_mask must have the shape of input_ids "
                             f"{tuple(input_ids.shape)}, got "
                             f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
        for key in ("past_key_values", "cache", "use_cache", "input_ids", "attention_mask"):
            if key in model_kwargs:
                raise ValueError(f"fastllm.kv: join: {key} is set by join itself")
        model = self._model_ref()
        if model is None:
            raise RuntimeError("fastllm.kv: join: the model this cache was made for is gone")
        single = FastGenCache(model, self.tokenizer, pool=self.pool, **self._settings)
        single._warned_pages = self._warned_pages
        try:
            with torch.no_grad():
                out = model(input_ids=input_ids, attention_mask=attention_mask, cache=single,
                            use_cache=True, **model_kwargs)
            if any(layer.heads is None for layer in single.layers):
                raise RuntimeError("fastllm.kv: join: the model call did not run the prompt "
                                   "through every layer's attention")
            self._adopt(single)
        finally:
            single.release()  # the pages of a failed join; nothing once adopted
            single._hook.remove()
        self._warned_pages = self._warned_pages or single._warned_pages
        return out

    def _adopt(self, single: "FastGenCache") -> None:
        """Append the one sequence of ``single`` (prefilled, same pool) to this batch."""
        single._settle()
        if self._batch() == 0:
            self.release()
            for mine, theirs in zip(self.layers, single.layers):
                mine.heads, mine.prompt_valid = theirs.heads, theirs.prompt_valid
                mine.padded, mine.seen = theirs.padded, theirs.seen
                mine.decode_work = None
                theirs.heads = None
            self._class_log = single._class_log
        else:
            self._settle()
            ours, theirs_seen = self.layers[0].seen, single.layers[0].seen
            target = max(ours, theirs_seen)
            self._shift(target - ours)
            single._shift(target - theirs_seen)
            for mine, theirs in zip(self.layers, single.layers):
                mine.heads.concat(theirs.heads)
                mine.prompt_valid = torch.cat([mine.valid, theirs.valid])
                mine.padded = not bool(mine.prompt_valid.all())
                mine.decode_work = None
            self._class_log.concat(single._class_log)
        self.last_profile_seconds += single.last_profile_seconds
        self._forget_step_memos()

    def leave(self, index: int) -> None:
        """Remove sequence ``index`` from the running batch and give its pages back to the pool;
        the others keep decoding (their indices above ``index`` move down by one). Pad columns
        that no remaining sequence needs are dropped. Not a decode step (it synchronises)."""
        self._refuse_inside_graph_steps("leave")
        batch = self._batch()
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < batch:
            raise ValueError(f"fastllm.kv: leave: index must be an int in [0, {batch}), got "
                             f"{index!r}")
        if batch == 1:
            self.release()
            return
        self._select([i for i in range(batch) if i != index])
        valid = self.layers[0].valid
        real = valid.any(0).nonzero()
        leading = int(real[0]) if real.numel() else 0
        if leading:
            self._shift(-leading)
        self._forget_step_memos()

    def attention_mask(self, new_tokens: int = 1) -> Tensor:
        """The ``[B, seen + new_tokens]`` 0/1 attention mask the next step must pass (the
        batch's pad columns, then ones), on the pool's device."""
        if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 0:
            raise ValueError(f"fastllm.kv: attention_mask: new_tokens must be an int >= 0, got "
                             f"{new_tokens!r}")
        valid = self.layers[0].valid
        if valid is None:
            raise RuntimeError("fastllm.kv: attention_mask: the cache holds no sequence")
        mask = torch.cat([valid, torch.ones(valid.shape[0], new_tokens, dtype=torch.bool)], 1)
        return mask.to(device=self.pool.device, dtype=torch.int64)

    def position_ids(self, new_tokens: int = 1) -> Tensor:
        """``[B, new_tokens]`` positions of each sequence's next tokens (its real tokens so far,
        then on), on the pool's device: the next step's ``position_ids``."""
        if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
            raise ValueError(f"fastllm.kv: position_ids: new_tokens must be an int >= 1, got "
                             f"{new_tokens!r}")
        valid = self.layers[0].valid
        if valid is None:
            raise RuntimeError("fastllm.kv: position_ids: the cache holds no sequence")
        start = valid.sum(1, keepdim=True).to(torch.int64)
        return (start + torch.arange(new_tokens)).to(self.pool.device)

    def _shift(self, columns: int) -> None:
        """``columns`` more (negative: fewer) pad columns before every sequence, in every layer
        and the class log; the caller settled the cache."""
        if not columns:
            return
        for layer in self.layers:
            valid = layer.valid
            if columns > 0:
                layer.prompt_valid = torch.cat(
                    [torch.zeros(valid.shape[0], columns, dtype=torch.bool), valid], 1)
            else:
                if bool(valid[:, :-columns].any()):
                    raise RuntimeError("fastllm.kv: internal error: dropping columns that hold "
                                       "tokens")
                layer.prompt_valid = valid[:, -columns:].clone()
            layer.padded = not bool(layer.prompt_valid.all())
            layer.heads.shift(columns)
            layer.seen += columns
            layer.decode_work = None
        self._class_log.shift(columns)

    def _forget_step_memos(self) -> None:
        self._mask_memo = None
        self._mask_checked = None
        self._step_device_classes = None
        self._step_classes = None

    def _refuse_inside_graph_steps(self, what: str) -> None:
        if self._graph is not None:
            raise RuntimeError(f"fastllm.kv: {what} is not possible inside graph_steps (the "
                               "host does not know the steps' state until it exits)")

    def _batch(self) -> int:
        layer = self.layers[0]
        if layer.heads is None:
            return 0
        return len(layer.heads.pages) // self.num_kv_heads

    def _select(self, order: list[int]) -> None:
        # Not a decode step: the host may wait for the device here.
        self._refuse_inside_graph_steps("reordering the batch")
        self._settle()
        for layer in self.layers:
            if layer.heads is None:
                continue
            caches = [b * self.num_kv_heads + h for b in order for h in range(self.num_kv_heads)]
            layer.heads.select(caches)
            layer.prompt_valid = layer.prompt_valid[torch.tensor(order, dtype=torch.int64)].clone()
        if self._class_log is not None:
            self._class_log.select(order)

    def _settle(self) -> None:
        """Learn every token class still in flight, bring each layer's host mirror up to date
        and give back the pages it no longer needs (synchronises with the device)."""
        if self._class_log is None:
            return
        self._class_log.settle()
        for layer in self.layers:
            if layer.heads is not None:
                layer.heads.advance(layer.seen, self._class_log)
                layer.heads.release_excess(layer.seen)

    def release(self) -> None:
        """Give every page back to the pool and forget all tokens."""
        for layer in self.layers:
            layer.reset()
        self._class_log = None
        self._step_device_classes = None
        self._graph = None

    def reset(self) -> None:
        self.release()

    def __del__(self):
        # At interpreter exit the pool may already be gone, and touching tensors then aborts.
        if sys.is_finalizing():
            return
        try:
            self.release()
            self._hook.remove()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ---- statistics ------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Memory held against a full cache of the same tokens, and each head's policy.

        Padding is not a token: a full cache would hold each sequence's real tokens only, and
        pad entries are never stored, so neither side counts them. Synchronises with the device
        (it learns the token classes still in flight and returns the pages they free)."""
        self._refuse_inside_graph_steps("stats()")
        self._settle()
        pages = 0
        kept_entries = 0
        full_entries = 0
        policies = []
        for layer in self.layers:
            heads = layer.heads
            if heads is None:
                policies.append([])
                continue
            pages += sum(len(p) for p in heads.pages)
            real = layer.seen - heads.h_offset
            full_entries += int(real.sum())
            lengths = heads.lengths.cpu().numpy()
            if not np.array_equal(lengths, heads.m_len):
                raise RuntimeError(
                    f"fastllm.kv: internal error: layer {layer.layer_idx}'s host mirror of the "
                    f"cache lengths {heads.m_len.tolist()[:8]} differs from the device's "
                    f"{lengths.tolist()[:8]}")
            kept_entries += int(lengths.sum())
            policies.append([{"policy": p.name, "kept": int(n)}
                             for p, n in zip(heads.policies, lengths.tolist())])
        first = self.layers[0]
        seen = first.seen
        entry_bytes = self.width * self.pool.storage.element_size()
        return {
            # What this cache holds (whole pages) against what a dense cache of the same tokens
            # would (no pages: no rounding), so the ratio counts the page waste too.
            "kept_bytes": pages * self.pool.page_bytes,
            "full_bytes": full_entries * entry_bytes,
            "pages": pages,
            "kept_entries": kept_entries,
            "full_entries": full_entries,
            "entry_bytes": entry_bytes,
            "tokens": seen,
            "sequence_tokens": ([] if first.valid is None
                                else first.valid.sum(1).tolist()),
            "profile_seconds": self.last_profile_seconds,
            "policies": policies,
        }

    # ---- the attention path ----------------------------------------------------------------------

    def _classes(self, batch: int, length: int, device) -> Tensor:
        ids = self._ids
        if ids is None or ids.shape != (batch, length):
            if self.policy == "fastgen":
                raise ValueError("fastllm.kv: FastGen needs the token ids of each step (call the "
                                 "model with input_ids, not inputs_embeds)")
            return torch.zeros(batch, length, dtype=torch.uint8, device=device)
        # Every layer of a step asks for the same ids' classes: look them up once per step.
        if self._step_classes is None:
            self._step_classes = token_classes(self.tokenizer, ids)
        return self._step_classes.to(device)

    def _visible(self, attention_mask, batch: int, queries: int, keys: int) -> Tensor | None:
        """The mask as bool [B, Q, K] on the CPU (True = may attend), or None for plain causal.

        Computed once per forward: transformers hands every layer the same mask tensor."""
        if attention_mask is None:
            return None
        memo = self._mask_memo
        if memo is not None and memo[0] is attention_mask:
            return memo[1]
        mask = attention_mask
        self._check_mask_shape(mask, batch, queries, keys)
        if mask.dtype == torch.bool:
            vis = mask[:, 0]
        elif mask.is_floating_point():
            vis = mask[:, 0] == 0
            if not bool((vis | (mask[:, 0] <= torch.finfo(mask.dtype).min / 2)).all()):
                raise ValueError("fastllm.kv: cannot honour an additive attention mask with "
                                 "values other than 0 and -inf (an attention bias)")
        else:
            raise ValueError(f"fastllm.kv: attention mask of dtype {mask.dtype} is not supported")
        vis = vis.expand(batch, queries, keys).cpu()
        self._mask_memo = (attention_mask, vis)
        return vis

    @staticmethod
    def _check_mask_shape(mask: Tensor, batch: int, queries: int, keys: int) -> None:
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (queries, keys) \
                or mask.shape[0] not in (1, batch):
            raise ValueError(
                f"fastllm.kv: cannot honour an attention mask of shape {tuple(mask.shape)}: "
                f"expected [batch, 1, {queries}, {keys}] (one mask shared by all heads)")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise ValueError(f"fastllm.kv: attention mask of dtype {mask.dtype} is not supported")

    @staticmethod
    def _check_causal_padding(vis: Tensor, valid: Tensor, past: int) -> None:
        """The only patterns FastGenCache can honour: every real query attends causally to every
        real key before it, and to nothing else (padding may sit anywhere in the prompt)."""
        batch, queries, keys = vis.shape
        qpos = past + torch.arange(queries)
        want = (torch.arange(keys)[None, :] <= qpos[:, None])[None] & valid[:, None, :]
        real_rows = valid[:, past:]
        bad = ((vis != want) & real_rows[:, :, None]).nonzero()
        if bad.shape[0]:
            b, i, j = bad[0].tolist()
            raise ValueError(
                f"fastllm.kv: cannot honour this attention mask: sequence {b}, query {past + i} "
                f"{'sees' if bool(vis[b, i, j]) else 'does not see'} key {j}; FastGenCache "
                "supports causal attention with padding (an attention_mask of 0/1 per token) only")

    def _check_once(self, attention_mask, vis: Tensor, valid: Tensor, past: int) -> None:
        if self._mask_checked is not attention_mask:
            self._check_causal_padding(vis, valid, past)
            self._mask_checked = attention_mask

    def _prefill_policies(self, q: Tensor, k: Tensor, classes: Tensor, scale: float):
        """Policies and kept positions of one sequence's KV heads; q [Hq, L, D], k [Hkv, L, D]."""
        length = k.shape[1]
        hkv = k.shape[0]
        policies, kept, scores = [], [], None
        if self.policy == "fastgen":
            policies, kept, scores, _ = fastgen_profile(q, k, classes, scale, self.recovery,
                                                        self.locality, self.frequency, self.chunk,
                                                        self.heavy_pool, self.observe,
                                                        self.heavy_from, self.recovery_on,
                                                        self.adaptive, self.adaptive_floor)
            return policies, kept, scores
        budget = min(budget_tokens(self.budget, length), length)
        if self.policy == "full":
            p = HeadPolicy("full", grow=True)
        elif self.policy == "streaming":
            sinks = min(self.sinks, budget)
            p = HeadPolicy("streaming", sinks=sinks, window=budget - sinks)
        elif self.policy == "h2o":
            scores = kv_ops.kv_attention_scores(q, k, scale, self.chunk).cpu()
            p = HeadPolicy("h2o", heavy=budget // 2, window=budget - budget // 2)
        else:  # snapkv, adakv
            obs = min(self.snap_window, budget, length)
            scores = snapkv_scores(q, k, scale, obs, self.chunk)
            p = HeadPolicy("snapkv", window=obs, heavy=budget - obs, grow=True)
        per_head = (adakv_policies(scores, length, budget, obs, self.adaptive_floor)
                    if self.policy == "adakv" else [p] * hkv)
        for h, p in enumerate(per_head):
            policies.append(p)
            kept.append(kept_at_prefill(p, classes.cpu(), None,
                                        scores[h] if scores is not None else None))
        return policies, kept, scores

    def _prefill(self, layer: FastGenLayer, q: Tensor, k: Tensor, v: Tensor, scale: float,
                 valid: Tensor) -> None:
        """Profile and store one prompt. ``valid`` [B, L] marks real tokens: each sequence is
        profiled on its real tokens only, exactly as if it ran alone (its rotary positions
        already skip the padding), and pads never reach a page. The host may wait for the device
        here (profiling reads the scores): the prompt is the one step the GPU path synchronises."""
        batch, _, length, _ = k.shape
        classes = self._classes(batch, length, torch.device("cpu"))
        all_policies, writes = [], []
        start = time.perf_counter()
        for b in range(batch):
            cols = valid[b].nonzero().flatten()
            if cols.numel() == 0:
                raise ValueError(f"fastllm.kv: sequence {b} of the batch is all padding")
            if cols.numel() == length:
                qb, kb = q[b], k[b]
            else:
                dev_cols = cols.to(q.device)
                qb, kb = q[b][:, dev_cols], k[b][:, dev_cols]
            policies, kept, scores = self._prefill_policies(qb, kb, classes[b, cols], scale)
            all_policies += policies
            writes.append((cols, kept, scores))
        self.last_profile_seconds += time.perf_counter() - start
        pads = np.array([length - cols.numel() for cols, _, _ in writes], dtype=np.int64)
        if self._class_log is None:  # the first layer: every layer sees the same tokens
            by_pos = np.zeros((batch, length + 64), dtype=np.uint8)
            for b, (cols, _, _) in enumerate(writes):
                by_pos[b, :cols.numel()] = classes[b, cols].numpy()
            self._class_log = _ClassLog(by_pos, pads, length)
        self._class_table_on(k.device)  # uploaded now, so no decode step has to
        hkv = self.num_kv_heads
        heads = _HeadCaches(self.pool, self.page_rows, self.width, all_policies,
                            np.repeat(pads, hkv), hkv)
        entries = []
        for b, (cols, kept, scores) in enumerate(writes):
            for h, positions in enumerate(kept):
                dev_cols = cols[positions].to(k.device)
                rows = torch.cat([k[b, h, dev_cols], v[b, h, dev_cols]], dim=-1)
                score = (scores[h, positions] if scores is not None
                         else torch.zeros(positions.shape[0]))
                entries.append((positions, classes[b, cols[positions]], score, rows))
        try:
            heads.fill(entries, length)
        except PoolExhaustedError as err:
            self.release()
            raise err.with_context(
                f"fastllm.kv: a prompt of {length} tokens (batch {batch}) does not fit the page "
                f"pool ({self.pool.num_pages} pages of {self.page_rows} entries, "
                f"{self.pool.free_pages} free after releasing this cache); give FastGenCache a "
                f"larger max_tokens or pool") from err
        self._check_page_fill(heads)
        layer.heads = heads
        layer.decode_work = None
        layer.prompt_valid = valid.clone()
        layer.padded = not bool(valid.all())
        layer.seen = length

    def _check_page_fill(self, heads: _HeadCaches) -> None:
        """Warn (once per cache) when the prompt's kept entries leave most of their pages empty
        because the pool's pages are large: a pool sized for adapters (65536-element pages) gives
        every (layer, sequence, KV head) cache a whole page."""
        if self._warned_pages or self.page_rows <= 16:
            return
        pages = int(heads.npages.sum())
        entries = int(heads.m_len.sum())
        if pages and entries < 0.5 * pages * self.page_rows:
            self._warned_pages = True
            warnings.warn(
                f"fastllm.kv: the {entries} entries one layer kept of the prompt fill "
                f"{entries / (pages * self.page_rows):.0%} of the {pages} pages they took: a page "
                f"holds {self.page_rows} entries ({self.pool.page_bytes // 1024} KB) and every "
                "(layer, sequence, KV head) cache takes at least one; use a pool with smaller "
                "pages (PagePool.for_model(model, ...) suits adapters and KV caches both)",
                stacklevel=2)

    def _class_table_on(self, device: torch.device) -> Tensor:
        """The vocabulary's class bits on ``device``, with a trailing 0 for ids past it."""
        table = self._class_tables.get(device)
        if table is None:
            host = _class_table(self.tokenizer)
            table = torch.cat([host, host.new_zeros(1)]).to(device)
            self._class_tables[device] = table
        return table

    def _device_classes(self, layer: FastGenLayer, device: torch.device, batch: int,
                        n: int) -> tuple[Tensor, Tensor]:
        """This forward's token classes on the device, ``[B, n]`` and, for a decode step, per
        cache ``[C]``; looked up once per forward (every layer asks) and handed to the host's
        class log without waiting for them."""
        memo = self._step_device_classes
        if memo is not None and memo[0] == layer.seen:
            return memo[1], memo[2]
        ids = self._ids
        if ids is None or ids.shape != (batch, n):
            if self.policy == "fastgen":
                raise ValueError("fastllm.kv: FastGen needs the token ids of each step (call the "
                                 "model with input_ids, not inputs_embeds)")
            classes = torch.zeros(batch, n, dtype=torch.uint8, device=device)
        else:
            table = self._class_table_on(device)
            classes = table[ids.to(device).clamp(0, table.shape[0] - 1)]
        per_cache = (classes[:, :1].expand(batch, self.num_kv_heads).reshape(-1) if n == 1
                     else None)
        graph = self._graph
        if graph is None:
            self._class_log.record(layer.seen, classes)
        else:  # the host learns them on exit (a replay runs no Python)
            step = (layer.graph.seen - graph.start).clamp_(0, graph.steps - 1)
            graph.classes.scatter_(1, step.expand(batch, 1), classes)
        self._step_device_classes = (layer.seen, classes, per_cache)
        return classes, per_cache

    def _decode(self, layer: FastGenLayer, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """One token per sequence: append it to every cache, attend over the ragged caches, add
        the probabilities to the heavy-hitter scores and evict at most one entry per cache, all
        on the device. The host decides the pages from its mirror and reads nothing back."""
        heads = layer.heads
        batch, hkv = k.shape[0], k.shape[1]
        if layer.graph is not None:
            return self._graph_decode(layer, q, k, v, scale)
        if k.device.type == "cuda" and torch.cuda.is_available() \
                and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("fastllm.kv: capture FastGenCache decode steps inside "
                               "cache.graph_steps(n): outside it a step's position and pages "
                               "are host decisions a replay would repeat")
        column = layer.seen
        _, cls = self._device_classes(layer, k.device, batch, 1)
        try:
            need = heads.bound(column) + 1  # the append, before this step's eviction
            # Pages first: if the pool is full the mirror must not have moved ahead of the device.
            # (Normally a no-op: _reserve_step took every layer's pages before the first layer.)
            heads.reserve(need)
            evicts = heads.advance(column + 1, self._class_log)
        except PoolExhaustedError as err:
            raise err.with_context(f"fastllm.kv: no free page to append token {layer.seen} "
                                   f"(pool of {self.pool.num_pages} pages)") from err
        newest = column - heads.offset
        heads.append_one(torch.cat([k, v], dim=-1).reshape(batch * hkv, -1), cls, newest)
        layer.seen += 1
        splits, work = _decode_work(layer, need, k.device)
        out, _, scores = kv_ops.kv_ragged_decode(q[:, :, 0].contiguous(), heads.rows_view(),
                                                  heads.table, heads.lengths.to(torch.int32),
                                                  self.page_rows, scale, splits, work)
        heads.evict_round(newest, scores, move=evicts is None or bool(evicts.any()))
        heads.release_excess(layer.seen)
        return out[:, None]  # [B, 1, Hq, D]

    def _graph_decode(self, layer: FastGenLayer, q: Tensor, k: Tensor, v: Tensor,
                      scale: float) -> Tensor:
        """A decode step inside ``graph_steps``: the same device work as ``_decode`` with the
        position from the layer's device counter, the pages reserved on entry, a fixed split
        count and the eviction's row move always made; the host does nothing a replay would
        skip."""
        heads, state = layer.heads, layer.graph
        batch, hkv = k.shape[0], k.shape[1]
        _, cls = self._device_classes(layer, k.device, batch, 1)
        newest = state.seen - heads.offset
        heads.append_one(torch.cat([k, v], dim=-1).reshape(batch * hkv, -1), cls, newest,
                         capacity=state.capacity)
        state.seen += 1
        out, _, scores = kv_ops.kv_ragged_decode(q[:, :, 0].contiguous(), heads.rows_view(),
                                                  heads.table, heads.lengths.to(torch.int32),
                                                  self.page_rows, scale, state.splits, state.work)
        heads.evict_round(newest, scores, move=True)
        return out[:, None]

    def _extend(self, layer: FastGenLayer, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """Several new tokens on top of compressed caches: dense attention per head over its kept
        entries plus the new tokens (causal among themselves). Not a decode step: it reads the
        device (lengths, whether a round evicted) and leaves the host mirror exact."""
        heads = layer.heads
        batch, hq, n, d = q.shape
        hkv = k.shape[1]
        group = hq // hkv
        classes, _ = self._device_classes(layer, k.device, batch, n)
        self._class_log.settle()
        heads.advance(layer.seen, self._class_log)
        # No release_excess here: the pages _reserve_step took for these tokens are in use below.
        out = torch.empty(batch, n, hq, d, dtype=q.dtype, device=q.device)
        new_scores = torch.zeros(batch * hkv, n, device=q.device)
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        for b in range(batch):
            for h in range(hkv):
                c = b * hkv + h
                cached = heads.read(c)
                keys = torch.cat([cached[:, :d], k[b, h]]).float()
                values = torch.cat([cached[:, d:], v[b, h]]).float()
                visible = torch.cat([torch.ones(n, cached.shape[0], dtype=torch.bool,
                                                device=q.device), causal], dim=1)
                qg = q[b, h * group:(h + 1) * group].float()
                logits = (qg @ keys.T * scale).masked_fill(~visible, float("-inf"))
                probs = logits.softmax(-1)
                out[b, :, h * group:(h + 1) * group] = (probs @ values).transpose(0, 1).to(q.dtype)
                col = probs.sum((0, 1))
                m = cached.shape[0]
                heads.score[c, :m] += col[:m]
                new_scores[c] = col[m:]
        columns = torch.arange(layer.seen, layer.seen + n, device=q.device)
        try:
            for b in range(batch):
                for h in range(hkv):
                    c = b * hkv + h
                    heads.write(c, torch.cat([k[b, h], v[b, h]], dim=-1),
                                columns - int(heads.h_offset[c]), classes[b], new_scores[c])
        except PoolExhaustedError as err:
            raise err.with_context(f"fastllm.kv: no free page to append token {layer.seen} "
                                   f"(pool of {self.pool.num_pages} pages)") from err
        layer.seen += n
        newest = layer.seen - 1 - heads.offset
        for _ in range(n):
            if not bool((heads.evict_round(newest)[:, 0] >= 0).any()):
                break
        heads.resync(layer.seen)
        heads.release_excess(layer.seen)
        return out

    def _host_checks_values(self, t: Tensor) -> bool:
        """Whether this step may read mask values on the host: always for CPU tensors; for
        other devices only in fastllm's index debug mode (``fastllm.ops.checked_indices``)."""
        return t.device.type == "cpu" or _C.index_debug_mode()

    def attention(self, layer: FastGenLayer, module, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask, scale: float) -> Tensor:
        batch, _, n, _ = query.shape
        past = layer.seen
        if layer.heads is None:
            vis = self._visible(attention_mask, batch, n, past + n)
            if vis is None:
                valid = torch.ones(batch, n, dtype=torch.bool)
                out = torch.nn.functional.scaled_dot_product_attention(
                    query, key, value, is_causal=n > 1, scale=scale, enable_gqa=True)
                out = out.transpose(1, 2)
            else:
                # Key columns the last query sees = the real tokens (a pad query still sees the
                # real keys before it, never a pad key).
                valid = vis[:, -1].clone()
                self._check_once(attention_mask, vis, valid, 0)
                # Prompt attention is transformers' own SDPA path under the same mask, so the
                # logits of real positions equal a DynamicCache run.
                out, _ = sdpa_attention_forward(module, query, key, value, attention_mask,
                                                scaling=scale)
            self._prefill(layer, query, key, value, scale, valid)
            return out
        if batch * self.num_kv_heads != len(layer.heads.pages):
            raise ValueError(f"fastllm.kv: batch size changed from "
                             f"{len(layer.heads.pages) // self.num_kv_heads} to {batch}")
        if self._graph is not None:
            # The host's position is stale inside graph_steps: only the mask's batch and query
            # dimensions are checked (a decode step never reads it on a GPU).
            if n != 1:
                raise RuntimeError(f"fastllm.kv: only one-token decode steps may run inside "
                                   f"graph_steps, got {n} tokens")
            if attention_mask is not None:
                self._check_mask_shape(attention_mask, batch, n, attention_mask.shape[-1])
            return self._decode(layer, query, key, value, scale)
        if attention_mask is None:
            if layer.padded:
                raise ValueError(
                    "fastllm.kv: the prompt was padded but this step has no attention mask, which "
                    "would let it attend to the pad tokens FastGenCache never stored; pass the "
                    "attention_mask (extended with ones for the new tokens) on every step")
        elif n == 1 and not self._host_checks_values(query):
            # A decode step on a GPU: reading the mask would stop the GPU. Its shape is checked;
            # its values (which only restate the prompt's padding, never stored) are checked in
            # the debug mode.
            self._check_mask_shape(attention_mask, batch, n, past + n)
        else:
            vis = self._visible(attention_mask, batch, n, past + n)
            valid = vis[:, -1]
            if not bool(valid[:, past:].all()):
                raise ValueError(
                    "fastllm.kv: cannot honour padding inside the new tokens of a decode or "
                    "extend step; only the prompt (the first forward) may be padded")
            if not torch.equal(valid[:, :past], layer.valid):
                raise ValueError(
                    "fastllm.kv: this step's attention mask pads different past tokens than the "
                    "prompt did (or is missing); the padding of past tokens cannot change: pass "
                    "the whole sequence's attention mask, pads included, at every step")
            self._check_once(attention_mask, vis, valid, past)
        if layer.layer_idx == 0:
            self._reserve_step(n)
        if n == 1:
            return self._decode(layer, query, key, value, scale)
        return self._extend(layer, query, key, value, scale)

    def _reserve_step(self, n: int) -> None:
        """Before the first layer of a step with ``n`` new tokens per sequence: every layer's
        pages for them, in one allocation. A pool that cannot give them all (after the other
        owners, e.g. adapters outside the running batch, gave back what they could) raises here,
        before any layer has appended anything: the cache is as it was, and the step can run
        again once pages are free (a sequence left)."""
        needs = [(layer.heads, layer.heads.bound(layer.seen) + n) for layer in self.layers
                 if layer.heads is not None]
        counts = [heads.shortfall(need) for heads, need in needs]
        total = sum(counts)
        if not total:
            return
        try:
            with _host_only():
                ids = self.pool.alloc(total, OWNER).tolist()
        except PoolExhaustedError as err:
            raise err.with_context(
                f"fastllm.kv: no room for the next {n} token(s) of {self._batch()} sequences "
                f"({total} pages over {len(needs)} layers); nothing was appended: free pages "
                "(a sequence leaves) and run the step again") from err
        for (heads, need), count in zip(needs, counts):
            heads.reserve(need, ids[:count])
            del ids[:count]


def _fastllm_kv_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs):
    layer = _pending.get("layer")
    if (layer is not None and _pending.get("key") is key and _pending.get("value") is value
            and layer.layer_idx == getattr(module, "layer_idx", None)):
        _pending.clear()
        cache = layer._owner()
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return cache.attention(layer, module, query, key, value, attention_mask, scale), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    ALL_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, _fastllm_kv_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, _always_built_sdpa_mask)
    _registered = True


def _always_built_sdpa_mask(*args, **kwargs):
    # transformers skips the mask when no token is padded, which it finds out by reading the
    # padding mask on the host: a synchronisation in every decode step generate() runs. The
    # ragged decode only looks at the mask's shape, so build it every time instead.
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def cache_keyword(model) -> str:
    """The keyword by which ``model`` (and its ``generate``) takes a cache: ``"cache"`` on the
    transformers releases that renamed ``past_key_values`` (5.2x, where the old name still works
    but warns on every call), ``"past_key_values"`` before them.

    >>> model(ids, **{fastllm.kv.cache_keyword(model): cache}, use_cache=True)  # doctest: +SKIP
    """
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def profile(model, tokenizer, text: str, **kwargs) -> list[list[dict]]:
    """FastGen's per-head policy table for ``text``: ``[layer][kv head] -> {policy, kept}``.

    Runs one prefill with a :class:`FastGenCache` (keyword arguments go to it) and releases its
    pages before returning.
    """
    ids = tokenizer(text, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    cache = FastGenCache(model, tokenizer, **kwargs)
    try:
        with torch.no_grad():
            model(ids, **{cache_keyword(model): cache}, use_cache=True)
        return cache.stats()["policies"]
    finally:
        cache.release()
