"""Per-head adaptive budgets (AdaKV) and FastGen's query-source options on synthetic attention
with planted patterns."""

import pytest
import torch

from fastllm.kv.policies import (
    adakv_policies,
    adaptive_budgets,
    fastgen_profile,
    kept_at_prefill,
    snapkv_scores,
)


def test_budgets_follow_score_mass():
    # Head 0 puts its mass on 2 keys, head 1 spreads it over 20: with no floor the layer's 12
    # slots go where the mass is, 2 and 10; a full floor splits them evenly (SnapKV's budget).
    scores = torch.full((2, 40), 1e-4)
    scores[0, [4, 9]] = 5.0
    scores[1, 10:30] = 0.5
    eligible = torch.ones(2, 40, dtype=torch.bool)
    assert adaptive_budgets(scores, eligible, 12, floor=0.0).tolist() == [2, 10]
    assert adaptive_budgets(scores, eligible, 12, floor=1.0).tolist() == [6, 6]
    # the floor guarantees each head its share of an even split, the rest still by mass
    assert adaptive_budgets(scores, eligible, 12, floor=0.5).tolist() == [3, 9]


def test_budgets_respect_eligibility_and_totals():
    scores = torch.rand(3, 30)
    eligible = torch.ones(3, 30, dtype=torch.bool)
    eligible[0, 5:] = False  # head 0 has only 5 keys to offer
    scores[0] += 10.0  # ... and the highest scores
    counts = adaptive_budgets(scores, eligible, 24, floor=0.2)
    assert int(counts.sum()) == 24 and int(counts[0]) == 5
    assert adaptive_budgets(scores, eligible, 10 ** 6, floor=0.2).tolist() == [5, 30, 30]
    assert adaptive_budgets(scores, eligible, 0).tolist() == [0, 0, 0]


def test_budget_argument_errors():
    scores = torch.rand(2, 8)
    eligible = torch.ones(2, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="total"):
        adaptive_budgets(scores, eligible, -1)
    with pytest.raises(ValueError, match="floor"):
        adaptive_budgets(scores, eligible, 4, floor=1.5)
    with pytest.raises(ValueError, match=r"\[Hkv, L\]"):
        adaptive_budgets(scores, eligible[:, :4], 4)
    with pytest.raises(TypeError, match="eligible"):
        adaptive_budgets(scores, eligible.float(), 4)


def test_snapkv_scores_rank_what_the_last_queries_read():
    n, d = 64, 8
    q = torch.zeros(1, n, d)
    k = torch.zeros(1, n, d)
    k[0, 20, 0] = 1.0
    q[0, -8:, 0] = 12.0
    scores = snapkv_scores(q, k, 1.0, 8)
    assert scores.shape == (1, n)
    top = set(scores[0, :56].topk(7).indices.tolist())
    assert top == set(range(17, 24))  # the key and its pooled neighbours


def test_adakv_gives_slots_to_the_head_that_spreads_its_attention():
    # Head 0's last queries read their own window (kept anyway); head 1's read 12 keys spread
    # over the prompt. 2 * (12 - 8) = 8 selected slots: uniform (SnapKV) keeps 4 per head and
    # loses 8 of head 1's keys; AdaKV gives head 0's unneeded slots to head 1.
    n = 64
    scores = torch.full((2, n), 1e-3)
    scores[0, 56:] = 1.0
    spread = list(range(2, 50, 4))
    scores[1, spread] = 8 / 12
    uniform = adakv_policies(scores, n, 12, 8, floor=1.0)
    adaptive = adakv_policies(scores, n, 12, 8, floor=0.0)
    safeguarded = adakv_policies(scores, n, 12, 8, floor=0.5)
    assert [p.heavy for p in uniform] == [4, 4]
    assert [p.heavy for p in adaptive] == [0, 8]
    assert [p.heavy for p in safeguarded] == [2, 6]
    assert all(p.grow and p.window == 8 and p.name == "adakv" for p in adaptive)
    classes = torch.zeros(n, dtype=torch.uint8)
    kept = [kept_at_prefill(p, classes, None, scores[h]).tolist() for h, p in enumerate(adaptive)]
    assert kept[0] == list(range(56, 64))
    assert set(kept[1]) == set(spread[:8]) | set(range(56, 64)) or \
        len(set(kept[1]) & set(spread)) == 8
    kept_uniform = kept_at_prefill(uniform[1], classes, None, scores[1]).tolist()
    assert len(set(kept_uniform) & set(spread)) == 4


def spread_then_bos_head(n: int = 80, d: int = 8):
    """One head whose prompt queries spread their attention over every key they see, while the
    last 8 queries read only the BOS: the whole prompt needs the full cache, the observed
    queries (the decode's stand-ins) need the special token alone."""
    q = torch.zeros(1, n, d)
    k = torch.zeros(1, n, d)
    k[0, 0, 0] = 1.0
    q[0, -8:, 0] = 20.0
    return q, k, torch.tensor([1] + [0] * (n - 1), dtype=torch.uint8)


def test_recovery_on_chooses_whose_attention_a_policy_must_keep():
    q, k, classes = spread_then_bos_head()
    names = {on: fastgen_profile(q, k, classes, 1.0, 0.9, 0.3, 0.1, heavy_pool=1, observe=8,
                                 recovery_on=on)[0][0].name
             for on in ("prompt", "observed", "both")}
    assert names == {"prompt": "full", "observed": "special", "both": "full"}
    # observe = 0: there are no observed queries, and the paper's check applies
    assert fastgen_profile(q, k, classes, 1.0, 0.9, 0.3, 0.1, observe=0,
                           recovery_on="observed")[0][0].name == "full"


def test_heavy_from_observed_ranks_by_the_last_queries_alone():
    # Every query reads four distractors (positions 2-5); only the last two read the fact at
    # 10. With four heavy slots the whole prompt's ranking ("prompt") keeps the distractors and
    # drops the fact; ranking by the last 8 queries ("observed", 6 of which still read the
    # distractors), or by both, keeps the fact.
    n, d = 80, 8
    q = torch.zeros(1, n, d)
    k = torch.zeros(1, n, d)
    k[0, 0, 0] = 1.0
    k[0, [2, 3, 4, 5], 1] = 1.0
    k[0, 10, 2] = 1.0
    q[0, :, 0] = 10.0
    q[0, :, 1] = 7.23
    q[0, -2:, :2] = 0.0
    q[0, -2:, 2] = 14.0
    classes = torch.tensor([1] + [0] * (n - 1), dtype=torch.uint8)
    kept = {}
    for source in ("prompt", "both", "observed"):
        policies, heads, _, _ = fastgen_profile(q, k, classes, 1.0, 0.9, 0.3, 0.05,
                                                heavy_pool=1, observe=8, heavy_from=source,
                                                recovery_on="prompt")
        assert policies[0].name == "special+punct+local+frequency"
        kept[source] = set(heads[0].tolist())
    assert 10 not in kept["prompt"] and {2, 3, 4, 5} <= kept["prompt"]
    assert 10 in kept["both"] and 10 in kept["observed"]


def two_frequency_heads(n: int = 60, d: int = 16):
    """Two KV heads whose every query reads planted columns: head 0 two (5, 9), head 1 twelve
    (3, 7, ..., 47); a weak BOS takes what the first queries cannot see yet."""
    q = torch.zeros(2, n, d)
    k = torch.zeros(2, n, d)
    k[:, 0, 0] = 1.0
    q[:, :, 0] = 2.0
    k[0, [5, 9], 1] = 1.0
    q[0, :, 1] = 12.0
    cols = list(range(3, 48, 4))
    k[1, cols, 2] = 1.0
    q[1, :, 2] = 12.0
    return q, k, torch.tensor([1] + [0] * (n - 1), dtype=torch.uint8), cols


def test_adaptive_fastgen_moves_heavy_slots_to_the_head_that_needs_them():
    q, k, classes, cols = two_frequency_heads()
    args = (q, k, classes, 1.0, 0.4, 0.1, 0.1)
    uniform, kept_u, _, _ = fastgen_profile(*args, heavy_pool=1, observe=0)
    adaptive, kept_a, _, _ = fastgen_profile(*args, heavy_pool=1, observe=0, adaptive=True,
                                             adaptive_floor=0.2)
    assert [p.name for p in uniform] == ["special+punct+local+frequency"] * 2
    assert [p.name for p in adaptive] == [p.name for p in uniform]  # chosen before allotting
    assert [p.heavy for p in uniform] == [6, 6]
    assert sum(p.heavy for p in adaptive) == 12  # the same layer budget ...
    assert adaptive[1].heavy > adaptive[0].heavy  # ... where the mass is
    assert {5, 9} <= set(kept_a[0].tolist())
    caught = lambda kept: sum(j in kept[1].tolist() for j in cols)  # noqa: E731
    assert caught(kept_a) > caught(kept_u)


def test_query_source_errors():
    q, k, classes = spread_then_bos_head()
    with pytest.raises(ValueError, match="heavy_from"):
        fastgen_profile(q, k, classes, 1.0, 0.9, 0.3, 0.1, heavy_from="decode")
    with pytest.raises(ValueError, match="recovery_on"):
        fastgen_profile(q, k, classes, 1.0, 0.9, 0.3, 0.1, recovery_on=None)
    with pytest.raises(ValueError, match="adaptive_floor"):
        fastgen_profile(q, k, classes, 1.0, 0.9, 0.3, 0.1, adaptive=True, adaptive_floor=-0.1)


def test_heavy_fit_keeps_the_fewest_heavy_hitters_that_still_recover_t():
    # At T = 0.9 with 18 heavy slots per head (frequency 0.3 of 60 keys), head 0 needs only its
    # two planted columns and head 1 some of its twelve (the local window holds the others).
    q, k, classes, cols = two_frequency_heads()
    n = k.shape[1]
    args = (q, k, classes, 1.0, 0.9, 0.1, 0.3)
    paper, _, _, _ = fastgen_profile(*args, heavy_pool=1, observe=0)
    fit, kept, _, _ = fastgen_profile(*args, heavy_pool=1, observe=0, heavy_fit=True)
    assert [p.name for p in fit] == [p.name for p in paper]  # the same policies, fewer entries
    assert [p.heavy for p in paper] == [18, 18]
    assert fit[0].heavy == 2 and {5, 9} <= set(kept[0].tolist())
    assert 2 < fit[1].heavy < 12 and set(kept[1].tolist()) & set(cols)
    for h, policy in enumerate(fit):
        # with one heavy hitter fewer per head the frequency policy misses T: the head falls
        # back to the full cache, so the fitted count is the least that serves
        fewer = (policy.heavy - 1.5) / n  # ceil(fewer * n) == policy.heavy - 1
        assert fastgen_profile(q, k, classes, 1.0, 0.9, 0.1, fewer, heavy_pool=1,
                               observe=0)[0][h].name == "full"
