"""References for the KV-eviction ops (FastGen profiling and ragged decode attention).

Conventions shared with the ops:

* One sequence at a time for profiling: ``q`` is ``[Hq, Lq, D]``, ``k`` is ``[Hkv, Lk, D]`` with
  ``Hq % Hkv == 0`` (query head ``h`` reads KV head ``h // (Hq // Hkv)``). Queries are the last
  ``Lq`` positions of the ``Lk`` keys, so query ``i`` sits at position ``Lk - Lq + i`` and sees keys
  ``0 .. Lk - Lq + i`` (causal).
* ``key_class`` is ``[Hkv, Lk]`` uint8 with bits 1 = special token, 2 = punctuation, 4 = heavy
  hitter of that KV head.
* A ragged paged cache is a pool row view ``kv_rows`` of ``[num_slots, 2 * D]`` (key then value in
  one row), a ``page_table`` ``[B * Hkv, max_pages]`` and ``lengths`` ``[B * Hkv]``: entry ``e`` of
  cache ``c`` lives in slot ``page_table[c, e // page_rows] * page_rows + e % page_rows``.

All accumulation is in float32 and never holds more than ``chunk`` query rows of the attention map.
"""

from __future__ import annotations

import torch
from torch import Tensor

SPECIAL, PUNCT, HEAVY = 1, 2, 4
# Cache-entry flags (kv_evict_round): the token's class bits plus KEEP, set when the entry's policy
# keeps it for good (a special or punctuation token the policy keeps, or a sink).
KEEP = 8


def _chunk_probs(q: Tensor, k: Tensor, scale: float, chunk: int):
    """Yield (start, probs [Hq, c, Lk]) for query chunks, causal, float32."""
    hq, lq, _ = q.shape
    hkv, lk, _ = k.shape
    group = hq // hkv
    kf = k.float().repeat_interleave(group, dim=0)
    offset = lk - lq
    keys = torch.arange(lk, device=q.device)
    for start in range(0, lq, chunk):
        qc = q[:, start:start + chunk].float()
        logits = torch.matmul(qc, kf.transpose(1, 2)) * scale
        pos = offset + start + torch.arange(qc.shape[1], device=q.device)
        mask = keys[None, :] > pos[:, None]
        logits = logits.masked_fill(mask, float("-inf"))
        yield start, pos, torch.softmax(logits, dim=-1)


def kv_attention_scores_reference(q: Tensor, k: Tensor, scale: float, chunk: int = 128) -> Tensor:
    """Accumulated attention each key receives: sum over the KV head's query group and all
    queries of the softmax probabilities. ``[Hkv, Lk]`` float32."""
    hq = q.shape[0]
    hkv, lk, _ = k.shape
    acc = torch.zeros(hq, lk, dtype=torch.float32, device=q.device)
    for _, _, probs in _chunk_probs(q, k, scale, chunk):
        acc += probs.sum(dim=1)
    return acc.view(hkv, hq // hkv, lk).sum(dim=1)


def kv_policy_recovery_reference(q: Tensor, k: Tensor, key_class: Tensor, window: int, scale: float,
                                 chunk: int = 128) -> Tensor:
    """Share of attention mass kept by FastGen's cumulative policies, per KV head.

    Column p of the ``[Hkv, 4]`` result is the mean over (group heads x query rows) of the mass on
    keys kept by policy p: 0 special, 1 + punctuation, 2 + locality (keys within ``window`` of the
    query: ``qpos - j < window``), 3 + frequency (keys marked heavy). Full keeps 1.
    """
    hq, lq, _ = q.shape
    hkv, lk, _ = k.shape
    group = hq // hkv
    cls = key_class.to(torch.int32).repeat_interleave(group, dim=0)  # [Hq, Lk]
    special = (cls & SPECIAL) != 0
    punct = ((cls & PUNCT) != 0) & ~special
    heavy = ((cls & HEAVY) != 0) & ~special & ~punct
    keys = torch.arange(lk, device=q.device)
    total = torch.zeros(hq, 4, dtype=torch.float64, device=q.device)
    for _, pos, probs in _chunk_probs(q, k, scale, chunk):
        local = (pos[:, None] - keys[None, :]) < window  # [c, Lk]
        sp = special[:, None, :]
        pu = punct[:, None, :]
        lo = local[None] & ~sp & ~pu
        hv = heavy[:, None, :] & ~local[None]
        parts = [(probs * m).sum(-1) for m in (sp, pu, lo, hv)]  # each [Hq, c]
        stacked = torch.stack(parts, dim=-1).double().sum(dim=1)  # [Hq, 4]
        total += stacked
    cumulative = total.cumsum(dim=-1) / max(lq, 1)
    return cumulative.view(hkv, group, 4).mean(dim=1).float()


def _entry_slots(page_table: Tensor, length: int, page_rows: int, cache: int) -> Tensor:
    e = torch.arange(length, device=page_table.device)
    return page_table[cache, e // page_rows].long() * page_rows + e % page_rows


def kv_ragged_decode_reference(q: Tensor, kv_rows: Tensor, page_table: Tensor, lengths: Tensor,
                               page_rows: int, scale: float, num_splits: int = 1,
                               work: Tensor | None = None):
    """One query token per sequence over ragged per-(sequence, KV head) paged caches. How the
    op divides the work (``num_splits``, ``work``) does not change the result, so both are
    accepted and unused.

    Returns ``out`` ``[B, Hq, D]`` (q's dtype), ``lse`` ``[B, Hq]`` float32 (-inf for an empty
    cache) and ``scores`` ``[B * Hkv, max_pages * page_rows]`` float32: per cached entry, the
    attention probability summed over the KV head's query group (0 past each length).
    """
    b, hq, d = q.shape
    caches = page_table.shape[0]
    hkv = caches // b
    group = hq // hkv
    width = page_table.shape[1] * page_rows
    out = torch.zeros(b, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((b, hq), float("-inf"), dtype=torch.float32, device=q.device)
    scores = torch.zeros(caches, width, dtype=torch.float32, device=q.device)
    for c in range(caches):
        n = int(lengths[c])
        if n == 0:
            continue
        rows = kv_rows[_entry_slots(page_table, n, page_rows, c)].float()
        keys, values = rows[:, :d], rows[:, d:]
        seq, head = divmod(c, hkv)
        qg = q[seq, head * group:(head + 1) * group].float()  # [G, D]
        logits = qg @ keys.T * scale
        lse[seq, head * group:(head + 1) * group] = torch.logsumexp(logits, dim=-1)
        probs = torch.softmax(logits, dim=-1)
        out[seq, head * group:(head + 1) * group] = probs @ values
        scores[c, :n] = probs.sum(0)
    return out.to(q.dtype), lse, scores


def dense_masked_decode_reference(q: Tensor, keys: Tensor, values: Tensor, keep: Tensor,
                                  scale: float) -> Tensor:
    """Dense decode attention over full caches ``[B, Hkv, T, D]`` with evicted entries masked out
    (``keep`` ``[B, Hkv, T]`` bool): what the ragged cache must equal, at full-cache cost."""
    b, hq, d = q.shape
    hkv = keys.shape[1]
    group = hq // hkv
    k = keys.float().repeat_interleave(group, dim=1)
    v = values.float().repeat_interleave(group, dim=1)
    logits = torch.einsum("bhd,bhtd->bht", q.float(), k) * scale
    logits = logits.masked_fill(~keep.repeat_interleave(group, dim=1), float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return torch.einsum("bht,bhtd->bhd", probs, v).to(q.dtype)


def kv_evict_round_reference(pos: Tensor, score: Tensor, flags: Tensor, lengths: Tensor,
                             step_scores: Tensor, newest: Tensor, window: Tensor, heavy: Tensor,
                             grow: Tensor) -> Tensor:
    """One eviction round over ``C`` ragged caches' bookkeeping, in place.

    ``pos`` int64, ``score`` float32 and ``flags`` uint8 are ``[C, capacity]`` (entry ``e`` of cache
    ``c`` in column ``e``, the first ``lengths[c]`` valid); ``step_scores`` float32 ``[C, W]`` is
    added into ``score`` first. A cache evicts when it does not ``grow`` and more than ``heavy`` of
    its entries are evictable: ``KEEP`` clear and ``newest - pos >= window``. Its victim is the
    evictable entry with the lowest score (the first on ties); its last entry moves into the hole
    and its length drops by one. Returns int64 ``[C, 2]``: (victim, last) per cache, -1 where none
    was evicted.
    """
    caches, cap = pos.shape
    width = min(cap, step_scores.shape[1])
    score[:, :width] += step_scores[:, :width] * (torch.arange(width, device=pos.device)
                                                  < lengths[:, None])
    valid = torch.arange(cap, device=pos.device)[None, :] < lengths[:, None]
    evictable = valid & ((flags & KEEP) == 0) & ((newest[:, None] - pos) >= window[:, None])
    over = ~grow & (evictable.sum(1) > heavy)
    victims = score.masked_fill(~evictable, float("inf")).argmin(1)
    moves = torch.full((caches, 2), -1, dtype=torch.int64, device=pos.device)
    for c in over.nonzero().flatten().tolist():
        victim, last = int(victims[c]), int(lengths[c]) - 1
        for field in (pos, score, flags):
            field[c, victim] = field[c, last].clone()
        lengths[c] = last
        moves[c, 0], moves[c, 1] = victim, last
    return moves


def kv_decode_step_reference(q: Tensor, new_rows: Tensor, new_pos: Tensor, new_class: Tensor,
                             kv_rows: Tensor, page_table: Tensor, lengths: Tensor, pos: Tensor,
                             score: Tensor, flags: Tensor, keep_classes: Tensor, sinks: Tensor,
                             window: Tensor, heavy: Tensor, grow: Tensor, page_rows: int,
                             scale: float, num_splits: int = 1, work: Tensor | None = None,
                             capacity: Tensor | None = None):
    """A decode step as its three parts, in place: append each cache's new entry, attend
    (:func:`kv_ragged_decode_reference`), then :func:`kv_evict_round_reference` with this step's
    probabilities and ``newest = new_pos``, moving the pool row of each evicting cache's last
    entry into the hole. Returns ``(out, moves)``."""
    caches = pos.shape[0]
    index = torch.arange(caches, device=pos.device)
    entry = lengths if capacity is None else torch.minimum(lengths, capacity - 1)
    kv_rows[_entry_slot_of(page_table, index, entry, page_rows)] = new_rows
    pos[index, entry] = new_pos
    keep = ((new_class & keep_classes) != 0) | (new_pos < sinks)
    flags[index, entry] = new_class | keep.to(torch.uint8) * KEEP
    score[index, entry] = 0.0
    lengths.copy_(entry + 1)
    out, _, step_scores = kv_ragged_decode_reference(q, kv_rows, page_table, lengths.int(),
                                                     page_rows, scale)
    moves = kv_evict_round_reference(pos, score, flags, lengths, step_scores, new_pos, window,
                                     heavy, grow)
    for c in (moves[:, 0] >= 0).nonzero().flatten().tolist():
        victim, last = moves[c].tolist()
        kv_rows[_entry_slot_of(page_table, c, victim, page_rows)] = \
            kv_rows[_entry_slot_of(page_table, c, last, page_rows)].clone()
    return out, moves


def _entry_slot_of(page_table: Tensor, cache, entry, page_rows: int):
    return page_table[cache, entry // page_rows].long() * page_rows + entry % page_rows
