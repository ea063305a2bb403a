"""Per-head KV policies: FastGen's greedy selection and the fixed baselines.

A policy is a rule for which entries of one KV head's cache survive, applied at the end of the
prompt (compaction) and after every decode step (eviction):

* protected entries always stay: special tokens, punctuation tokens, the first ``sinks`` positions;
* entries within ``window`` positions of the newest token stay (the window slides);
* of the rest, the ``heavy`` entries with the largest accumulated attention stay;
* ``grow`` caches never evict (full, and SnapKV after its prefill selection).

FastGen's candidates, cheapest first: special -> +punct -> +local -> +frequency -> full. A KV head
takes the first whose kept keys recover at least ``T`` of the attention mass of its query group.
"""

from __future__ import annotations

import functools
import math
import unicodedata
from dataclasses import dataclass

import torch
from torch import Tensor

from .._reference.kv import HEAVY, PUNCT, SPECIAL

FASTGEN_POLICIES = ("special", "special+punct", "special+punct+local",
                    "special+punct+local+frequency", "full")
POLICIES = ("fastgen", "full", "streaming", "h2o", "snapkv", "adakv")
# Which prompt queries FastGen's heavy-hitter ranking and recovery check read: all of them (the
# paper), the last ``observe`` (the observation window, SnapKV's), or both.
QUERY_SOURCES = ("prompt", "observed", "both")


@dataclass(frozen=True)
class HeadPolicy:
    name: str
    keep_special: bool = False
    keep_punct: bool = False
    sinks: int = 0
    window: int = 0
    heavy: int = 0
    grow: bool = False


def check_ratio(name: str, value: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise TypeError(f"fastllm.kv: {name} must be a number, got {value!r}")
    if low_open:
        if not 0.0 < value <= 1.0:
            raise ValueError(f"fastllm.kv: {name} must lie in (0, 1], got {value}")
    elif not 0.0 <= value <= 1.0:
        raise ValueError(f"fastllm.kv: {name} must lie in [0, 1], got {value}")
    return float(value)


def budget_tokens(budget: float | int, prompt_len: int) -> int:
    """A budget given as a ratio of the prompt (float in (0, 1]) or a token count (int > 0)."""
    if isinstance(budget, bool):
        raise TypeError(f"fastllm.kv: budget must be a ratio or a token count, got {budget!r}")
    if isinstance(budget, int):
        if budget <= 0:
            raise ValueError(f"fastllm.kv: a token budget must be positive, got {budget}")
        return budget
    check_ratio("budget", budget, low_open=True)
    return max(1, math.ceil(budget * prompt_len))


@functools.lru_cache(maxsize=8)
def _punctuation_ids(tokenizer) -> frozenset:
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    ids = set()
    for i, text in enumerate(texts):
        stripped = text.strip()
        if stripped and all(unicodedata.category(ch).startswith("P") for ch in stripped):
            ids.add(i)
    return frozenset(ids)


@functools.lru_cache(maxsize=8)
def _class_table(tokenizer) -> Tensor:
    """uint8 class bits per vocabulary id, built once per tokenizer: decode steps look their
    token up in it instead of rebuilding the special and punctuation sets (a quarter of a decode
    step's time on SmolLM2 when they were rebuilt per layer)."""
    special = sorted(set(tokenizer.all_special_ids))
    punct = sorted(_punctuation_ids(tokenizer))
    table = torch.zeros(max([len(tokenizer)] + [i + 1 for i in special]), dtype=torch.uint8)
    table[torch.tensor(punct, dtype=torch.int64)] |= PUNCT
    table[torch.tensor(special, dtype=torch.int64)] |= SPECIAL
    return table


def token_classes(tokenizer, input_ids: Tensor) -> Tensor:
    """uint8 class bits per token (1 special, 2 punctuation) for ids of any shape; ids the
    tokenizer does not know (a model's padded vocabulary) are neither."""
    table = _class_table(tokenizer)
    ids = input_ids.detach().to("cpu", torch.int64)
    known = (ids >= 0) & (ids < table.shape[0])
    out = torch.zeros(ids.shape, dtype=torch.uint8)
    out[known] = table[ids[known]]
    return out.to(input_ids.device)


def heavy_mask(scores: Tensor, classes: Tensor, count: int, exclude_from: int) -> Tensor:
    """[Hkv, L] bool: per head, the ``count`` keys with the largest scores among those that are not
    special or punctuation and lie before position ``exclude_from`` (the final local window)."""
    hkv, length = scores.shape
    mask = torch.zeros(hkv, length, dtype=torch.bool, device=scores.device)
    eligible = (classes == 0).expand(hkv, length).clone()
    eligible[:, exclude_from:] = False
    count = min(count, int(eligible[0].sum()))
    if count <= 0:
        return mask
    masked = scores.masked_fill(~eligible, float("-inf"))
    mask.scatter_(1, masked.topk(count, dim=1).indices, True)
    return mask


def select_fastgen(recovery: Tensor, threshold: float) -> list[int]:
    """Index into FASTGEN_POLICIES per KV head: the first policy recovering >= threshold."""
    picks = []
    for row in recovery.tolist():
        pick = next((i for i, r in enumerate(row) if r >= threshold), len(FASTGEN_POLICIES) - 1)
        picks.append(pick)
    return picks


def fastgen_head_policy(index: int, window: int, heavy: int) -> HeadPolicy:
    name = FASTGEN_POLICIES[index]
    if name == "full":
        return HeadPolicy(name, grow=True)
    return HeadPolicy(name, keep_special=True, keep_punct=index >= 1,
                      window=window if index >= 2 else 0, heavy=heavy if index >= 3 else 0)


def kept_at_prefill(policy: HeadPolicy, classes: Tensor, heavy_row: Tensor | None,
                    scores_row: Tensor | None) -> Tensor:
    """Positions (sorted int64) one head keeps at the end of a prompt of len(classes) tokens."""
    length = classes.shape[0]
    if policy.grow and policy.name == "full":
        return torch.arange(length, device=classes.device)
    pos = torch.arange(length, device=classes.device)
    keep = torch.zeros(length, dtype=torch.bool, device=classes.device)
    if policy.keep_special:
        keep |= (classes & SPECIAL) != 0
    if policy.keep_punct:
        keep |= (classes & PUNCT) != 0
    keep |= pos < policy.sinks
    if policy.window:
        keep |= pos >= length - policy.window
    if heavy_row is not None:
        keep |= heavy_row
    elif policy.heavy and scores_row is not None:
        rest = scores_row.masked_fill(keep, float("-inf"))
        count = min(policy.heavy, int((~keep).sum()))
        if count > 0:
            keep[rest.topk(count).indices] = True
    return pos[keep]


def heavy_scores(scores: Tensor, pool: int) -> Tensor:
    """Heavy-hitter ranking of the frequency policy: the largest accumulated attention among the
    ``pool`` keys centred on each key, plus the key's own. ``pool`` 1: the accumulated attention
    alone, as in the FastGen paper.

    Deviation from the paper, and why: a fact in the prompt is a phrase, and the prompt's queries
    attend mostly to one or two of its tokens (the rest get little until a question asks for the
    fact, and then a copying head reads it token by token), so a ranking by single keys keeps
    fragments of it. Ranking by the neighbourhood's strongest key keeps the phrase around a heavy
    hitter whole; adding the key's own score puts every heavy hitter ahead of its neighbours, so
    when slots run short the hitters themselves stay. (A neighbourhood mean instead, as SnapKV
    pools, ranks the keys between two hitters above both.) The pool only reorders which keys the
    frequency policy keeps, never how many. The default, 11, covers a short sentence: with 7,
    four-digit numbers lost their last digits (bench/kv_needle_heads.py). Measured in
    bench/bench_kv.py against the paper's ranking."""
    if pool <= 1:
        return scores
    strongest = torch.nn.functional.max_pool1d(scores[:, None].float(), pool, 1, pool // 2)[:, 0]
    return strongest + scores


def adaptive_budgets(scores: Tensor, eligible: Tensor, total: int, floor: float = 0.2) -> Tensor:
    """Per-head counts ``[Hkv]`` (int64) of one layer's ``total`` selected keys, allotted by
    score mass as in AdaKV (Feng et al., 2024): each head first gets its top ``floor`` share of a
    uniform split (``floor * total / Hkv`` keys, AdaKV's safeguard), then the rest go to the
    keys with the largest scores over all heads together, so a head whose attention concentrates
    on few keys gives slots to one that spreads it. ``scores`` ``[Hkv, L]`` must be comparable
    across heads (summed softmax probabilities of the same queries are: every head's rows sum to
    the same mass); ``eligible`` ``[Hkv, L]`` bool marks the keys that may be selected.
    ``floor`` 1 gives every head the same count (a uniform budget, SnapKV's)."""
    if scores.dim() != 2 or eligible.shape != scores.shape:
        raise ValueError(f"fastllm.kv: adaptive_budgets: scores {tuple(scores.shape)} and "
                         f"eligible {tuple(eligible.shape)} must both be [Hkv, L]")
    if eligible.dtype != torch.bool:
        raise TypeError(f"fastllm.kv: adaptive_budgets: eligible must be bool, got {eligible.dtype}")
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"fastllm.kv: adaptive_budgets: total must be an int >= 0, got {total!r}")
    floor = check_ratio("floor", floor)
    hkv, length = scores.shape
    avail = eligible.sum(1).to(torch.int64)
    total = min(total, int(avail.sum()))
    guaranteed = torch.minimum(torch.full_like(avail, int(floor * total / max(hkv, 1))), avail)
    masked = scores.float().masked_fill(~eligible, float("-inf"))
    order = masked.argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(length, device=scores.device).expand(hkv, length))
    taken = (rank < guaranteed[:, None]) & eligible
    rest = total - int(guaranteed.sum())
    counts = guaranteed.clone()
    if rest > 0:
        free = masked.masked_fill(taken, float("-inf")).flatten()
        picks = free.topk(rest).indices // length
        counts += torch.bincount(picks, minlength=hkv).to(counts.device)
    return counts


def snapkv_scores(q: Tensor, k: Tensor, scale: float, window: int, chunk: int = 128) -> Tensor:
    """SnapKV's ranking ``[Hkv, L]``: the attention of the last ``window`` queries, averaged over
    7 neighbouring keys (so a selected key brings its neighbours)."""
    from .._ops import kv as kv_ops

    window_scores = kv_ops.kv_attention_scores(q[:, -window:], k, scale, chunk).cpu()
    return torch.nn.functional.avg_pool1d(window_scores[:, None], 7, 1, 3,
                                          count_include_pad=False)[:, 0]


def adakv_policies(scores: Tensor, length: int, budget: int, window: int,
                   floor: float = 0.2) -> list[HeadPolicy]:
    """AdaKV on SnapKV's scores: every head keeps the last ``window`` prompt tokens, and the
    layer's ``Hkv * (budget - window)`` other slots are allotted across its heads by
    :func:`adaptive_budgets` (each head then keeps its top-scored keys). The same memory as
    SnapKV at ``budget``, up to page rounding; ``floor`` 1 is SnapKV."""
    hkv = scores.shape[0]
    eligible = torch.zeros(hkv, length, dtype=torch.bool)
    eligible[:, :length - window] = True
    counts = adaptive_budgets(scores, eligible, hkv * max(budget - window, 0), floor)
    return [HeadPolicy("adakv", window=window, heavy=int(c), grow=True) for c in counts.tolist()]


def _check_source(name: str, value: str) -> str:
    if value not in QUERY_SOURCES:
        raise ValueError(f"fastllm.kv: {name} must be one of {QUERY_SOURCES}, got {value!r}")
    return value


def fastgen_profile(q: Tensor, k: Tensor, classes: Tensor, scale: float, recovery: float,
                    locality: float, frequency: float, chunk: int = 128, heavy_pool: int = 11,
                    observe: int = 64, heavy_from: str = "observed", recovery_on: str = "both",
                    adaptive: bool = False, adaptive_floor: float = 0.2, heavy_fit: bool = False):
    """Profile one sequence's KV heads and give each FastGen's cheapest sufficient policy.

    ``q`` ``[Hq, L, D]``, ``k`` ``[Hkv, L, D]`` (after RoPE), ``classes`` ``[L]`` uint8,
    ``heavy_pool`` odd: see :func:`heavy_scores`. ``observe``: the last prompt queries that stand
    for the decode queries to come (0: none, as in the FastGen paper). ``heavy_from`` (which
    queries' attention ranks the heavy hitters) and ``recovery_on`` (whose attention a policy
    must recover ``recovery`` of) each take ``"prompt"`` (all the prompt's queries, the paper),
    ``"observed"`` (the last ``observe`` only) or ``"both"`` (in the ranking the observed
    queries count as much as the whole prompt; a policy must recover ``recovery`` of both).
    Defaults: ``heavy_from="observed"``, ``recovery_on="both"``. With ``observe`` 0 both fall
    back to ``"prompt"``.

    Deviation from the paper, and why: FastGen ranks and checks by the whole prompt's attention,
    most of which comes from queries reading nearby text. A fact that only the closing question
    asks for gets almost none of it, so heads keep fragments of the fact and lose it. The last
    queries attend the way decode will (SnapKV's observation). ``"observed"`` goes further: a
    ranking or check that no longer depends on where the rest of the prompt's attention happened
    to go. On the retrieval suite's two splits (bench/kv_retrieval.py --variants) the ranking by
    the observed queries alone kept 14 and 15 of 35 needles where "both" kept 11 and 7 (SnapKV
    16 and 16) at about one point more memory; the check on the observed queries alone kept
    fewer (9 and 7), so the check stays on both. The paper's settings (heavy_pool=1,
    observe=0) stay reachable.

    ``adaptive``: the heads that take the frequency policy pool their heavy-hitter slots (each
    ``ceil(frequency * L)``) and :func:`adaptive_budgets` allots the pool across them by the
    mass of the (unpooled) heavy-hitter scores, AdaKV-style, with ``adaptive_floor`` of a
    uniform share guaranteed per head (the paper: off, every frequency head gets the same
    count). The policies are chosen with the uniform count first.

    ``heavy_fit``: each head that takes the frequency policy then keeps only the fewest of its
    top-ranked heavy hitters with which the policy still recovers ``recovery`` (on the same
    queries as the choice), found by bisection (recovery only grows with the count); the paper
    (off) keeps ``ceil(frequency * L)`` for every such head. It costs about log2 of that count
    more recovery passes per frequency head at prefill.

    Returns ``(policies, kept positions per head, heavy-hitter scores [Hkv, L], recovery
    [Hkv, 4])``.
    """
    from .._ops import kv as kv_ops

    heavy_from = _check_source("heavy_from", heavy_from)
    recovery_on = _check_source("recovery_on", recovery_on)
    adaptive_floor = check_ratio("adaptive_floor", adaptive_floor)
    length = k.shape[1]
    window = math.ceil(locality * length)
    heavy = math.ceil(frequency * length)
    classes = classes.cpu()
    observe = min(observe, length)
    if not observe:
        heavy_from = recovery_on = "prompt"
    raw = None
    if heavy_from != "observed":
        raw = kv_ops.kv_attention_scores(q, k, scale, chunk).cpu()
    if heavy_from != "prompt":
        last = kv_ops.kv_attention_scores(q[:, -observe:], k, scale, chunk).cpu()
        raw = last * (length / observe) if raw is None else raw + last * (length / observe)
    scores = heavy_scores(raw, heavy_pool)
    hmask = heavy_mask(scores, classes[None], heavy, length - window)
    key_class = (classes[None] | (hmask.to(torch.uint8) * HEAVY)).to(torch.uint8)
    # Recovery is measured on the queries the local window no longer covers entirely: on the
    # first `window` rows locality keeps everything by construction, which would flatter it, and
    # decode queries (which the policy will serve) all lie past the window.
    first = min(window, length - 1)
    key_class = key_class.to(q.device)
    rec = None
    if recovery_on != "observed":
        rec = kv_ops.kv_policy_recovery(q[:, first:], k, key_class, window, scale, chunk).cpu()
    if recovery_on != "prompt":
        last_rec = kv_ops.kv_policy_recovery(q[:, -observe:], k, key_class, window, scale,
                                             chunk).cpu()
        rec = last_rec if rec is None else torch.minimum(rec, last_rec)
    picks = select_fastgen(rec, recovery)
    frequent = [h for h, pick in enumerate(picks) if pick == 3]
    if adaptive and len(frequent) > 1:
        rows = torch.tensor(frequent)
        eligible = hmask.new_zeros(len(frequent), length)
        eligible[:, :length - window] = classes[None, :length - window] == 0
        counts = adaptive_budgets(raw[rows], eligible,
                                  int(hmask[rows].sum()), adaptive_floor)
        for h, count in zip(frequent, counts.tolist()):
            hmask[h] = heavy_mask(scores[h:h + 1], classes[None], count, length - window)[0]
    if heavy_fit:
        group = q.shape[0] // k.shape[0]

        def recovers(h: int, count: int) -> bool:
            mask = heavy_mask(scores[h:h + 1], classes[None], count, length - window)
            head_class = (classes[None] | (mask.to(torch.uint8) * HEAVY)).to(q.device)
            qh, kh = q[h * group:(h + 1) * group], k[h:h + 1]
            kept_mass = []
            if recovery_on != "observed":
                kept_mass.append(kv_ops.kv_policy_recovery(qh[:, first:], kh, head_class, window,
                                                           scale, chunk)[0, 3])
            if recovery_on != "prompt":
                kept_mass.append(kv_ops.kv_policy_recovery(qh[:, -observe:], kh, head_class,
                                                           window, scale, chunk)[0, 3])
            return bool(min(float(m) for m in kept_mass) >= recovery)

        for h in frequent:
            low, high = 0, int(hmask[h].sum())
            while low < high:
                mid = (low + high) // 2
                low, high = (low, mid) if recovers(h, mid) else (mid + 1, high)
            hmask[h] = heavy_mask(scores[h:h + 1], classes[None], low, length - window)[0]
    policies, kept = [], []
    for h, pick in enumerate(picks):
        p = fastgen_head_policy(pick, window, int(hmask[h].sum()))
        policies.append(p)
        kept.append(kept_at_prefill(p, classes, hmask[h] if p.heavy else None, None))
    return policies, kept, scores, rec


__all__ = ["QUERY_SOURCES", "FASTGEN_POLICIES", "POLICIES", "HeadPolicy", "HEAVY",
           "adakv_policies", "adaptive_budgets", "budget_tokens", "check_ratio", "fastgen_profile",
           "fastgen_head_policy", "heavy_mask", "heavy_scores", "kept_at_prefill", "select_fastgen",
           "snapkv_scores", "token_classes"]
