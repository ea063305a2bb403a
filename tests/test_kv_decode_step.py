"""kv_decode_step (append, attend, score, evict in one op) against its reference and against the
three separate steps it replaces; opcheck; graph-step capacities; rejections that leave every
tensor as it was."""

import pytest
import torch

import fastllm.ops as ops
from fastllm._reference import kv_decode_step_reference
from fastllm._reference.kv import KEEP
from helpers import FLOAT_DTYPES, random_tensor, value_checks

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
NAMES = ["q", "new_rows", "new_pos", "new_class", "kv_rows", "page_table", "lengths", "pos",
         "score", "flags", "keep_classes", "sinks", "window", "heavy", "grow"]
MUTATED = ["kv_rows", "lengths", "pos", "score", "flags"]


def make_step(batch, hq, hkv, d, lengths, page_rows, dtype=torch.float32, device="cpu",
              seed=0, spare_columns=0, spare_pages=2):
    """Arguments of a decode step over ``batch * hkv`` caches holding ``lengths`` entries, each
    with room for at least one more. Old entries score 10, 20, ... (distinct, further apart than
    a step's probabilities can move them) so the victims do not depend on rounding."""
    gen = torch.Generator().manual_seed(seed)
    caches = batch * hkv
    pages_per = -(-(max(lengths) + 1) // page_rows)
    num_pages = caches * pages_per + spare_pages
    perm = torch.randperm(num_pages, generator=gen)
    table = perm[:caches * pages_per].view(caches, pages_per).to(torch.int32)
    cols = max(lengths) + 1 + spare_columns
    lens = torch.tensor(lengths, dtype=torch.int64)
    pos = torch.stack([torch.randperm(4 * cols, generator=gen)[:cols] for _ in range(caches)])
    score = torch.stack([torch.randperm(cols, generator=gen) for _ in range(caches)]).float()
    score = 10 * (score + 1)
    flags = torch.randint(0, 4, (caches, cols), generator=gen, dtype=torch.uint8)
    flags |= (torch.rand(caches, cols, generator=gen) < 0.2).to(torch.uint8) * KEEP
    new_pos = 4 * cols + torch.arange(caches)
    new_class = torch.randint(0, 4, (caches,), generator=gen, dtype=torch.uint8)
    keep_classes = torch.randint(0, 4, (caches,), generator=gen, dtype=torch.uint8)
    sinks = torch.randint(0, 3, (caches,), generator=gen) * (4 * cols)  # 0 or past new_pos
    window = torch.randint(0, 4, (caches,), generator=gen)
    heavy = torch.randint(0, 4, (caches,), generator=gen)
    grow = torch.rand(caches, generator=gen) < 0.2
    args = [random_tensor(batch, hq, d, dtype=dtype),
            random_tensor(caches, 2 * d, dtype=dtype), new_pos, new_class,
            random_tensor(num_pages * page_rows, 2 * d, dtype=dtype), table, lens, pos, score,
            flags, keep_classes, sinks, window, heavy, grow]
    return [t.to(device) for t in args]


def run_both(args, page_rows, scale=0.3, capacity=None, work=None):
    want_args = [t.clone() for t in args]
    got = ops.kv_decode_step(*args, page_rows, scale, 1, work, capacity)
    want = kv_decode_step_reference(*want_args, page_rows, scale, capacity=capacity)
    return got, want, want_args


def assert_same_step(args, want_args, got, want, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol, msg="out differs")
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0, msg="moves differ")
    named, want_named = dict(zip(NAMES, args)), dict(zip(NAMES, want_args))
    for name in ("kv_rows", "lengths", "pos", "flags"):
        torch.testing.assert_close(named[name], want_named[name], rtol=0, atol=0,
                                   msg=f"{name} differs")
    lengths = named["lengths"].cpu()
    valid = torch.arange(named["score"].shape[1])[None] < lengths[:, None]
    torch.testing.assert_close(named["score"].cpu()[valid], want_named["score"].cpu()[valid],
                               rtol=1e-5, atol=atol)


STEP_CASES = [  # (B, Hq, Hkv, D, lengths, page_rows)
    (1, 9, 3, 64, [17, 1, 40], 16),
    (2, 4, 2, 8, [5, 0, 33, 7], 4),
    (1, 2, 2, 7, [3, 3], 1),
    (3, 6, 3, 16, [100, 64, 1, 2, 15, 90, 0, 0, 50], 8),
    (1, 8, 1, 128, [300], 16),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", STEP_CASES)
def test_decode_step_matches_reference(device, dtype, case):
    batch, hq, hkv, d, lengths, page_rows = case
    args = make_step(batch, hq, hkv, d, lengths, page_rows, dtype, device)
    before = args[6].clone()
    got, want, want_args = run_both(args, page_rows)
    assert_same_step(args, want_args, got, want, dtype)
    # Every cache took its entry; the ones that evicted gave one back.
    evicted = (got[1][:, 0] >= 0).long()
    assert torch.equal(args[6], before + 1 - evicted)
    assert evicted.sum() > 0 or len(lengths) < 3, "a case with no eviction tests less"


@pytest.mark.parametrize("chunk", [1, 7])
def test_decode_step_work_list_changes_nothing(device, chunk):
    lengths = [40, 3, 0, 17]
    args = make_step(2, 4, 2, 16, lengths, 4, device=device, seed=3)
    rows = []
    for c, n in enumerate(lengths):
        rows += [(c, k * chunk) for k in range(max(1, -(-(n + 1) // chunk)))]
    work = torch.tensor(rows, dtype=torch.int32, device=device)
    got, want, want_args = run_both(args, 4, work=work)
    assert_same_step(args, want_args, got, want, torch.float32)


def test_decode_step_equals_the_three_ops_it_replaces(device):
    """Append with tensor ops, kv_ragged_decode, kv_evict_round and the row moves: the path the
    FastGenCache decode step took before this op, on the same data."""
    page_rows = 4
    args = make_step(2, 6, 3, 16, [9, 20, 2, 13, 0, 30], page_rows, device=device, seed=5)
    (q, new_rows, new_pos, new_class, kv_rows, table, lengths, pos, score, flags, keep, sinks,
     window, heavy, grow) = [t.clone() for t in args]
    entry = lengths.clone()
    slots = table[torch.arange(len(entry), device=device), entry // page_rows].long() \
        * page_rows + entry % page_rows
    kv_rows.index_copy_(0, slots, new_rows)
    index = torch.arange(len(entry), device=device)
    pos[index, entry] = new_pos
    kept = ((new_class & keep) != 0) | (new_pos < sinks)
    flags[index, entry] = new_class | kept.to(torch.uint8) * KEEP
    score[index, entry] = 0.0
    lengths += 1
    out, _, step_scores = ops.kv_ragged_decode(q, kv_rows, table, lengths.int(), page_rows, 0.3)
    moves = ops.kv_evict_round(pos, score, flags, lengths, step_scores, new_pos, window, heavy,
                               grow)
    for c in (moves[:, 0] >= 0).nonzero().flatten().tolist():
        victim, last = moves[c].tolist()
        to = table[c, victim // page_rows].long() * page_rows + victim % page_rows
        src = table[c, last // page_rows].long() * page_rows + last % page_rows
        kv_rows[to] = kv_rows[src]
    got = ops.kv_decode_step(*args, page_rows, 0.3)
    torch.testing.assert_close(got[0], out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], moves, rtol=0, atol=0)
    for name, mine, theirs in zip(MUTATED, [args[4], *args[6:10]],
                                  [kv_rows, lengths, pos, score, flags]):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6, msg=f"{name} differs")


def test_decode_step_keeps_what_its_policy_protects(device):
    """The new entry's flags: KEEP for a class the cache's policy keeps and for a sink position;
    with window 0 an unprotected new entry (score 0 + its probability) is the one evicted."""
    args = make_step(1, 4, 4, 8, [6, 6, 6, 6], 4, device=device, seed=1)
    named = dict(zip(NAMES, args))
    named["new_class"].copy_(torch.tensor([2, 2, 1, 0]))
    named["keep_classes"].copy_(torch.tensor([2, 1, 0, 0]))
    named["new_pos"].fill_(100)
    named["sinks"].copy_(torch.tensor([0, 0, 0, 101]))  # cache 3: position 100 is a sink
    named["window"].zero_()
    named["heavy"].fill_(2)
    named["grow"].zero_()
    named["flags"].zero_()  # every old entry evictable
    _, moves = ops.kv_decode_step(*args, 4, 0.3)
    flags = named["flags"]
    # cache 0 keeps punctuation: its new entry is KEEP; cache 3's is a sink
    assert int(flags[0, 6]) == 2 | KEEP and int(flags[3, 6]) == KEEP
    # caches 1 and 2 do not protect theirs: with the lowest score, it goes at once
    assert moves[1].tolist() == [6, 6] and moves[2].tolist() == [6, 6]
    # the protected caches evicted their lowest-score old entry (scores 10, 20, ...)
    for c in (0, 3):
        assert moves[c, 1] == 6 and 0 <= moves[c, 0] < 6


def test_decode_step_with_capacity_overwrites_the_last_entry_of_a_full_cache(device):
    """Graph steps: the host passes each cache's room; a full cache writes its new entry over its
    last one instead of past its pages or columns."""
    page_rows = 4
    args = make_step(1, 4, 2, 8, [7, 3], page_rows, device=device, seed=2)
    named = dict(zip(NAMES, args))
    named["heavy"].fill_(1000)  # no eviction: only the append is under test
    capacity = torch.tensor([7, 8], device=device)  # cache 0 full at 7 entries
    got, want, want_args = run_both(args, page_rows, capacity=capacity)
    assert_same_step(args, want_args, got, want, torch.float32)
    assert named["lengths"].tolist() == [7, 4]
    assert int(named["pos"][0, 6]) == int(named["new_pos"][0])


def test_decode_step_opcheck(device):
    args = make_step(2, 4, 2, 8, [5, 0, 9, 3], 4, device=device, spare_columns=12)
    torch.library.opcheck(torch.ops.fastllm.kv_decode_step.default, (*args, 4, 0.3, 1))
    capacity = torch.full((4,), 6, device=device)
    torch.library.opcheck(torch.ops.fastllm.kv_decode_step.default,
                          (*args, 4, 0.3, 1, None, capacity))


# ---- rejections ----------------------------------------------------------------------------

def _call(args, page_rows=4, capacity=None, **changes):
    call = [changes.get(n, t) for n, t in zip(NAMES, args)]
    return ops.kv_decode_step(*call, page_rows, 0.3, 1, None, capacity)


@pytest.mark.parametrize("change, error, match", [
    ({"new_pos": lambda a: a["new_pos"].int()}, TypeError, "new_pos must have dtype"),
    ({"new_class": lambda a: a["new_class"].long()}, TypeError, "new_class must have dtype"),
    ({"new_class": lambda a: a["new_class"][:1]}, ValueError, r"new_class must be \[caches\]"),
    ({"new_rows": lambda a: a["new_rows"][:, :8]}, ValueError, "new_rows must be"),
    ({"new_rows": lambda a: a["new_rows"].double()}, TypeError, "new_rows must have the dtype"),
    ({"sinks": lambda a: a["sinks"][None]}, ValueError, r"sinks must be \[caches\]"),
    ({"keep_classes": lambda a: a["keep_classes"].bool()}, TypeError, "keep_classes must have"),
    ({"lengths": lambda a: a["lengths"].int()}, TypeError, "lengths must have dtype"),
    ({"page_table": lambda a: a["page_table"][:2]}, ValueError, "page_table must have one row"),
    ({"heavy": lambda a: a["heavy"] - 10}, ValueError, "heavy must be >= 0"),
])
def test_decode_step_rejects_bad_arguments_and_changes_nothing(device, change, error, match):
    args = make_step(2, 4, 2, 8, [5, 0, 9, 3], 4, device=device)
    named = dict(zip(NAMES, args))
    snapshot = [t.clone() for t in args]
    changes = {name: make(named) for name, make in change.items()}
    with value_checks(device), pytest.raises(error, match=match):
        _call(args, **changes)
    for name, t, before in zip(NAMES, args, snapshot):
        assert torch.equal(t, before), f"{name} changed"


def test_decode_step_rejects_a_cache_without_room(device):
    # Cache 2 holds 12 entries on 3 pages of 4 rows: no room for its new entry.
    args = make_step(2, 4, 2, 8, [5, 0, 11, 3], 4, device=device)
    named = dict(zip(NAMES, args))
    named["lengths"][2] = 12
    snapshot = [t.clone() for t in args]
    with value_checks(device), pytest.raises(IndexError, match="lengths must lie in"):
        _call(args)
    with value_checks(device), pytest.raises(IndexError, match="capacity must lie in"):
        _call(args, capacity=torch.tensor([6, 6, 0, 6], device=device))
    with value_checks(device), pytest.raises(IndexError, match="capacity must lie in"):
        _call(args, capacity=torch.tensor([6, 6, 13, 6], device=device))
    for name, t, before in zip(NAMES, args, snapshot):
        assert torch.equal(t, before), f"{name} changed"
    if device == "cpu":
        return
    # CUDA outside the debug mode: the cache without room is left alone and reported.
    ops.index_error_word(device).zero_()
    _call(args)
    torch.cuda.synchronize()
    for name in ("lengths", "pos", "flags", "score"):
        assert torch.equal(named[name][2], dict(zip(NAMES, snapshot))[name][2]), name
    with pytest.raises(IndexError, match="kv_decode_step"):
        ops.raise_index_errors(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_query_heads_attend_nothing_and_add_no_score(device, dtype):
    # q [B, 0, D]: the register-blocked CPU loops must not assume a group of at least one head.
    args = make_step(1, 2, 2, 16, [5, 9], 4, dtype, device)
    args[0] = args[0][:, :0]
    got, want, want_args = run_both(args, 4)
    assert got[0].shape == (1, 0, 16)
    assert_same_step(args, want_args, got, want, dtype)
    rows, table, lens = args[4], args[5], args[6].int()
    out, lse, scores = ops.kv_ragged_decode(args[0], rows, table, lens, 4, 0.3)
    assert out.shape == (1, 0, 16) and lse.shape == (1, 0) and not scores.any()
