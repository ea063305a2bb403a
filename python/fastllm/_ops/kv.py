"""KV-eviction ops: typed wrappers and fake implementations.

Re-exported by :mod:`fastllm.ops`; the schemas live in ``csrc/registration.cpp`` and the
pure-PyTorch references in :mod:`fastllm._reference.kv`. Compaction of kept entries and appends
during decode reuse the page pool's ``pool_gather`` / ``pool_write``: they already move whole rows
between pool slots and dense tensors, which is all either needs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import require_kernels_for as _require_kernels_for

__all__ = ["kv_attention_scores", "kv_evict_round", "kv_policy_recovery", "kv_ragged_decode",
           "kv_decode_plan", "kv_decode_step"]


def kv_attention_scores(q: Tensor, k: Tensor, scale: float, chunk: int = 128) -> Tensor:
    """Attention each key receives, summed over its KV head's query group and all queries.

    Args:
        q: ``[Hq, Lq, D]`` queries of the last ``Lq`` positions (after rotary embedding).
        k: ``[Hkv, Lk, D]`` keys, ``Hq % Hkv == 0``; causal: query ``i`` sees keys
            ``0 .. Lk - Lq + i``.
        scale: logit scale (``head_dim ** -0.5``).
        chunk: query rows processed at a time; bounds the working set to ``[Hq, chunk, Lk]``.

    Returns ``[Hkv, Lk]`` float32, accumulated in float32.

    Example: every query's probabilities sum to one, so the scores of a KV head add up to its
    query group's size times the number of queries.

    >>> torch.manual_seed(0) and None
    >>> q, k = torch.randn(4, 5, 8), torch.randn(2, 7, 8)   # 4 query heads over 2 KV heads
    >>> scores = fastllm.ops.kv_attention_scores(q, k, 8 ** -0.5)
    >>> scores.shape, torch.allclose(scores.sum(1), torch.tensor([10.0, 10.0]))
    (torch.Size([2, 7]), True)
    """
    _require_kernels_for(q, "kv_attention_scores")
    return torch.ops.fastllm.kv_attention_scores.default(q, k, scale, chunk)


def kv_policy_recovery(q: Tensor, k: Tensor, key_class: Tensor, window: int, scale: float,
                       chunk: int = 128) -> Tensor:
    """Share of each KV head's attention mass kept by FastGen's cumulative policies.

    ``key_class`` is ``[Hkv, Lk]`` uint8 (bits 1 special, 2 punctuation, 4 heavy hitter); a key is
    local to a query at position ``p`` when ``p - j < window``. Returns ``[Hkv, 4]`` float32: the
    mean over group heads and queries of the mass kept by special, +punct, +local, +frequency.

    Example: a window as long as the keys keeps every query's whole mass from the third policy
    on.

    >>> torch.manual_seed(0) and None
    >>> q, k = torch.randn(2, 6, 8), torch.randn(1, 6, 8)
    >>> cls = torch.zeros(1, 6, dtype=torch.uint8)
    >>> recovery = fastllm.ops.kv_policy_recovery(q, k, cls, window=6, scale=8 ** -0.5)
    >>> recovery[0, 2:].tolist()
    [1.0, 1.0]
    """
    _require_kernels_for(q, "kv_policy_recovery")
    return torch.ops.fastllm.kv_policy_recovery.default(q, k, key_class, window, scale, chunk)


def kv_ragged_decode(q: Tensor, kv_rows: Tensor, page_table: Tensor, lengths: Tensor,
                     page_rows: int, scale: float, num_splits: int = 1,
                     work: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Decode attention of one query per sequence over ragged per-(sequence, KV head) caches.

    Args:
        q: ``[B, Hq, D]``.
        kv_rows: ``[num_slots, 2 * D]`` pool row view; a row holds one entry's key then value.
        page_table: int32 ``[B * Hkv, max_pages]``; cache ``c = b * Hkv + h``; unused tail
            entries must still be valid page ids (0 will do).
        lengths: int32 ``[B * Hkv]`` entries held by each cache (its own length).
        page_rows: entries per page.
        scale: logit scale.
        num_splits: even splits of each cache's entries, merged by log-sum-exp (long caches).
        work: instead of even splits, a work list: int32 ``[items, 2]`` rows ``(cache, first
            entry)``, sorted by cache, every cache present with a first item at entry 0 and
            increasing first entries; an item runs to the next item of its cache, a cache's last
            item to the cache's length (so a list planned from length bounds stays valid as the
            caches grow). :func:`kv_decode_plan` builds one balanced over the GPU's SMs.
            ``num_splits`` must then be 1. The result is the same either way, up to rounding.

    Returns ``(out [B, Hq, D], lse float32 [B, Hq], scores float32 [B * Hkv, max_pages *
    page_rows])``, where ``scores`` is each entry's probability summed over the query group (the
    heavy-hitter statistic), zero past each length.

    Index values (``lengths`` in ``[0, max_pages * page_rows]``, the page ids a cache uses in
    ``[0, num_slots / page_rows)``) raise ``IndexError`` for CPU tensors. For CUDA tensors they are
    checked only under :func:`fastllm.ops.checked_indices` (each check synchronises); otherwise the
    kernel treats a cache with a bad length as empty and gives no probability to an entry on a bad
    page, never touching memory outside the tensors, and
    :func:`fastllm.ops.raise_index_errors` reports it later. Nothing here synchronises.

    Example: two caches of 3 and 1 entries on pages of 2 rows, against plain attention.

    >>> torch.manual_seed(0) and None
    >>> rows = torch.randn(8, 2 * 4)                   # 4 pages of 2 slots, key | value, D = 4
    >>> table = torch.tensor([[3, 1], [0, 0]], dtype=torch.int32)
    >>> lengths = torch.tensor([3, 1], dtype=torch.int32)
    >>> q = torch.randn(1, 2, 4)                       # B = 1, one query head per KV head
    >>> out, lse, scores = fastllm.ops.kv_ragged_decode(q, rows, table, lengths, 2, 0.5)
    >>> kv = rows[[6, 7, 2]]                           # cache 0: page 3's slots, then page 1's
    >>> want = torch.softmax(q[0, 0] @ kv[:, :4].T * 0.5, -1) @ kv[:, 4:]
    >>> torch.allclose(out[0, 0], want, atol=1e-6), scores[1].tolist()
    (True, [1.0, 0.0, 0.0, 0.0])
    """
    _require_kernels_for(q, "kv_ragged_decode")
    return torch.ops.fastllm.kv_ragged_decode.default(q, kv_rows, page_table, lengths, page_rows,
                                                      scale, num_splits, work)


def kv_decode_plan(bounds, sms: int) -> tuple[int, Tensor]:
    """A balanced :func:`kv_ragged_decode` work list from upper bounds of the caches' lengths.

    Args:
        bounds: ``[caches]`` integers (a sequence, numpy array or CPU tensor), each at least the
            cache's length when the list is used (a larger length stays correct, only less
            balanced).
        sms: the GPU's streaming multiprocessor count.

    Returns ``(chunk, work)``: every cache cut into items of ``chunk`` entries (its last item
    open-ended), ``chunk`` chosen so the items fill two waves of decode blocks (kv_math.h,
    ``plan_decode_work``); ``work`` is an int32 CPU tensor ``[items, 2]``.

    Example: three caches cut into items for a GPU of 4 SMs; every cache starts at entry 0.

    >>> chunk, work = fastllm.ops.kv_decode_plan([100, 30, 0], sms=4)
    >>> work[:, 0].unique().tolist(), bool((work[work[:, 1] == 0, 0] == torch.arange(3)).all())
    ([0, 1, 2], True)
    """
    import numpy as np

    from .. import _C

    if isinstance(sms, bool) or not isinstance(sms, int) or sms < 1:
        raise ValueError(f"fastllm.kv_decode_plan: sms must be a positive int, got {sms!r}")
    values = np.asarray(bounds.cpu() if isinstance(bounds, Tensor) else bounds)
    if values.ndim != 1 or (values.size and not np.issubdtype(values.dtype, np.integer)):
        raise ValueError("fastllm.kv_decode_plan: bounds must be a 1-D sequence of integers, "
                         f"got shape {values.shape} of {values.dtype}")
    if values.size and (values.min() < 0 or values.max() > np.iinfo(np.int32).max):
        raise ValueError("fastllm.kv_decode_plan: bounds must lie in [0, 2**31), got values in "
                         f"[{values.min()}, {values.max()}]")
    chunk, rows = _C.kv_plan_decode_work(values.astype(np.int64, copy=False), sms)
    return int(chunk), torch.from_numpy(rows)


def kv_evict_round(pos: Tensor, score: Tensor, flags: Tensor, lengths: Tensor,
                   step_scores: Tensor, newest: Tensor, window: Tensor, heavy: Tensor,
                   grow: Tensor) -> Tensor:
    """One decode step's eviction over ``C`` ragged caches' bookkeeping, in place.

    Args:
        pos: int64 ``[C, capacity]`` token position of each entry (entry ``e`` in column ``e``).
        score: float32 ``[C, capacity]`` accumulated attention (the heavy-hitter statistic).
        flags: uint8 ``[C, capacity]``: class bits (1 special, 2 punctuation) and 8 = kept for
            good by the cache's policy.
        lengths: int64 ``[C]`` entries held; the first ``lengths[c]`` columns are valid.
        step_scores: float32 ``[C, W]`` added into ``score`` first (``[C, 0]`` for none).
        newest: int64 ``[C]`` the newest token's position in each cache's sequence.
        window, heavy: int64 ``[C]`` the policy's local window and heavy-hitter count.
        grow: bool ``[C]`` caches that never evict.

    A cache evicts when it does not grow and more than ``heavy`` of its entries are evictable
    (flag 8 clear, ``newest - pos >= window``): the lowest-score one, the first on ties; its last
    entry's bookkeeping moves into the hole and ``lengths`` drops by one. Returns int64 ``[C, 2]``
    (victim, last) per cache, -1 where none was evicted: the caller moves the pool rows likewise.

    ``lengths`` outside ``[0, capacity]`` and a negative ``heavy`` raise for CPU tensors; for CUDA
    tensors only under :func:`fastllm.ops.checked_indices`, otherwise a cache with a bad length
    is left alone and reported to :func:`fastllm.ops.raise_index_errors`, and a cache never evicts
    without a victim. Nothing here synchronises.

    Example: one cache over its budget (heavy 1) evicts its lowest-score evictable entry, and
    its last entry takes the hole.

    >>> pos, score = torch.tensor([[0, 1, 2, 3]]), torch.tensor([[0.5, 0.1, 0.9, 0.0]])
    >>> flags, lengths = torch.zeros(1, 4, dtype=torch.uint8), torch.tensor([4])
    >>> one = torch.ones(1, dtype=torch.int64)
    >>> moves = fastllm.ops.kv_evict_round(pos, score, flags, lengths, torch.zeros(1, 0),
    ...                                    3 * one, window=one, heavy=one,
    ...                                    grow=torch.zeros(1, dtype=torch.bool))
    >>> moves.tolist(), lengths.tolist(), pos[0, :3].tolist()
    ([[1, 3]], [3], [0, 3, 2])
    """
    _require_kernels_for(pos, "kv_evict_round")
    return torch.ops.fastllm.kv_evict_round.default(pos, score, flags, lengths, step_scores,
                                                    newest, window, heavy, grow)


def kv_decode_step(q: Tensor, new_rows: Tensor, new_pos: Tensor, new_class: Tensor,
                   kv_rows: Tensor, page_table: Tensor, lengths: Tensor, pos: Tensor,
                   score: Tensor, flags: Tensor, keep_classes: Tensor, sinks: Tensor,
                   window: Tensor, heavy: Tensor, grow: Tensor, page_rows: int, scale: float,
                   num_splits: int = 1, work: Tensor | None = None,
                   capacity: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One decode step of ``C = B * Hkv`` ragged caches in one op, in place: append, attend,
    score, evict.

    1. Append: cache ``c``'s new entry (key | value row ``new_rows[c]`` of ``[C, 2 * D]``,
       position ``new_pos[c]`` int64, class bits ``new_class[c]`` uint8) goes to entry
       ``lengths[c]`` with score 0 and flags ``class | 8`` where the policy keeps it for good
       (``new_class & keep_classes != 0`` or ``new_pos < sinks``); ``lengths`` grows by one. With
       ``capacity`` (int64 ``[C]``, graph steps where the host cannot know the lengths) it goes to
       ``min(lengths[c], capacity[c] - 1)``: a full cache overwrites its last entry.
    2. Attend: :func:`kv_ragged_decode` of ``q`` ``[B, Hq, D]`` over the caches (``page_table``,
       ``page_rows``, ``scale``, ``num_splits``, ``work`` as there), each entry's probability
       summed over the query group added into ``score``.
    3. Evict: :func:`kv_evict_round`'s rule with ``newest = new_pos`` (``window``, ``heavy``,
       ``grow``), and the pool row of each evicting cache's last entry moved into the hole.

    ``kv_rows``, ``lengths`` (int64 ``[C]``), ``pos``, ``score`` and ``flags`` (``[C, capacity
    columns]`` as in :func:`kv_evict_round`) are updated in place. Returns ``(out [B, Hq, D],
    moves int64 [C, 2])``: the attention output and (victim, last) per cache, -1 where none was
    evicted.

    Every cache needs room for its entry: ``lengths < min(columns, pages * page_rows)`` (with
    ``capacity``: ``capacity`` in ``[1, min(columns, pages * page_rows)]``). Index values raise
    ``IndexError`` for CPU tensors before anything is written; for CUDA tensors they are checked
    only under :func:`fastllm.ops.checked_indices`, otherwise a cache without room is left
    unchanged, attends as empty and is reported to :func:`fastllm.ops.raise_index_errors`.
    Nothing here synchronises.

    Example: one cache of 3 entries with room for 4 (one page), a budget of one heavy hitter and
    no local window: the new entry is appended and attended to, then entry 1 (the lowest score
    of the four even after this step's probabilities are added) leaves, the new last entry
    taking its place.

    >>> torch.manual_seed(0) and None
    >>> rows, table = torch.randn(4, 2 * 4), torch.zeros(1, 1, dtype=torch.int32)
    >>> lengths, pos = torch.tensor([3]), torch.tensor([[0, 1, 2, 0]])
    >>> score, flags = torch.tensor([[5.0, -1.0, 7.0, 0.0]]), torch.zeros(1, 4, dtype=torch.uint8)
    >>> one, zero = torch.ones(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    >>> out, moves = fastllm.ops.kv_decode_step(
    ...     torch.randn(1, 1, 4), torch.randn(1, 8), new_pos=3 * one,
    ...     new_class=torch.zeros(1, dtype=torch.uint8), kv_rows=rows, page_table=table,
    ...     lengths=lengths, pos=pos, score=score, flags=flags,
    ...     keep_classes=torch.zeros(1, dtype=torch.uint8), sinks=zero, window=zero,
    ...     heavy=2 * one, grow=torch.zeros(1, dtype=torch.bool), page_rows=4, scale=0.5)
    >>> out.shape, moves.tolist(), lengths.tolist(), pos[0, :3].tolist()
    (torch.Size([1, 1, 4]), [[1, 3]], [3], [0, 3, 2])
    """
    _require_kernels_for(q, "kv_decode_step")
    return torch.ops.fastllm.kv_decode_step.default(
        q, new_rows, new_pos, new_class, kv_rows, page_table, lengths, pos, score, flags,
        keep_classes, sinks, window, heavy, grow, page_rows, scale, num_splits, work, capacity)


@torch.library.register_fake("fastllm::kv_attention_scores")
def _scores_fake(q, k, scale, chunk):
    return q.new_empty((k.shape[0], k.shape[1]), dtype=torch.float32)


@torch.library.register_fake("fastllm::kv_policy_recovery")
def _recovery_fake(q, k, key_class, window, scale, chunk):
    return q.new_empty((k.shape[0], 4), dtype=torch.float32)


@torch.library.register_fake("fastllm::kv_evict_round")
def _evict_fake(pos, score, flags, lengths, step_scores, newest, window, heavy, grow):
    return lengths.new_empty((pos.shape[0], 2))


@torch.library.register_fake("fastllm::kv_ragged_decode")
def _decode_fake(q, kv_rows, page_table, lengths, page_rows, scale, num_splits, work=None):
    return (q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32),
            q.new_empty((page_table.shape[0], page_table.shape[1] * page_rows),
                        dtype=torch.float32))


@torch.library.register_fake("fastllm::kv_decode_step")
def _decode_step_fake(q, new_rows, new_pos, new_class, kv_rows, page_table, lengths, pos, score,
                      flags, keep_classes, sinks, window, heavy, grow, page_rows, scale,
                      num_splits, work=None, capacity=None):
    return q.new_empty(q.shape), lengths.new_empty((pos.shape[0], 2))
