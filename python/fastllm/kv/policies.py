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
POLICIES = ("fastgen", "full", "streaming", "h2o", "snapkv")


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


def fastgen_profile(q: Tensor, k: Tensor, classes: Tensor, scale: float, recovery: float,
                    locality: float, frequency: float, chunk: int = 128, heavy_pool: int = 11,
                    observe: int = 64):
    """Profile one sequence's KV heads and give each FastGen's cheapest sufficient policy.

    ``q`` ``[Hq, L, D]``, ``k`` ``[Hkv, L, D]`` (after RoPE), ``classes`` ``[L]`` uint8,
    ``heavy_pool`` odd: see :func:`heavy_scores`. ``observe``: the last prompt queries that stand
    for the decode queries to come (0: none, as in the FastGen paper). Their attention counts as
    much as all the prompt's in the heavy-hitter ranking, and a policy must recover ``recovery`` of
    their attention as well as of the whole prompt's.

    Deviation from the paper, and why: FastGen ranks and checks by the whole prompt's attention,
    most of which comes from queries reading nearby text. A fact that only the closing question
    asks for gets almost none of it, so heads keep fragments of the fact and lose it. The last
    queries attend the way decode will (SnapKV's observation). Measured against the paper's
    settings (heavy_pool=1, observe=0) in bench/bench_kv.py and, on held-out needles too, in
    bench/kv_settings_study.py.

    Returns ``(policies, kept positions per head, heavy-hitter scores [Hkv, L], recovery
    [Hkv, 4])``.
    """
    from .._ops import kv as kv_ops

    length = k.shape[1]
    window = math.ceil(locality * length)
    heavy = math.ceil(frequency * length)
    classes = classes.cpu()
    raw = kv_ops.kv_attention_scores(q, k, scale, chunk).cpu()
    observe = min(observe, length)
    if observe:
        last = kv_ops.kv_attention_scores(q[:, -observe:], k, scale, chunk).cpu()
        raw = raw + last * (length / observe)
    scores = heavy_scores(raw, heavy_pool)
    hmask = heavy_mask(scores, classes[None], heavy, length - window)
    key_class = (classes[None] | (hmask.to(torch.uint8) * HEAVY)).to(torch.uint8)
    # Recovery is measured on the queries the local window no longer covers entirely: on the
    # first `window` rows locality keeps everything by construction, which would flatter it, and
    # decode queries (which the policy will serve) all lie past the window.
    first = min(window, length - 1)
    key_class = key_class.to(q.device)
    rec = kv_ops.kv_policy_recovery(q[:, first:], k, key_class, window, scale, chunk).cpu()
    if observe:
        last_rec = kv_ops.kv_policy_recovery(q[:, -observe:], k, key_class, window, scale, chunk)
        rec = torch.minimum(rec, last_rec.cpu())
    picks = select_fastgen(rec, recovery)
    policies, kept = [], []
    for h, pick in enumerate(picks):
        p = fastgen_head_policy(pick, window, int(hmask[h].sum()))
        policies.append(p)
        kept.append(kept_at_prefill(p, classes, hmask[h] if p.heavy else None, None))
    return policies, kept, scores, rec


__all__ = ["fastgen_profile", "heavy_scores", "FASTGEN_POLICIES", "POLICIES", "HeadPolicy", "HEAVY", "budget_tokens", "check_ratio",
           "heavy_mask", "select_fastgen", "token_classes", "fastgen_head_policy",
           "kept_at_prefill"]
