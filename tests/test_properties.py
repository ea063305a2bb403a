"""Property-based tests (hypothesis) of every op against its pure-PyTorch reference (issue 21).

Hypothesis draws the shapes (empty, one and odd sizes included), dtypes, index patterns (repeats,
extremes, every adapter-popularity pattern, ragged lengths around page boundaries) and views
(non-contiguous or offset, where an op takes them; a clear rejection naming the argument where it
does not); each example is compared with the reference. Out-of-range index values must raise
IndexError and leave every input unchanged.

`make test` runs a bounded, derandomised number of examples per property (the same examples every
run, so CI is reproducible). ``FASTLLM_HYPOTHESIS_EXAMPLES=2000 pytest tests/test_properties.py``
searches much further, randomly, and keeps what fails in ``tests/hypothesis-db`` (replayed by later
searches); a failure found that way is added below as an ``@example`` regression, so `make test`
replays it for good.
"""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402

import fastllm.ops as ops  # noqa: E402
from fastllm import _reference as ref  # noqa: E402
from fastllm._ops.lora import PATH_AUTO, PATH_BGMV, PATH_SGMV  # noqa: E402
from helpers import TOLERANCES  # noqa: E402

_SEARCH = int(os.environ.get("FASTLLM_HYPOTHESIS_EXAMPLES", "0"))
settings.register_profile(
    "fastllm",
    max_examples=_SEARCH or 12,
    derandomize=not _SEARCH,
    database=DirectoryBasedExampleDatabase(pathlib.Path(__file__).parent / "hypothesis-db")
    if _SEARCH else None,
    deadline=None,  # the 2-core CI machine is shared; time is not the property
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("fastllm")

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
FLOATS_AND_64 = FLOATS + [torch.float64]


def _randn(gen: torch.Generator, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(actual, expected, dtype, scale: float = 1.0):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol * scale,
                               atol=atol * scale, equal_nan=False)


def _close_to_scale(actual, expected, dtype, scale: float = 4.0):
    """Within ``scale`` x the dtype's tolerance of the result's largest magnitude: a GEMM in a
    low precision rounds its intermediates, so an element near zero carries the error of the
    large terms it sums."""
    rtol, atol = TOLERANCES[dtype]
    bound = rtol * scale * max(float(expected.abs().max()), 1.0) if expected.numel() else atol
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol * scale, atol=bound)


def _maybe_view(gen: torch.Generator, t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t``'s values as a contiguous tensor, a strided (every other column) view of a wider one,
    or an offset view into a larger buffer."""
    if kind == "strided" and t.dim() >= 1:
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if kind == "offset":
        buf = torch.empty(t.numel() + 3, dtype=t.dtype)
        view = buf[3:].view(t.shape)
        view.copy_(t)
        return view
    return t


def _accepts_or_names(call, argument: str):
    """The op's result, or None if it refused a layout with an error naming ``argument``."""
    try:
        return call()
    except (ValueError, TypeError) as err:
        assert argument in str(err) and "contiguous" in str(err), str(err)
        return None


VIEWS = st.sampled_from(["contiguous", "strided", "offset"])
SEEDS = st.integers(0, 2**31 - 1)


# ---- memory: pool_gather / pool_write ------------------------------------------------------------

@given(seed=SEEDS, rows=st.integers(1, 48), width=st.integers(1, 40), picks=st.integers(0, 30),
       dtype=st.sampled_from(FLOATS_AND_64), view=VIEWS)
@example(seed=0, rows=1, width=1, picks=0, dtype=torch.float32, view="contiguous")
def test_pool_gather_matches_reference(seed, rows, width, picks, dtype, view):
    gen = _generator(seed)
    pool = _randn(gen, rows, width, dtype=dtype)
    # repeats and both extremes (0 and rows - 1)
    slots = torch.cat([torch.randint(0, rows, (picks,), generator=gen),
                       torch.tensor([0, rows - 1])])[: max(picks, 1)]
    slots = _maybe_view(gen, slots, view)
    got = _accepts_or_names(lambda: ops.pool_gather(pool, slots), "slots")
    if got is not None:
        assert torch.equal(got, ref.pool_gather_reference(pool, slots))


@given(seed=SEEDS, rows=st.integers(1, 48), width=st.integers(1, 40), share=st.floats(0, 1),
       dtype=st.sampled_from(FLOATS_AND_64), view=VIEWS)
def test_pool_write_matches_reference(seed, rows, width, share, dtype, view):
    gen = _generator(seed)
    pool = _randn(gen, rows, width, dtype=dtype)
    slots = torch.randperm(rows, generator=gen)[: int(share * rows)]  # distinct: writes commute
    values = _maybe_view(gen, _randn(gen, slots.numel(), width, dtype=dtype), view)
    want = pool.clone()
    ref.pool_write_reference(want, slots, values)
    if _accepts_or_names(lambda: ops.pool_write(pool, slots, values), "rows") is None:
        return
    assert torch.equal(pool, want)


@given(seed=SEEDS, rows=st.integers(1, 20), bad=st.sampled_from([-1, 0, 1, 2**40]))
def test_pool_ops_reject_out_of_range_slots_and_write_nothing(seed, rows, bad):
    gen = _generator(seed)
    pool = _randn(gen, rows, 4)
    before = pool.clone()
    slots = torch.tensor([0, rows - 1 + bad if bad in (0, 1) else bad])
    if 0 <= int(slots[1]) < rows:
        return  # in range after all
    with pytest.raises(IndexError, match="slots"):
        ops.pool_write(pool, slots, _randn(gen, 2, 4))
    with pytest.raises(IndexError, match="slots"):
        ops.pool_gather(pool, slots)
    assert torch.equal(pool, before)


# ---- LoRA: lora_shrink / lora_expand -------------------------------------------------------------

POPULARITY = ["distinct", "uniform", "zipf", "identical", "with_base"]


def _token_adapters(gen, tokens: int, adapters: int, pattern: str) -> torch.Tensor:
    if pattern == "distinct":
        ids = torch.arange(tokens) % adapters
    elif pattern == "uniform":
        ids = torch.randint(0, adapters, (tokens,), generator=gen)
    elif pattern == "zipf":  # adapter a with weight 1 / (a + 1)
        weights = 1.0 / torch.arange(1, adapters + 1, dtype=torch.float64)
        ids = torch.multinomial(weights, tokens, replacement=True, generator=gen) \
            if tokens else torch.zeros(0, dtype=torch.long)
    elif pattern == "identical":
        ids = torch.full((tokens,), adapters - 1)
    else:  # some tokens without an adapter (-1: the base model only)
        ids = torch.randint(-1, adapters, (tokens,), generator=gen)
    return ids.to(torch.int32)


def _lora_case(gen, tokens, width, slices, adapters, max_rank, dtype, pattern):
    ranks = torch.randint(0, max_rank + 1, (slices, adapters), generator=gen, dtype=torch.int32)
    ranks[0, 0] = max_rank  # the widest rank occurs
    rows = slices * adapters * max_rank
    # each adapter row an arbitrary element offset (rows may overlap: reads only)
    pool = _randn(gen, rows * width + 7, dtype=dtype)
    offsets = torch.randint(0, rows * width + 7 - width + 1, (slices, adapters, max_rank),
                            generator=gen)
    x = _randn(gen, tokens, width, dtype=dtype)
    return x, pool, offsets, ranks, _token_adapters(gen, tokens, adapters, pattern)


@given(seed=SEEDS, tokens=st.integers(0, 40), width=st.integers(1, 72), slices=st.integers(1, 3),
       adapters=st.integers(1, 5), max_rank=st.integers(1, 17),
       dtype=st.sampled_from(FLOATS_AND_64), pattern=st.sampled_from(POPULARITY),
       path=st.sampled_from([PATH_AUTO, PATH_BGMV, PATH_SGMV]))
@example(seed=1, tokens=0, width=1, slices=1, adapters=1, max_rank=1, dtype=torch.float32,
         pattern="distinct", path=PATH_SGMV)
def test_lora_shrink_matches_reference(seed, tokens, width, slices, adapters, max_rank, dtype,
                                       pattern, path):
    gen = _generator(seed)
    x, pool, offsets, ranks, ids = _lora_case(gen, tokens, width, slices, adapters, max_rank,
                                              dtype, pattern)
    got = ops.lora_shrink(x, pool, offsets, ranks, ids, path)
    want = ref.lora_shrink_reference(x, pool, offsets, ranks, ids)
    # sums of `width` products of inputs rounded to the dtype
    _close(got, want, torch.float64 if dtype == torch.float64 else torch.float32,
           scale=1.0 if dtype in (torch.float32, torch.float64) else 4.0)


@given(seed=SEEDS, tokens=st.integers(0, 40), sizes=st.lists(st.integers(1, 50), min_size=1,
                                                              max_size=3),
       adapters=st.integers(1, 5), max_rank=st.integers(1, 17),
       dtype=st.sampled_from(FLOATS_AND_64), pattern=st.sampled_from(POPULARITY),
       path=st.sampled_from([PATH_AUTO, PATH_BGMV, PATH_SGMV]))
def test_lora_expand_matches_reference(seed, tokens, sizes, adapters, max_rank, dtype, pattern,
                                       path):
    gen = _generator(seed)
    slices, out = len(sizes), sum(sizes)
    _, pool, _, ranks, ids = _lora_case(gen, tokens, max(sizes), slices, adapters, max_rank,
                                        dtype, pattern)
    offsets = torch.randint(0, pool.numel() - max(sizes) + 1, (slices, adapters, max_rank),
                            generator=gen)
    h_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    h = _randn(gen, slices, tokens, max_rank, dtype=h_dtype)
    scalings = torch.rand(slices, adapters, generator=gen) * 2
    y = _randn(gen, tokens, out, dtype=dtype)
    want = ref.lora_expand_reference(y, h, pool, offsets, ranks, scalings, ids, sizes)
    got = ops.lora_expand(y.clone(), h, pool, offsets, ranks, scalings, ids, sizes, path)
    _close(got, want, dtype, scale=1.0 if dtype in (torch.float32, torch.float64) else 2.0)
    untouched = ids < 0  # tokens without an adapter keep their row bit for bit
    assert torch.equal(got[untouched], y[untouched])


@given(seed=SEEDS, bad=st.sampled_from(["adapter", "rank", "row"]))
def test_lora_ops_reject_bad_indices_and_write_nothing(seed, bad):
    gen = _generator(seed)
    x, pool, offsets, ranks, ids = _lora_case(gen, 6, 8, 1, 3, 4, torch.float32, "uniform")
    if bad == "adapter":
        ids[2], match = 3, "token_adapter"
    elif bad == "rank":
        ranks[0, 1], match = 5, "ranks"
    else:
        offsets[0, 0, 0], match = pool.numel(), "a_rows"
    ids[0] = 1  # adapter 1 (and, for "row", adapter 0 below) is used
    ids[1] = 0
    # an adapter id or row out of range is an IndexError, a rank past a_rows' width a ValueError
    errors = ValueError if bad == "rank" else IndexError
    with pytest.raises(errors, match=match):
        ops.lora_shrink(x, pool, offsets, ranks, ids)
    y = _randn(gen, 6, 8)
    before = y.clone()
    h = torch.zeros(1, 6, 4)
    match = "b_rows" if bad == "row" else match
    with pytest.raises(errors, match=match):
        ops.lora_expand(y, h, pool, offsets, ranks, torch.ones(1, 3), ids, [8])
    assert torch.equal(y, before)


# ---- KV: profiling, ragged decode, eviction ------------------------------------------------------

@given(seed=SEEDS, hkv=st.integers(1, 3), group=st.integers(1, 4), lk=st.integers(1, 40),
       queries=st.floats(0, 1), d=st.integers(1, 33), chunk=st.integers(1, 45),
       dtype=st.sampled_from(FLOATS_AND_64))
def test_kv_profiling_matches_reference(seed, hkv, group, lk, queries, d, chunk, dtype):
    gen = _generator(seed)
    lq = max(1, int(queries * lk))
    q = _randn(gen, hkv * group, lq, d, dtype=dtype)
    k = _randn(gen, hkv, lk, d, dtype=dtype)
    scale = d ** -0.5
    tol = torch.float32 if dtype in (torch.float32, torch.float64) else dtype
    _close(ops.kv_attention_scores(q, k, scale, chunk),
           ref.kv_attention_scores_reference(q, k, scale, chunk), tol, scale=10.0)
    cls = torch.randint(0, 8, (hkv, lk), generator=gen, dtype=torch.uint8)
    window = int(torch.randint(0, lk + 2, (1,), generator=gen))
    _close(ops.kv_policy_recovery(q, k, cls, window, scale, chunk),
           ref.kv_policy_recovery_reference(q, k, cls, window, scale, chunk), tol, scale=10.0)


def _ragged_lengths(draw, caches: int, page_rows: int) -> list[int]:
    near_page = st.sampled_from([0, 1, page_rows - 1, page_rows, page_rows + 1, 2 * page_rows,
                                 2 * page_rows + 1])
    return draw(st.lists(st.one_of(near_page, st.integers(0, 70)), min_size=caches,
                         max_size=caches))


@given(data=st.data(), seed=SEEDS, batch=st.integers(1, 3), hkv=st.integers(1, 3),
       group=st.integers(1, 5), d=st.sampled_from([1, 7, 8, 16, 24, 64]),
       page_rows=st.sampled_from([1, 4, 16]), dtype=st.sampled_from(FLOATS_AND_64),
       division=st.sampled_from(["splits", "work", "stale_work"]))
def test_kv_ragged_decode_matches_reference(data, seed, batch, hkv, group, d, page_rows, dtype,
                                            division):
    gen = _generator(seed)
    caches = batch * hkv
    lengths = _ragged_lengths(data.draw, caches, page_rows)
    pages = max(1, -(-max(lengths) // page_rows))
    pool_pages = caches * pages + 2
    kv_rows = _randn(gen, pool_pages * page_rows, 2 * d, dtype=dtype)
    table = torch.randperm(pool_pages, generator=gen)[: caches * pages].view(caches, pages)
    table, lens = table.to(torch.int32), torch.tensor(lengths, dtype=torch.int32)
    q = _randn(gen, batch, hkv * group, d, dtype=dtype)
    splits, work = 1, None
    if division == "splits":
        splits = data.draw(st.integers(1, 9))
    else:  # a planned work list, or one planned for shorter caches (later steps reuse it)
        bounds = lengths if division == "work" else [min(n, 1) for n in lengths]
        _, work = ops.kv_decode_plan(bounds, data.draw(st.integers(1, 200)))
    scale = d ** -0.5
    out, lse, scores = ops.kv_ragged_decode(q, kv_rows, table, lens, page_rows, scale, splits,
                                            work)
    want_out, want_lse, want_scores = ref.kv_ragged_decode_reference(q, kv_rows, table, lens,
                                                                     page_rows, scale)
    # float64 caches are attended in fp32 (as the reference does), so fp32's tolerance
    _close(out, want_out, torch.float32 if dtype == torch.float64 else dtype, scale=2.0)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores, want_scores, rtol=1e-4, atol=1e-4)


@given(caches=st.integers(1, 4), rows=st.lists(st.tuples(st.integers(-1, 4), st.integers(-1, 70)),
                                               min_size=1, max_size=8), planned=st.booleans())
def test_cuda_per_row_work_check_agrees_with_the_host_check(caches, rows, planned):
    # The CUDA kernels check each row of a work list on their own (no host read); a list passes
    # there exactly when the host check (CPU tensors, debug mode) accepts it.
    import numpy as np

    from fastllm import _C
    if planned:  # well-formed lists too, not only random ones
        bounds = [abs(r[1]) * 3 for r in (rows * caches)[:caches]]
        work = ops.kv_decode_plan(bounds, rows[0][0] + 2)[1].numpy()
    else:
        work = np.array(rows, dtype=np.int32)
    device_accepts = all(_C.kv_work_rows_valid(work, caches))
    q, kv_rows = torch.randn(1, caches, 8), torch.randn(16, 16)
    table, lens = torch.zeros(caches, 2, dtype=torch.int32), torch.zeros(caches, dtype=torch.int32)
    try:
        ops.kv_ragged_decode(q, kv_rows, table, lens, 8, 0.3, 1, torch.from_numpy(work))
        host_accepts = True
    except IndexError:
        host_accepts = False
    except ValueError:  # fewer rows than caches: refused on the shape, before any value
        assert len(work) < caches
        return
    assert device_accepts == host_accepts, (work.tolist(), caches)


@given(seed=SEEDS, caches=st.integers(1, 12), cap=st.integers(1, 70), width=st.integers(0, 80),
       ties=st.booleans())
def test_kv_evict_round_matches_reference_exactly(seed, caches, cap, width, ties):
    gen = _generator(seed)
    lengths = torch.randint(0, cap + 1, (caches,), generator=gen)
    pos = torch.stack([torch.randperm(cap, generator=gen) for _ in range(caches)])
    score = (torch.randint(0, 3, (caches, cap), generator=gen).float() if ties
             else torch.rand(caches, cap, generator=gen))
    flags = torch.randint(0, 16, (caches, cap), generator=gen, dtype=torch.uint8)
    args = [pos, score, flags, lengths,
            (torch.randint(0, 2, (caches, width), generator=gen).float() if ties
             else torch.rand(caches, width, generator=gen)),
            torch.full((caches,), cap), torch.randint(0, cap + 1, (caches,), generator=gen),
            torch.randint(0, cap + 1, (caches,), generator=gen),
            torch.rand(caches, generator=gen) < 0.2]
    want_args = [t.clone() for t in args]
    moves = ops.kv_evict_round(*args)
    want = ref.kv_evict_round_reference(*want_args)
    assert torch.equal(moves, want)
    assert torch.equal(args[3], want_args[3])
    valid = torch.arange(cap)[None] < want_args[3][:, None]  # past each length is free space
    for got, expected in zip(args[:3], want_args[:3]):
        assert torch.equal(got[valid], expected[valid])


@given(seed=SEEDS, bad=st.sampled_from(["length", "page", "work"]))
def test_kv_decode_rejects_bad_indices(seed, bad):
    gen = _generator(seed)
    kv_rows = _randn(gen, 8 * 4, 16)
    table = torch.randint(0, 8, (4, 3), generator=gen, dtype=torch.int32)
    lens = torch.tensor([12, 5, 0, 9], dtype=torch.int32)
    q = _randn(gen, 2, 4, 8)
    work = None
    if bad == "length":
        lens[1], match = 13, "lengths"
    elif bad == "page":
        table[0, 0], match = 8, "page_table"
    else:
        work, match = torch.tensor([[0, 0], [1, 0], [3, 0], [3, 4]], dtype=torch.int32), "work"
    with pytest.raises(IndexError, match=match):
        ops.kv_ragged_decode(q, kv_rows, table, lens, 4, 0.3, 1, work)


# ---- sparse MLP ----------------------------------------------------------------------------------

@given(seed=SEEDS, rows=st.integers(1, 5), d_in=st.integers(1, 40), d_out=st.integers(1, 40),
       n=st.integers(1, 48), share=st.floats(0, 1), per_row=st.booleans(), gated=st.booleans(),
       biases=st.booleans(), counted=st.booleans(), repeats=st.booleans(),
       activation=st.sampled_from(["relu", "gelu", "gelu_tanh", "silu"]),
       dtype=st.sampled_from(FLOATS))
def test_sparse_mlp_matches_reference(seed, rows, d_in, d_out, n, share, per_row, gated, biases,
                                      counted, repeats, activation, dtype):
    gen = _generator(seed)
    x = _randn(gen, rows, d_in, dtype=dtype)
    w_up, w_down_t = _randn(gen, n, d_in, dtype=dtype), _randn(gen, n, d_out, dtype=dtype)
    w_gate = _randn(gen, n, d_in, dtype=dtype) if gated else None
    b_up, b_gate, b_down = ((_randn(gen, n, dtype=dtype), _randn(gen, n, dtype=dtype) if gated
                             else None, _randn(gen, d_out, dtype=dtype)) if biases
                            else (None, None, None))
    k = int(share * n)

    def one_set():
        if repeats:  # indices may repeat (each occurrence counts) and hit both extremes
            return torch.cat([torch.randint(0, n, (k,), generator=gen),
                              torch.tensor([0, n - 1])])[:k]
        return torch.randperm(n, generator=gen)[:k]

    idx = torch.stack([one_set() for _ in range(rows)]) if per_row else one_set()
    counts = None
    if counted:
        counts = (torch.randint(0, k + 1, (rows,), generator=gen) if per_row
                  else torch.randint(0, k + 1, (1,), generator=gen)).to(idx.dtype)
    got = ops.sparse_mlp(x, w_up, w_down_t, idx, w_gate=w_gate, b_up=b_up, b_gate=b_gate,
                         b_down=b_down, counts=counts, activation=activation)
    want = ref.sparse_mlp_reference(x, w_up, w_gate, w_down_t, b_up, b_gate, b_down, idx, counts,
                                    activation)
    _close(got, want, dtype, scale=4.0)


@given(seed=SEEDS, n=st.integers(1, 40), groups=st.sampled_from([1, 2, 4]),
       width=st.sampled_from([16, 32, 48, 64]), gated=st.booleans(), rows=st.integers(1, 4),
       activation=st.sampled_from(["relu", "gelu", "gelu_tanh", "silu"]))
def test_quantized_neuron_scores_match_reference(seed, n, groups, width, gated, rows, activation):
    gen = _generator(seed)
    d = groups * width  # the op's scale groups are whole multiples of 16 columns
    x = _randn(gen, rows, d)
    q_up = torch.randint(-127, 128, (n, d), generator=gen, dtype=torch.int8)
    up_scale = torch.rand(n, groups, generator=gen) / 64
    q_gate = torch.randint(-127, 128, (n, d), generator=gen, dtype=torch.int8) if gated else None
    gate_scale = torch.rand(n, groups, generator=gen) / 64 if gated else None
    got = ops.quantized_neuron_scores(x, q_up, up_scale, q_gate=q_gate, gate_scale=gate_scale,
                                      activation=activation)
    want = ref.quantized_neuron_scores_reference(x, q_up, up_scale, q_gate, gate_scale,
                                                 activation=activation)
    _close(got, want, torch.float32, scale=10.0)


def test_quantized_neuron_scores_name_the_group_rule():
    with pytest.raises(ValueError, match="multiple of 16"):
        ops.quantized_neuron_scores(torch.randn(1, 24), torch.zeros(3, 24, dtype=torch.int8),
                                    torch.ones(3, 2))


@given(seed=SEEDS, n=st.integers(1, 20), k=st.integers(1, 6))
def test_sparse_mlp_rejects_out_of_range_neurons(seed, n, k):
    gen = _generator(seed)
    x, w_up, w_down_t = _randn(gen, 2, 8), _randn(gen, n, 8), _randn(gen, n, 5)
    for bad in (n, -1, 2**40):
        idx = torch.randint(0, n, (k,), generator=gen)
        idx[k // 2] = bad
        with pytest.raises(IndexError, match="active_idx"):
            ops.sparse_mlp(x, w_up, w_down_t, idx)


# ---- GaLore --------------------------------------------------------------------------------------

SIDES = st.sampled_from(["left", "right", "both", "none"])


def _projectors(gen, m: int, n: int, rank: int, sides: str, dtype):
    left = _randn(gen, m, rank, dtype=dtype) if sides in ("left", "both") else None
    right = _randn(gen, rank, n, dtype=dtype) if sides in ("right", "both") else None
    return left, right


@given(seed=SEEDS, m=st.integers(1, 40), n=st.integers(1, 40), rank=st.integers(1, 12),
       sides=st.sampled_from(["left", "right", "both"]), dtype=st.sampled_from(FLOATS))
@example(seed=1838, m=29, n=21, rank=1, sides="both", dtype=torch.float16)  # found by a search
def test_galore_projections_match_reference(seed, m, n, rank, sides, dtype):
    gen = _generator(seed)
    grad = _randn(gen, m, n, dtype=dtype)
    left, right = _projectors(gen, m, n, rank, sides, dtype)
    low = ops.galore_project(grad, left, right)
    # projectors are cast to the weight's dtype for the GEMMs, as the op documents, so with both
    # sides the intermediate is rounded too: the error is bounded by the GEMMs on magnitudes
    want_low = ref.galore_project_reference(grad, left, right)
    magnitude = ref.galore_project_reference(grad.abs(), None if left is None else left.abs(),
                                             None if right is None else right.abs())
    rtol = TOLERANCES[dtype][0]
    torch.testing.assert_close(low, want_low, rtol=4 * rtol,
                               atol=4 * rtol * max(float(magnitude.max()), 1.0))
    param = _randn(gen, m, n, dtype=dtype)
    want = (0.5 * param.float() + 0.25 * ref.galore_project_back_reference(low, left, right))
    ops.galore_project_back_(param, low, left, right, alpha=0.25, beta=0.5)
    _close_to_scale(param.float(), want, dtype, scale=8.0)


def test_galore_project_needs_a_side():
    with pytest.raises(ValueError, match="at least one of left and right"):
        ops.galore_project(torch.randn(3, 4), None, None)


@given(seed=SEEDS, m=st.integers(1, 33), n=st.integers(1, 33), rank=st.integers(1, 8),
       sides=SIDES, projected=st.booleans(), step=st.integers(1, 50),
       weight_decay=st.sampled_from([0.0, 0.1]), dtype=st.sampled_from(FLOATS))
def test_galore_adam_step_matches_reference(seed, m, n, rank, sides, projected, step,
                                            weight_decay, dtype):
    gen = _generator(seed)
    # projectors in the weight's dtype: the op casts them to it for its GEMMs
    left, right = _projectors(gen, m, n, rank, sides, dtype)
    low_shape = (left.shape[1] if left is not None else m, right.shape[0] if right is not None
                 else n)
    grad = _randn(gen, *low_shape) if projected else _randn(gen, m, n, dtype=dtype)
    param = _randn(gen, m, n, dtype=dtype)
    exp_avg = _randn(gen, *low_shape) * 0.1
    exp_avg_sq = torch.rand(*low_shape, generator=gen) * 0.1
    want = [t.clone() for t in (param, exp_avg, exp_avg_sq)]
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=weight_decay, scale=0.5,
                 step=step)
    ops.galore_adam_step(param, grad, left, right, exp_avg, exp_avg_sq,
                         grad_is_projected=projected, **hyper)
    ref.galore_adam_step_reference(want[0], grad, left, right, want[1], want[2],
                                   grad_is_projected=projected, **hyper)
    # a projection in fp16 / bf16 rounds the low-rank gradient to that dtype
    moments = torch.float32 if projected or sides == "none" else dtype
    _close_to_scale(exp_avg, want[1], moments, scale=2.0)
    _close_to_scale(exp_avg_sq, want[2], moments, scale=2.0)
    # the update divides by sqrt(v) + eps: rounding of the inputs scales with the step size
    _close(param, want[0], dtype, scale=4.0)


@given(seed=SEEDS, batch=st.integers(1, 3), hkv=st.integers(1, 3), group=st.integers(1, 4),
       d=st.sampled_from([1, 7, 8, 64]), page_rows=st.sampled_from([1, 4, 16]),
       pages=st.lists(st.integers(0, 4), min_size=9, max_size=9),
       around=st.lists(st.integers(-1, 1), min_size=9, max_size=9),
       dtype=st.sampled_from(FLOATS), with_capacity=st.booleans())
def test_kv_decode_step_matches_reference(seed, batch, hkv, group, d, page_rows, pages, around,
                                          dtype, with_capacity):
    from test_kv_decode_step import assert_same_step, make_step, run_both

    caches = batch * hkv
    # ragged lengths around page boundaries: k pages, one entry less, or one more
    lengths = [max(0, p * page_rows + a) for p, a in zip(pages[:caches], around[:caches])]
    args = make_step(batch, group * hkv, hkv, d, lengths, page_rows, dtype, seed=seed)
    capacity = None
    if with_capacity:  # graph steps: some caches full at their capacity
        capacity = torch.tensor(lengths) + torch.randint(0, 2, (caches,), generator=_generator(seed))
        capacity = capacity.clamp(min=1)
    got, want, want_args = run_both(args, page_rows, capacity=capacity)
    assert_same_step(args, want_args, got, want, dtype)
