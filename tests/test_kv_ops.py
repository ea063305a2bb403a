"""KV ops against their references, opcheck, the ragged == dense-masked property, rejections."""

import pytest
import torch

import fastllm.ops as ops
from fastllm._reference import (
    dense_masked_decode_reference,
    kv_attention_scores_reference,
    kv_evict_round_reference,
    kv_policy_recovery_reference,
    kv_ragged_decode_reference,
)
from helpers import FLOAT_DTYPES, random_tensor, value_checks

# profiling accumulates hundreds of probabilities in float32; the inputs' rounding dominates
PROFILE_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3),
               torch.bfloat16: (2e-2, 2e-2)}
DECODE_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3),
              torch.bfloat16: (2e-2, 2e-2)}

# (Hq, Hkv, Lq, Lk, D): MHA, GQA, odd sizes, a query window shorter than the keys, one row
PROFILE_SHAPES = [(4, 4, 9, 9, 8), (6, 2, 37, 37, 16), (3, 1, 5, 23, 7), (2, 1, 1, 1, 4),
                  (9, 3, 130, 130, 64)]


def random_classes(hkv, lk, device):
    cls = torch.zeros(hkv, lk, dtype=torch.uint8)
    cls[:, 0] = 1
    cls[:, torch.randperm(lk)[: lk // 5]] |= 2
    heavy = torch.rand(hkv, lk) < 0.2
    cls[heavy] |= 4
    return cls.to(device)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", PROFILE_SHAPES)
def test_attention_scores_match_reference(device, dtype, shape):
    hq, hkv, lq, lk, d = shape
    q = random_tensor(hq, lq, d, dtype=dtype, device=device)
    k = random_tensor(hkv, lk, d, dtype=dtype, device=device)
    got = ops.kv_attention_scores(q, k, d ** -0.5, chunk=16)
    want = kv_attention_scores_reference(q.double(), k.double(), d ** -0.5, chunk=1000).float()
    rtol, atol = PROFILE_TOL[dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * lq)
    # every query's probabilities sum to one, over its group
    torch.testing.assert_close(got.sum(1), torch.full((hkv,), float(lq * hq // hkv),
                                                      device=device), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("chunk", [1, 7, 128])
def test_attention_scores_chunking_changes_nothing(device, chunk):
    q = random_tensor(4, 50, 8, device=device)
    k = random_tensor(2, 50, 8, device=device)
    torch.testing.assert_close(ops.kv_attention_scores(q, k, 0.3, chunk),
                               ops.kv_attention_scores(q, k, 0.3, 1000), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", PROFILE_SHAPES)
@pytest.mark.parametrize("window", [0, 3, 1000])
def test_policy_recovery_matches_reference(device, dtype, shape, window):
    hq, hkv, lq, lk, d = shape
    q = random_tensor(hq, lq, d, dtype=dtype, device=device)
    k = random_tensor(hkv, lk, d, dtype=dtype, device=device)
    cls = random_classes(hkv, lk, device)
    got = ops.kv_policy_recovery(q, k, cls, window, d ** -0.5, chunk=8)
    want = kv_policy_recovery_reference(q.double(), k.double(), cls, window, d ** -0.5)
    rtol, atol = PROFILE_TOL[dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    assert (got[:, 1:] >= got[:, :-1] - 1e-6).all(), "policies are cumulative"
    if window >= lk:
        torch.testing.assert_close(got[:, 2], torch.ones(hkv, device=device))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_profiling_repeats_bit_for_bit(device, dtype):
    # FastGen's policies are chosen by thresholds and top-k on these sums: a run-to-run difference
    # in the last bits (float atomics summing in block order) could pick a different policy.
    q = random_tensor(8, 300, 64, dtype=dtype, device=device)
    k = random_tensor(2, 300, 64, dtype=dtype, device=device)
    cls = random_classes(2, 300, device)
    scores = [ops.kv_attention_scores(q, k, 0.125, 64) for _ in range(3)]
    masses = [ops.kv_policy_recovery(q, k, cls, 17, 0.125, 64) for _ in range(3)]
    assert all(torch.equal(s, scores[0]) for s in scores[1:])
    assert all(torch.equal(m, masses[0]) for m in masses[1:])


def test_recovery_of_planted_classes(device):
    # Every key special: the cheapest policy already recovers everything.
    q = random_tensor(2, 10, 4, device=device)
    k = random_tensor(1, 10, 4, device=device)
    cls = torch.ones(1, 10, dtype=torch.uint8, device=device)
    torch.testing.assert_close(ops.kv_policy_recovery(q, k, cls, 0, 1.0, 4),
                               torch.ones(1, 4, device=device))
    none = torch.zeros(1, 10, dtype=torch.uint8, device=device)
    torch.testing.assert_close(ops.kv_policy_recovery(q, k, none, 0, 1.0, 4),
                               torch.zeros(1, 4, device=device))


def make_ragged(batch, hkv, d, lengths, page_rows, dtype, device, spare_pages=3):
    """A pool with each cache's entries on shuffled pages, and the same data densely."""
    caches = batch * hkv
    max_len = max(max(lengths), 1)
    pages_per = -(-max_len // page_rows)
    num_pages = caches * pages_per + spare_pages
    kv_rows = random_tensor(num_pages * page_rows, 2 * d, dtype=dtype, device=device)
    perm = torch.randperm(num_pages)
    table = torch.zeros(caches, pages_per, dtype=torch.int32)
    for c in range(caches):
        table[c] = perm[c * pages_per:(c + 1) * pages_per].to(torch.int32)
    dense = torch.zeros(batch, hkv, max_len, 2 * d, dtype=dtype, device=device)
    keep = torch.zeros(batch, hkv, max_len, dtype=torch.bool, device=device)
    for c, n in enumerate(lengths):
        e = torch.arange(n)
        slots = table[c, e // page_rows].long() * page_rows + e % page_rows
        dense[c // hkv, c % hkv, :n] = kv_rows[slots.to(device)]
        keep[c // hkv, c % hkv, :n] = True
    lens = torch.tensor(lengths, dtype=torch.int32)
    return kv_rows, table.to(device), lens.to(device), dense, keep


DECODE_CASES = [  # (B, Hq, Hkv, D, lengths, page_rows)
    (1, 9, 3, 64, [17, 1, 40], 16),
    (2, 4, 2, 8, [5, 0, 33, 7], 4),
    (1, 2, 2, 7, [3, 3], 1),
    (3, 6, 3, 16, [100, 64, 1, 2, 3, 90, 0, 0, 50], 8),
    # The grouped CUDA kernel's edges: head dims 96 / 128 / 256, groups up to 8, lengths around
    # a page (15, 16, 17) and several staged tiles (the double buffer), empty caches.
    (2, 8, 2, 96, [1, 15, 17, 200], 16),
    (1, 8, 1, 128, [300], 16),
    (1, 4, 2, 256, [16, 129], 16),
    (1, 16, 2, 64, [70, 0], 16),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("splits", [1, 3, 64])
def test_ragged_decode_matches_reference(device, dtype, case, splits):
    check_decode_against_reference(device, dtype, case, splits, None)


def check_decode_against_reference(device, dtype, case, splits, work_of_lengths):
    """One ragged decode (even splits, or the work list ``work_of_lengths(lengths)``) against
    the reference; returns the op's outputs."""
    b, hq, hkv, d, lengths, page_rows = case
    kv_rows, table, lens, _, _ = make_ragged(b, hkv, d, lengths, page_rows, dtype, device)
    q = random_tensor(b, hq, d, dtype=dtype, device=device)
    work = None if work_of_lengths is None else work_of_lengths(lengths).to(device)
    out, lse, scores = ops.kv_ragged_decode(q, kv_rows, table, lens, page_rows, d ** -0.5, splits,
                                            work)
    ref_out, ref_lse, ref_scores = kv_ragged_decode_reference(q, kv_rows, table, lens, page_rows,
                                                              d ** -0.5)
    rtol, atol = DECODE_TOL[dtype]
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-4)
    assert scores.shape == (b * hkv, table.shape[1] * page_rows)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_ragged_equals_dense_with_evicted_entries_masked(device, dtype):
    # A full cache [B, Hkv, T, D]; each head evicts a different random subset. The ragged cache of
    # the kept entries must give the attention of the full cache with the evicted ones masked.
    b, hq, hkv, d, t, page_rows = 2, 6, 3, 32, 57, 8
    full = random_tensor(b, hkv, t, 2 * d, dtype=dtype, device=device)
    keep = torch.rand(b, hkv, t, device=device) < 0.4
    keep[..., -1] = True
    lengths = keep.sum(-1).flatten().tolist()
    pages_per = -(-max(lengths) // page_rows)
    num_pages = b * hkv * pages_per + 2
    kv_rows = torch.zeros(num_pages * page_rows, 2 * d, dtype=dtype, device=device)
    perm = torch.randperm(num_pages)
    table = torch.zeros(b * hkv, pages_per, dtype=torch.int32)
    for c in range(b * hkv):
        table[c] = perm[c * pages_per:(c + 1) * pages_per].to(torch.int32)
        kept_rows = full[c // hkv, c % hkv][keep[c // hkv, c % hkv]]
        e = torch.arange(kept_rows.shape[0])
        slots = table[c, e // page_rows].long() * page_rows + e % page_rows
        ops.pool_write(kv_rows, slots.to(device), kept_rows.contiguous())
    q = random_tensor(b, hq, d, dtype=dtype, device=device)
    out, _, _ = ops.kv_ragged_decode(q, kv_rows, table.to(device),
                                     torch.tensor(lengths, dtype=torch.int32, device=device),
                                     page_rows, d ** -0.5, 2)
    want = dense_masked_decode_reference(q, full[..., :d], full[..., d:], keep, d ** -0.5)
    rtol, atol = DECODE_TOL[dtype]
    torch.testing.assert_close(out, want, rtol=rtol, atol=atol)


def _work_list(lengths, chunk, extra_items=0):
    """Each cache cut into items of ``chunk`` entries (at least one), plus ``extra_items`` empty
    items past the end of cache 0 (a list planned for longer caches than they are)."""
    rows = []
    for c, n in enumerate(lengths):
        items = max(1, -(-n // chunk)) + (extra_items if c == 0 else 0)
        rows += [(c, k * chunk) for k in range(items)]
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("chunk", [1, 16, 64])
def test_ragged_decode_with_a_work_list_matches_reference(device, dtype, case, chunk):
    check_decode_against_reference(device, dtype, case, 1,
                                   lambda lengths: _work_list(lengths, chunk, extra_items=2))


def test_a_work_list_planned_for_shorter_caches_still_covers_every_entry(device):
    # The list of a step serves later steps (and CUDA-graph replays): a cache's last item runs to
    # its length, however far it grew past the bounds the list was planned from.
    lengths = [300, 5, 129, 64]
    kv_rows, table, lens, _, _ = make_ragged(1, 4, 16, lengths, 16, torch.float32, device)
    q = random_tensor(1, 8, 16, device=device)
    _, work = ops.kv_decode_plan([10, 1, 1, 1], 132)
    assert work.shape[0] == 4  # one item per cache, planned for caches of a few entries
    got = ops.kv_ragged_decode(q, kv_rows, table, lens, 16, 0.25, 1, work.to(device))
    want = kv_ragged_decode_reference(q, kv_rows, table, lens, 16, 0.25)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_decode_plan_work_lists_are_valid_for_the_op(device):
    lengths = [1000, 3, 0, 257, 64, 65]
    kv_rows, table, lens, _, _ = make_ragged(2, 3, 8, lengths, 8, torch.float32, device)
    q = random_tensor(2, 6, 8, device=device)
    want = kv_ragged_decode_reference(q, kv_rows, table, lens, 8, 0.3)
    for sms in (1, 4, 132):
        chunk, work = ops.kv_decode_plan(lengths, sms)
        assert work.dtype == torch.int32 and work.shape[1] == 2 and chunk % 64 == 0
        got = ops.kv_ragged_decode(q, kv_rows, table, lens, 8, 0.3, 1, work.to(device))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_decode_plan_rejections():
    with pytest.raises(ValueError, match="kv_decode_plan: sms must be a positive int"):
        ops.kv_decode_plan([3], 0)
    with pytest.raises(ValueError, match="kv_decode_plan: bounds must be a 1-D sequence"):
        ops.kv_decode_plan([[3]], 4)
    with pytest.raises(ValueError, match="kv_decode_plan: bounds must be a 1-D sequence"):
        ops.kv_decode_plan([1.5], 4)
    with pytest.raises(ValueError, match=r"kv_decode_plan: bounds must lie in \[0, 2\*\*31\)"):
        ops.kv_decode_plan([-1, 4], 4)


def test_ragged_decode_empty_caches(device):
    kv_rows = random_tensor(8, 8, device=device)
    table = torch.zeros(2, 1, dtype=torch.int32, device=device)
    lens = torch.zeros(2, dtype=torch.int32, device=device)
    q = random_tensor(1, 2, 4, device=device)
    out, lse, scores = ops.kv_ragged_decode(q, kv_rows, table, lens, 4, 0.5, 2)
    assert (out == 0).all() and torch.isinf(lse).all() and (scores == 0).all()


# ---- eviction bookkeeping -------------------------------------------------------------------------

KEEP = 8


def make_bookkeeping(caches, cap, step_width, device, seed=0, tied_scores=False):
    """Random eviction bookkeeping for ``caches`` caches: (pos, score, flags, lengths, step_scores,
    newest, window, heavy, grow), entries beyond each length filled with junk the op must ignore."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, cap + 1, (caches,), generator=gen)
    lengths[0] = cap
    pos = torch.stack([torch.randperm(2 * cap, generator=gen)[:cap] for _ in range(caches)])
    score = torch.rand(caches, cap, generator=gen)
    if tied_scores:
        score = (score * 3).floor()
    flags = torch.randint(0, 4, (caches, cap), generator=gen, dtype=torch.uint8)
    flags |= (torch.rand(caches, cap, generator=gen) < 0.2).to(torch.uint8) * KEEP
    step = torch.rand(caches, step_width, generator=gen)
    newest = torch.full((caches,), 2 * cap, dtype=torch.int64)
    window = torch.randint(0, cap, (caches,), generator=gen)
    heavy = torch.randint(0, cap // 2 + 1, (caches,), generator=gen)
    grow = torch.rand(caches, generator=gen) < 0.2
    return [t.to(device) for t in (pos, score, flags, lengths, step, newest, window, heavy, grow)]


@pytest.mark.parametrize("caches, cap, step_width", [(1, 1, 1), (7, 40, 40), (30, 300, 512),
                                                      (5, 70, 0), (3, 100, 33)])
@pytest.mark.parametrize("tied_scores", [False, True])
def test_evict_round_matches_reference(device, caches, cap, step_width, tied_scores):
    args = make_bookkeeping(caches, cap, step_width, device, tied_scores=tied_scores)
    want_args = [t.clone() for t in args]
    got = ops.kv_evict_round(*args)
    want = kv_evict_round_reference(*want_args)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for name, g, w in zip(("pos", "score", "flags", "lengths"), args[:4], want_args[:4]):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=f"{name} differs")
    assert (got[:, 0] >= 0).any() or caches == 1


def test_evict_round_keeps_entries_its_policy_protects(device):
    """One cache over budget: the victim is the lowest-score entry that is neither KEEP nor in the
    window, and the last entry takes its place."""
    pos = torch.tensor([[0, 1, 2, 3, 4, 5]], device=device)
    score = torch.tensor([[0.0, 0.5, 0.1, 0.9, 0.05, 0.0]], device=device)
    flags = torch.tensor([[KEEP | 1, 0, 0, 0, 2, 0]], dtype=torch.uint8, device=device)
    lengths = torch.tensor([6], device=device)
    one = torch.ones(1, dtype=torch.int64, device=device)
    moves = ops.kv_evict_round(pos, score, flags, lengths, torch.zeros(1, 0, device=device),
                               5 * one, 2 * one, 2 * one, torch.zeros(1, dtype=torch.bool,
                                                                     device=device))
    # Evictable: entries 1, 2, 3 (0 is KEEP; 4 and 5 lie in the window of 2), more than heavy = 2.
    # Entries 0, 4 and 5 score lower than entry 2 but are protected, so entry 2 goes.
    assert moves.tolist() == [[2, 5]]
    assert lengths.tolist() == [5]
    assert pos[0, :5].tolist() == [0, 1, 5, 3, 4]
    assert score[0, :5].tolist() == pytest.approx([0.0, 0.5, 0.0, 0.9, 0.05])


def test_evict_round_adds_step_scores_without_evicting(device):
    pos, score, flags, lengths, step, newest, window, heavy, grow = make_bookkeeping(
        4, 20, 24, device)
    heavy.fill_(1000)
    before = score.clone()
    moves = ops.kv_evict_round(pos, score, flags, lengths, step, newest, window, heavy, grow)
    assert (moves == -1).all()
    cols = torch.arange(20, device=device)[None] < lengths[:, None]
    torch.testing.assert_close(score, torch.where(cols, before + step[:, :20], before))


def test_opcheck(device):
    q3 = random_tensor(6, 11, 8, device=device)
    k3 = random_tensor(2, 11, 8, device=device)
    cls = random_classes(2, 11, device)
    torch.library.opcheck(torch.ops.fastllm.kv_attention_scores.default, (q3, k3, 0.4, 4))
    torch.library.opcheck(torch.ops.fastllm.kv_policy_recovery.default, (q3, k3, cls, 3, 0.4, 4))
    kv_rows, table, lens, _, _ = make_ragged(1, 2, 8, [9, 4], 4, torch.float32, device)
    q = random_tensor(1, 6, 8, device=device)
    torch.library.opcheck(torch.ops.fastllm.kv_ragged_decode.default,
                          (q, kv_rows, table, lens, 4, 0.35, 2))
    torch.library.opcheck(torch.ops.fastllm.kv_ragged_decode.default,
                          (q, kv_rows, table, lens, 4, 0.35, 1, _work_list([9, 4], 4).to(device)))
    torch.library.opcheck(torch.ops.fastllm.kv_evict_round.default,
                          tuple(make_bookkeeping(6, 30, 32, device)))


# ---- rejections --------------------------------------------------------------------------------

def test_profile_rejections(device):
    q = random_tensor(4, 5, 8, device=device)
    k = random_tensor(2, 5, 8, device=device)
    cls = torch.zeros(2, 5, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match="kv_attention_scores: q's head count"):
        ops.kv_attention_scores(random_tensor(3, 5, 8, device=device), k, 1.0)
    with pytest.raises(ValueError, match="same head_dim"):
        ops.kv_attention_scores(q, random_tensor(2, 5, 4, device=device), 1.0)
    with pytest.raises(ValueError, match="more rows than k"):
        ops.kv_attention_scores(random_tensor(4, 6, 8, device=device), k, 1.0)
    with pytest.raises(ValueError, match="chunk must be positive"):
        ops.kv_attention_scores(q, k, 1.0, 0)
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        ops.kv_attention_scores(q, k.half(), 1.0)
    with pytest.raises(ValueError, match="q must be 3-D"):
        ops.kv_attention_scores(q[0], k, 1.0)
    with pytest.raises(TypeError, match="key_class must have dtype"):
        ops.kv_policy_recovery(q, k, cls.int(), 2, 1.0)
    with pytest.raises(ValueError, match=r"key_class must be \[Hkv, Lk\]"):
        ops.kv_policy_recovery(q, k, cls[:, :4], 2, 1.0)
    with pytest.raises(ValueError, match="window must be >= 0"):
        ops.kv_policy_recovery(q, k, cls, -1, 1.0)


def test_decode_rejections(device):
    kv_rows, table, lens, _, _ = make_ragged(1, 2, 8, [9, 4], 4, torch.float32, device)
    q = random_tensor(1, 6, 8, device=device)
    call = ops.kv_ragged_decode
    with pytest.raises(ValueError, match=r"kv_rows must be \[slots, 2 \* head_dim\]"):
        call(q, kv_rows[:, :8].contiguous(), table, lens, 4, 1.0)
    with pytest.raises(TypeError, match="page_table must have dtype"):
        call(q, kv_rows, table.long(), lens, 4, 1.0)
    with pytest.raises(TypeError, match="lengths must have dtype"):
        call(q, kv_rows, table, lens.long(), 4, 1.0)
    with pytest.raises(ValueError, match="page_rows must be positive"):
        call(q, kv_rows, table, lens, 0, 1.0)
    with pytest.raises(ValueError, match="Hkv dividing"):
        call(random_tensor(1, 5, 8, device=device), kv_rows, table, lens, 4, 1.0)
    with pytest.raises(ValueError, match="one entry per page_table row"):
        call(q, kv_rows, table, lens[:1], 4, 1.0)
    with pytest.raises(ValueError, match="num_splits must be positive"):
        call(q, kv_rows, table, lens, 4, 1.0, 0)
    # Index values: always checked for CPU tensors; for CUDA ones in the debug mode (without it
    # the kernels skip and report them: tests/test_kv_gpu_path.py).
    with value_checks(device), pytest.raises(IndexError, match="lengths must lie in"):
        call(q, kv_rows, table, torch.tensor([9, 13], dtype=torch.int32, device=device), 4, 1.0)
    bad = table.clone()
    bad[0, 0] = 10_000
    with value_checks(device), pytest.raises(IndexError, match="page_table must lie in"):
        call(q, kv_rows, bad, lens, 4, 1.0)
    with pytest.raises(TypeError, match="kv_rows must have the dtype of q"):
        call(q, kv_rows.half(), table, lens, 4, 1.0)


def test_decode_work_rejections(device):
    kv_rows, table, lens, _, _ = make_ragged(1, 2, 8, [9, 4], 4, torch.float32, device)
    q = random_tensor(1, 6, 8, device=device)
    good = _work_list([9, 4], 4).to(device)
    before = [t.clone() for t in (kv_rows, table, lens, good)]

    def call(work, splits=1):
        return ops.kv_ragged_decode(q, kv_rows, table, lens, 4, 1.0, splits, work)

    with pytest.raises(TypeError, match="work must have dtype"):
        call(good.long())
    with pytest.raises(ValueError, match="work must be 2-D"):
        call(good.flatten())
    with pytest.raises(ValueError, match=r"work must be \[items, 2\]"):
        call(torch.zeros(2, 3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="work must hold at least one item per cache"):
        call(good[:1])
    with pytest.raises(ValueError, match="num_splits must be 1 when work is given"):
        call(good, 2)
    bad_lists = {
        "caches must run 0, 1": [(0, 0), (2, 0)],             # cache 1 left out, 2 out of range
        "caches must run 0, 1,": [(1, 0), (0, 0)],            # out of order
        "first entries must start at 0": [(0, 4), (1, 0)],    # a cache's first item not at 0
        "increase within a cache": [(0, 0), (0, 0), (1, 0)],  # repeated first entry
        "must hold every cache": [(0, 0), (0, 4), (0, 8)],     # cache 1 missing at the end
    }
    for message, rows in bad_lists.items():
        bad = torch.tensor(rows, dtype=torch.int32, device=device)
        with value_checks(device), pytest.raises(IndexError, match=f"work.*{message}"):
            call(bad)
    for t, b in zip((kv_rows, table, lens, good), before):
        assert torch.equal(t, b)  # nothing written


def test_evict_round_rejections_leave_the_bookkeeping_alone(device):
    args = make_bookkeeping(3, 10, 10, device)
    names = ("pos", "score", "flags", "lengths", "step_scores", "newest", "window", "heavy", "grow")
    snapshot = [t.clone() for t in args]

    def call_with(**changes):
        return ops.kv_evict_round(*[changes.get(n, t) for n, t in zip(names, args)])

    with pytest.raises(TypeError, match="kv_evict_round: pos must have dtype"):
        call_with(pos=args[0].int())
    with pytest.raises(TypeError, match="score must have dtype"):
        call_with(score=args[1].double())
    with pytest.raises(TypeError, match="flags must have dtype"):
        call_with(flags=args[2].bool())
    with pytest.raises(TypeError, match="grow must have dtype"):
        call_with(grow=args[8].long())
    with pytest.raises(ValueError, match=r"score must be \[caches, capacity\]"):
        call_with(score=args[1][:, :5].contiguous())
    with pytest.raises(ValueError, match=r"heavy must be \[caches\]"):
        call_with(heavy=args[7][:2].contiguous())
    with pytest.raises(ValueError, match="step_scores must have one row per cache"):
        call_with(step_scores=args[4][:2].contiguous())
    with pytest.raises(ValueError, match="flags must be contiguous"):
        call_with(flags=args[2].t().contiguous().t())
    with pytest.raises(ValueError, match="pos must be 2-D"):
        call_with(pos=args[0][0])
    with value_checks(device), pytest.raises(IndexError, match="lengths must lie in"):
        call_with(lengths=torch.tensor([3, 11, 0], device=device))
    with value_checks(device), pytest.raises(ValueError, match="heavy must be >= 0"):
        call_with(heavy=torch.tensor([0, -1, 2], device=device))
    for name, before, after in zip(names, snapshot, args):
        torch.testing.assert_close(after, before, rtol=0, atol=0, msg=f"{name} changed")
