"""FastGen policy selection on synthetic attention with planted patterns, the baselines' kept
sets, and eviction bookkeeping on a real pool."""

import pytest
import torch

from fastllm.kv.policies import (
    FASTGEN_POLICIES,
    HeadPolicy,
    budget_tokens,
    check_ratio,
    fastgen_profile,
    heavy_mask,
    heavy_scores,
    kept_at_prefill,
)

L = 40
SPECIAL_POS = [0]
PUNCT_POS = [7, 15, 23, 31]
HEAVY_POS = [3, 11]
BIG = 12.0


def planted_heads():
    """Five KV heads (one query each) whose attention goes to: special tokens, punctuation (+
    special), a 3-token local band, two heavy-hitter columns, and uniformly everywhere."""
    d = L + 8
    e_sp, e_pu, e_hv = L, L + 1, L + 2
    q = torch.zeros(5, L, d)
    k = torch.randn(5, L, d) * 0.01
    for j in SPECIAL_POS:
        k[:, j, e_sp] = BIG
    for j in PUNCT_POS:
        k[:, j, e_pu] = BIG
    for j in HEAVY_POS:
        k[:, j, e_hv] = BIG
    q[0, :, e_sp] = 1.0
    q[1, :, e_sp] = 1.0
    q[1, :, e_pu] = 1.0
    for i in range(L):  # local: query i matches keys i, i-1, i-2 by position one-hots
        for j in range(max(0, i - 2), i + 1):
            q[2, i, j] = BIG
            k[2, j, j] = 1.0
    q[3, :, e_hv] = 1.0
    q[3, :, e_sp] = 1.0  # the first few queries see no heavy column yet: the BOS takes them
    classes = torch.zeros(L, dtype=torch.uint8)
    classes[SPECIAL_POS] = 1
    classes[PUNCT_POS] |= 2
    return q, k, classes


@pytest.mark.parametrize("threshold", [0.9, 0.95])
def test_planted_patterns_pick_expected_policy(threshold):
    q, k, classes = planted_heads()
    policies, kept, scores, rec = fastgen_profile(q, k, classes, 1.0, threshold, 0.3, 0.1, chunk=8)
    names = [p.name for p in policies]
    assert names == ["special", "special+punct", "special+punct+local",
                     "special+punct+local+frequency", "full"], (names, rec)
    # recovery >= T holds on every head for the policy it got (full recovers everything)
    for h, p in enumerate(policies):
        idx = FASTGEN_POLICIES.index(p.name)
        assert idx == 4 or rec[h, idx] >= threshold
        # ... and the cheaper ones were really insufficient (greedy order)
        assert all(rec[h, j] < threshold for j in range(idx))
    # the heavy-hitter head keeps exactly the planted columns as its heavy hitters
    assert set(HEAVY_POS) <= set(kept[3].tolist())
    assert kept[0].tolist() == SPECIAL_POS
    assert kept[1].tolist() == sorted(SPECIAL_POS + PUNCT_POS)
    assert kept[4].tolist() == list(range(L))
    assert scores.shape == (5, L)


def test_heavy_ranking_keeps_hitters_first_then_their_phrases():
    scores = torch.full((1, 40), 0.01)
    scores[0, 10], scores[0, 18], scores[0, 30] = 5.0, 4.0, 0.5
    ranked = heavy_scores(scores, 11)[0].argsort(descending=True).tolist()
    assert ranked[:2] == [10, 18]  # hitters ahead of their neighbours, even those between two
    assert set(ranked[2:19]) == set(range(5, 24)) - {10, 18}  # then their phrases
    assert ranked[19] == 30  # a weak hitter after the strong ones' phrases, ahead of its own
    assert set(ranked[20:30]) == set(range(25, 36)) - {30}
    assert torch.equal(heavy_scores(scores, 1), scores)  # the paper's ranking


def question_head(distractor_logit: float):
    """One head over 80 tokens: every query reads the BOS (logit 10) and four distractor keys,
    except the last two, which read a fact at position 10 that nothing else reads (logit 14):
    a question asked at the end of a prompt about something buried in it."""
    n, d = 80, 8
    q = torch.zeros(1, n, d)
    k = torch.zeros(1, n, d)
    k[0, 0, 0] = 1.0
    for j in (2, 3, 4, 5):
        k[0, j, 1] = 1.0
    k[0, 10, 2] = 1.0
    q[0, :, 0] = 10.0
    q[0, :, 1] = distractor_logit
    q[0, -2:, 0] = 0.0
    q[0, -2:, 1] = 0.0
    q[0, -2:, 2] = 14.0
    return q, k, torch.tensor([1] + [0] * (n - 1), dtype=torch.uint8)


def test_observed_queries_keep_what_the_question_reads():
    # Frequency keeps 4 heavy hitters: by whole-prompt attention the distractors (read by every
    # query) outrank the fact (read by two), so the paper's ranking drops the fact; counting the
    # last queries' attention as much as the whole prompt's keeps it.
    q, k, classes = question_head(7.23)
    for observe, fact_kept in [(0, False), (8, True)]:
        policies, kept, _, _ = fastgen_profile(q, k, classes, 1.0, 0.9, 0.3, 0.05,
                                               heavy_pool=1, observe=observe)
        assert policies[0].name == "special+punct+local+frequency"
        assert (10 in kept[0].tolist()) == fact_kept, observe
    # With no heavy slots, "special" recovers 0.94 of the whole prompt's attention but a quarter
    # of the last queries' is on the fact: observing them moves the head to full.
    q, k, classes = question_head(-10.0)
    names = [fastgen_profile(q, k, classes, 1.0, 0.9, 0.3, 0.0, heavy_pool=1,
                             observe=observe)[0][0].name for observe in (0, 8)]
    assert names == ["special", "full"]


def test_gqa_decides_per_kv_head_over_its_group():
    # Two query heads share each KV head: one special-only query head and one uniform one in
    # the same group make the group need more than "special".
    q, k, classes = planted_heads()
    q2 = torch.stack([q[0], q[0], q[0], torch.zeros_like(q[0])])  # group 0: special, group 1 mixed
    k2 = k[:2].clone()
    k2[1] = k[0]
    policies, _, _, rec = fastgen_profile(q2, k2, classes, 1.0, 0.95, 0.3, 0.3, chunk=16)
    assert rec.shape == (2, 4)
    assert policies[0].name == "special"
    assert policies[1].name != "special"


def test_baseline_kept_sets():
    classes = torch.zeros(20, dtype=torch.uint8)
    scores = torch.arange(20.0).flip(0)  # earlier tokens scored higher
    stream = kept_at_prefill(HeadPolicy("streaming", sinks=2, window=5), classes, None, None)
    assert stream.tolist() == [0, 1, 15, 16, 17, 18, 19]
    h2o = kept_at_prefill(HeadPolicy("h2o", heavy=3, window=4), classes, None, scores)
    assert h2o.tolist() == [0, 1, 2, 16, 17, 18, 19]


def test_budget_and_ratio_validation():
    assert budget_tokens(0.25, 100) == 25
    assert budget_tokens(7, 100) == 7
    for bad in (0.0, 1.5, -3, 0):
        with pytest.raises(ValueError):
            budget_tokens(bad, 10)
    with pytest.raises(TypeError):
        budget_tokens(True, 10)
    with pytest.raises(ValueError, match=r"recovery must lie in \(0, 1\]"):
        check_ratio("recovery", 0.0, low_open=True)
    with pytest.raises(ValueError, match=r"locality must lie in \[0, 1\]"):
        check_ratio("locality", 1.2)
    with pytest.raises(TypeError):
        check_ratio("frequency", "0.3")


def test_heavy_scores_keep_a_phrase_around_a_heavy_hitter():
    from fastllm.kv.policies import heavy_scores

    # key 20 is a heavy hitter; its neighbours get as little attention as scattered keys
    scores = torch.full((1, 48), 1.0)
    scores[0, 20] = 10.0
    scores[0, [5, 40, 44]] = 1.5  # isolated keys slightly above the phrase's other tokens
    paper = heavy_scores(scores, 1)
    assert torch.equal(paper, scores)
    top_paper = set(paper[0].topk(7).indices.tolist())
    assert {20, 5, 40, 44} <= top_paper  # by single keys, the phrase is cut to its peak
    pooled = heavy_scores(scores, 7)
    top = pooled[0].topk(7).indices.tolist()
    assert top[0] == 20  # the heavy hitter still ranks first, above its own neighbours
    assert set(top) == set(range(17, 24))
    # shapes and the number of keys kept do not change, only their order
    assert pooled.shape == scores.shape
    mask_paper = heavy_mask(paper, torch.zeros(1, 48, dtype=torch.uint8), 7, 48)
    mask_pooled = heavy_mask(pooled, torch.zeros(1, 48, dtype=torch.uint8), 7, 48)
    assert int(mask_paper.sum()) == int(mask_pooled.sum()) == 7
