"""A correctness sweep of lora_shrink / lora_expand: a seeded generator of cases over the dimensions
that change which code runs (ranks 1..256 mixed in a batch, widths 8..8192 including odd multiples
of 8 and widths that are not whole 16-byte words, so the scalar fallback runs, 1..512 tokens,
Punica's four adapter popularity patterns, fp16/bf16/fp32, BGMV and SGMV with a plan from
lora_sgmv_plan, alone or with tensor-core chunks of 16, 32 or 64 tokens from lora_sgmv_chunks
(ragged last chunks wherever an adapter's tokens are not a whole number of them), several output
slices, rows at unaligned pool offsets, rows without an adapter).

On a GPU every case of CUDA_CASES runs on CUDA and is compared with the CPU kernel and the
pure-PyTorch reference. Everywhere, a small subset from the same generator runs the CPU kernel
against the reference, and every CUDA case is built and its layout checked, so the generator is
tested on machines that never run the CUDA sweep."""

from __future__ import annotations

import contextlib
import dataclasses
import random

import pytest
import torch

import fastllm.ops as ops
from fastllm._ops.lora import PATH_AUTO, PATH_BGMV, PATH_SGMV
from fastllm import _C
from fastllm._reference import lora_expand_reference, lora_shrink_reference
from helpers import TOLERANCES

cuda_only = pytest.mark.skipif(not (_C.with_cuda and torch.cuda.is_available()),
                               reason="needs a GPU and fastllm's CUDA kernels")

SEED = 20240614
RANKS = [1, 2, 3, 8, 16, 17, 32, 64, 100, 128, 256]
# Whole 16-byte words in every dtype (vector loads throughout).
ALIGNED = [8, 64, 512, 4096, 8192]
# Odd multiples of 8: whole words, but not a whole number of a warp's 32 words (tails).
ODD_EIGHTS = [24, 40, 136, 1032, 4104, 8184]
# Not whole words in fp16/bf16 (and 13, 1001, 4099 not in fp32 either): the scalar fallback.
UNALIGNED = [13, 100, 1001, 4099]
WIDTHS = ALIGNED + ODD_EIGHTS + UNALIGNED
TOKENS = [1, 2, 7, 33, 64, 129, 512]
POPULARITY = ["distinct", "uniform", "zipf", "identical"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (path, pass a plan from lora_sgmv_plan): SGMV always with one, as batched code calls it (on CUDA
# the op refuses SGMV without one); auto with a plan lets the GPU rule choose.
PATHS = [(PATH_BGMV, False), (PATH_SGMV, True), (PATH_AUTO, True),
         (PATH_AUTO, False)]
SLICES = [1, 1, 2, 3]
# Rows per tensor-core chunk with a plan (0: the plan's tiles only, the kernels' 8-token chunks;
# None: lora_sgmv_chunks' own choice for an H100 / H200).
CHUNK_ROWS = [0, 16, 32, 64, None]
ADAPTERS = {"uniform": [2, 8, 32], "zipf": [4, 16, 64], "identical": [1, 4]}
MAX_DISTINCT = 256


@dataclasses.dataclass(frozen=True)
class SweepCase:
    dtype: torch.dtype
    tokens: int
    hidden: int                            # x's width: A rows
    widths: tuple[int, ...]                # output slices: B^T rows, y = the slices side by side
    ranks: tuple[tuple[int, ...], ...]     # [slice][adapter]
    popularity: str
    path: int
    plan: bool
    chunk_rows: int | None                 # with a plan: see CHUNK_ROWS
    misaligned: bool                       # rows at pool offsets that are not whole words
    empty_every: int                       # every k-th token has no adapter (0: none)
    index_dtype: torch.dtype
    seed: int

    @property
    def adapters(self) -> int:
        return len(self.ranks[0])

    @property
    def vec(self) -> int:
        return 16 // torch.empty((), dtype=self.dtype).element_size()

    @property
    def scalar_fallback(self) -> bool:
        return self.misaligned or any(w % self.vec for w in (self.hidden, *self.widths))

    @property
    def elements(self) -> int:
        return sum(r * (self.hidden + w) for row, w in zip(self.ranks, self.widths) for r in row)

    @property
    def _chunk_id(self) -> str:
        if not self.plan or self.chunk_rows == 0:
            return ""
        return f"+chunks{self.chunk_rows or 'auto'}"

    @property
    def id(self) -> str:
        flat = [r for row in self.ranks for r in row]
        path = {PATH_AUTO: "auto", PATH_BGMV: "bgmv", PATH_SGMV: "sgmv"}[self.path]
        return (f"{str(self.dtype).replace('torch.', '')}-t{self.tokens}-h{self.hidden}-"
                f"w{'+'.join(map(str, self.widths))}-a{self.adapters}-r{min(flat)}..{max(flat)}-"
                f"{self.popularity}-{path}{'+plan' if self.plan else ''}"
                f"{self._chunk_id}"
                f"{'-unaligned-rows' if self.misaligned else ''}"
                f"{f'-empty{self.empty_every}' if self.empty_every else ''}")


def sweep_cases(count: int, seed: int = SEED, max_width: int = 8192, max_tokens: int = 512,
                budget: int = 12_000_000) -> list[SweepCase]:
    """`count` cases, the same for the same arguments. Each dimension walks its own list of
    values, reshuffled on every pass, so `count` at least as long as the longest list covers every
    value, and dimensions whose lists have the same length do not stay paired (distinct
    popularity does not always meet the same path); the rest of a case is drawn at random.
    `budget` caps the adapter elements of a case (ranks are halved, the largest first, until it
    fits; the case's featured rank goes last)."""
    rng = random.Random(seed)

    def walk(values):
        passes: list[list] = []

        def pick(i):
            while len(passes) <= i // len(values):
                passes.append(rng.sample(list(values), len(values)))
            return passes[i // len(values)][i % len(values)]
        return pick

    widths = [w for w in WIDTHS if w <= max_width]
    hidden_of, tokens_of = walk(widths), walk([t for t in TOKENS if t <= max_tokens])
    dtype_of, popularity_of, path_of = walk(DTYPES), walk(POPULARITY), walk(PATHS)
    rank_of, slices_of, chunk_rows_of = walk(RANKS), walk(SLICES), walk(CHUNK_ROWS)
    misaligned_of, index_of = walk([False, False, False, True]), walk([torch.int64, torch.int32])
    cases = []
    for i in range(count):
        tokens, popularity = tokens_of(i), popularity_of(i)
        slices = slices_of(i)
        out = [rng.choice(widths) for _ in range(slices)]
        while sum(out) > max_width:  # y stays at most max_width wide
            out[out.index(max(out))] = rng.choice([w for w in widths if w < max(out)])
        if popularity == "distinct":
            adapters = min(tokens, MAX_DISTINCT)
        else:
            adapters = rng.choice(ADAPTERS[popularity])
        featured = rank_of(i)
        first = [featured] + [rng.choice(RANKS) for _ in range(adapters - 1)]
        ranks = [first]
        for _ in range(1, slices):
            # A fused group's other projections: mostly the adapter's rank, sometimes not
            # targeted (0) or another rank.
            ranks.append([r if rng.random() < 0.6 else rng.choice([0] + RANKS) for r in first])
        hidden = hidden_of(i)
        while sum(r * (hidden + w) for row, w in zip(ranks, out) for r in row) > budget:
            flat = [(r, s, a) for s, row in enumerate(ranks) for a, r in enumerate(row)
                    if r > 1 and (s, a) != (0, 0)]
            if flat:
                _, s, a = max(flat)
            else:
                s, a = 0, 0
            ranks[s][a] //= 2
        path, plan = path_of(i)
        cases.append(SweepCase(
            dtype=dtype_of(i), tokens=tokens, hidden=hidden, widths=tuple(out),
            ranks=tuple(tuple(row) for row in ranks), popularity=popularity, path=path,
            plan=plan, chunk_rows=chunk_rows_of(i) if plan else 0, misaligned=misaligned_of(i),
            empty_every=rng.choice([0, 3, 7]) if tokens >= 8 else 0,
            index_dtype=index_of(i), seed=seed * 1000 + i))
    return cases


# A few dozen cases of at most 8 M adapter elements, so the sweep fits the GPU check's test stage:
# its host side (building, the CPU kernel, the float64 reference), which dominates, took 16 s
# for these 36 on the busy 2-core CPU machine, spread over the stage's pytest-xdist workers.
CUDA_COUNT, CUDA_BUDGET = 36, 8_000_000


def chunk_cases(seed: int = SEED + 2) -> list[SweepCase]:
    """Prefill-shaped SGMV cases for the tensor-core chunks, which the random walk above meets
    only at small token counts: each chunk size, with adapters holding several chunks and a
    ragged remainder (129 tokens on one adapter = 2 x 64 + 1; 512 over zipf- or uniformly
    popular adapters), mixed ranks across the 32-rank groups, aligned, odd and unaligned widths,
    in fp16 and bf16."""
    shapes = [  # (rows, dtype, tokens, popularity, ranks per slice, hidden, widths, misaligned)
        (16, torch.float16, 129, "identical", [[16], [100]], 1032, (1032, 136), False),
        (32, torch.bfloat16, 512, "zipf", [[16, 64, 8, 128]], 4096, (1024,), False),
        (64, torch.float16, 129, "identical", [[33]], 4104, (136,), False),
        (64, torch.bfloat16, 512, "identical", [[64], [8], [8]], 1001, (4096, 512, 512), False),
        (32, torch.float16, 129, "uniform", [[17, 256]], 64, (100,), True),
        (16, torch.bfloat16, 512, "uniform", [[32, 1]], 8192, (512,), False),
        (64, torch.float16, 512, "zipf", [[8, 16, 16, 64]], 4096, (4096,), False),
    ]
    cases = []
    for i, (rows, dtype, tokens, popularity, ranks, hidden, widths, misaligned) in \
            enumerate(shapes):
        assert len(widths) == len(ranks)  # one output slice per row of ranks
        cases.append(SweepCase(
            dtype=dtype, tokens=tokens, hidden=hidden, widths=widths,
            ranks=tuple(tuple(row) for row in ranks), popularity=popularity, path=PATH_SGMV,
            plan=True, chunk_rows=rows, misaligned=misaligned, empty_every=(0, 7)[i % 2],
            index_dtype=(torch.int64, torch.int32)[i % 2], seed=seed * 1000 + i))
    return cases


CUDA_CASES = sweep_cases(CUDA_COUNT, budget=CUDA_BUDGET) + chunk_cases()
# Small enough for the CPU reference on two busy cores.
CPU_CASES = sweep_cases(14, seed=SEED + 1, max_width=1032, max_tokens=129, budget=400_000)


def _ragged(case: SweepCase) -> bool:
    """Whether some adapter has more tokens than one chunk and not a whole number of chunks."""
    ids = build(case)["ids"].long()
    rows = case.chunk_rows
    counts = torch.bincount(ids[ids >= 0], minlength=case.adapters)
    return bool(((counts > rows) & (counts % rows != 0)).any())


# ---- building a case -----------------------------------------------------------------------------

def adapter_ids(popularity: str, tokens: int, adapters: int, generator) -> torch.Tensor:
    if popularity == "distinct":  # one token per adapter, as far as there are adapters
        ids = torch.randperm(tokens, generator=generator) % adapters
    elif popularity == "uniform":
        ids = torch.randint(0, adapters, (tokens,), generator=generator)
    elif popularity == "zipf":
        weights = 1.0 / torch.arange(1, adapters + 1, dtype=torch.float64) ** 1.5
        ids = torch.multinomial(weights, tokens, replacement=True, generator=generator)
    elif popularity == "identical":
        ids = torch.zeros(tokens, dtype=torch.int64)
    else:
        raise ValueError(popularity)
    return ids


def build(case: SweepCase) -> dict:
    """CPU tensors for one case. The adapter rows lie in the pool in random order, each followed
    by a gap of NaN (a kernel reading past a row's end, or a row it should skip, turns the result
    into NaN); table entries past a rank point far outside the pool (a kernel reading them fails
    the bounds checks). A rows are scaled by 1/sqrt(hidden) and B^T rows by 1/sqrt(max rank), so
    h and the update stay O(1) and one tolerance table fits every width and rank."""
    g = torch.Generator().manual_seed(case.seed)
    slices, adapters = len(case.widths), case.adapters
    ranks = torch.tensor(case.ranks, dtype=torch.int32)
    max_rank = max(1, int(ranks.max()))
    real = torch.arange(max_rank) < ranks.unsqueeze(-1)          # [S, A, R]
    where = real.nonzero()                                       # (s, a, j) of every real row
    n = where.shape[0]
    lengths = torch.cat([torch.full((n,), case.hidden), torch.tensor(case.widths)[where[:, 0]]])
    scale = torch.cat([torch.full((n,), case.hidden ** -0.5), torch.full((n,), max_rank ** -0.5)])
    if case.misaligned:
        gaps = torch.randint(1, 10, (2 * n,), generator=g)
        spare = 3
    else:
        # Every row starts on a whole 16-byte word in every dtype (8 elements), with a gap of
        # at least 8 elements after it.
        gaps = 8 + (-lengths) % 8
        spare = 8
    order = torch.randperm(2 * n, generator=g)
    span = lengths[order] + gaps[order]
    starts = torch.empty(2 * n, dtype=torch.int64)
    starts[order] = spare + torch.cumsum(span, 0) - span
    a_rows = torch.full((slices, adapters, max_rank), 10**12, dtype=torch.int64)
    b_rows = torch.full((slices, adapters, max_rank), -(10**12), dtype=torch.int64)
    a_rows[where[:, 0], where[:, 1], where[:, 2]] = starts[:n]
    b_rows[where[:, 0], where[:, 1], where[:, 2]] = starts[n:]
    body = int(span.sum())
    segment = torch.stack([scale[order], torch.full((2 * n,), float("nan"))], 1).flatten()
    counts = torch.stack([lengths[order], gaps[order]], 1).flatten()
    values = torch.randn(body, generator=g) * torch.repeat_interleave(segment, counts)
    nan = torch.full((spare,), float("nan"))
    pool = torch.cat([nan, values, nan]).to(case.dtype)
    ids = adapter_ids(case.popularity, case.tokens, adapters, g)
    if case.empty_every:
        ids[::case.empty_every] = -1
    return dict(
        x=torch.randn(case.tokens, case.hidden, generator=g).to(case.dtype), pool=pool,
        a_rows=a_rows, b_rows=b_rows, ranks=ranks, ids=ids.to(case.index_dtype),
        y=torch.randn(case.tokens, sum(case.widths), generator=g).to(case.dtype),
        scalings=torch.rand(slices, adapters, generator=g) + 0.5, starts=starts,
        lengths=lengths)


def run_ops(case: SweepCase, p: dict, device: str, h_in: torch.Tensor | None = None):
    """(h, y after expand) from the kernels on `device`, as CPU tensors. Expand takes `h_in` when
    given, else the h just computed: two devices' expands are then compared on the same h."""
    move = lambda t: t.to(device)  # noqa: E731
    ids = move(p["ids"])
    plan = ()
    if case.plan:
        order, tiles = ops.lora_sgmv_plan(p["ids"], case.adapters)
        plan = (order, tiles)
        if case.chunk_rows != 0:
            plan += (ops.lora_sgmv_chunks(tiles, case.chunk_rows),)
        plan = tuple(move(t) for t in plan)
    x, pool = move(p["x"]), move(p["pool"])
    a_rows, b_rows, ranks = move(p["a_rows"]), move(p["b_rows"]), move(p["ranks"])
    h = ops.lora_shrink(x, pool, a_rows, ranks, ids, case.path, *plan)
    y = p["y"].to(device, copy=True)  # expand writes y in place; p["y"] stays the input
    ops.lora_expand(y, move(h_in) if h_in is not None else h, pool, b_rows, ranks,
                    move(p["scalings"]), ids, list(case.widths), case.path, *plan)
    return h.cpu(), y.cpu()


def reference(case: SweepCase, p: dict, h: torch.Tensor):
    h_ref = lora_shrink_reference(p["x"], p["pool"], p["a_rows"], p["ranks"], p["ids"])
    y_ref = lora_expand_reference(p["y"], h, p["pool"], p["b_rows"], p["ranks"], p["scalings"],
                                  p["ids"], list(case.widths))
    return h_ref, y_ref


def assert_h_close(got, want, case):
    rtol, atol = TOLERANCES[torch.float32]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * case.hidden ** 0.5)


def assert_y_close(got, want, case, p):
    rtol, atol = TOLERANCES[case.dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * 10)
    untouched = p["ids"] == -1
    torch.testing.assert_close(got[untouched], p["y"][untouched], rtol=0, atol=0)


# ---- the generator, on any machine ---------------------------------------------------------------

def test_the_generator_is_deterministic_and_covers_every_dimension():
    # Same seed, same cases: a failure on a GPU can be rerun there, or built here.
    assert sweep_cases(CUDA_COUNT, budget=CUDA_BUDGET) + chunk_cases() == CUDA_CASES
    assert len({c.id for c in CUDA_CASES}) == len(CUDA_CASES)
    assert len({c.seed for c in CUDA_CASES}) == len(CUDA_CASES)
    seen = lambda f: {f(c) for c in CUDA_CASES}  # noqa: E731
    assert seen(lambda c: c.dtype) == set(DTYPES)
    assert seen(lambda c: c.hidden) == set(WIDTHS)
    assert seen(lambda c: c.tokens) == set(TOKENS)
    assert seen(lambda c: c.popularity) == set(POPULARITY)
    assert seen(lambda c: (c.path, c.plan)) == set(PATHS)
    assert seen(lambda c: c.chunk_rows) == set(CHUNK_ROWS)
    assert all(c.chunk_rows == 0 for c in CUDA_CASES if not c.plan)
    # Every chunk size on the tensor cores (fp16/bf16 with a plan) where some adapter has
    # several chunks and a ragged last one.
    assert {c.chunk_rows for c in CUDA_CASES
            if c.plan and c.chunk_rows and c.dtype != torch.float32 and _ragged(c)} == {16, 32, 64}
    assert seen(lambda c: c.index_dtype) == {torch.int32, torch.int64}
    assert seen(lambda c: c.misaligned) == {False, True}
    assert {len(c.widths) for c in CUDA_CASES} >= {1, 2, 3}
    assert any(c.empty_every for c in CUDA_CASES)
    ranks = {r for c in CUDA_CASES for row in c.ranks for r in row}
    assert set(RANKS) <= ranks and 0 in ranks  # every rank, and slices an adapter does not target
    assert any(len(set(c.ranks[0])) >= 3 for c in CUDA_CASES)  # mixed ranks within one batch
    assert any(c.popularity == "distinct" and c.adapters >= 64 for c in CUDA_CASES)
    # Both the vector and the scalar code, and the scalar code for each of its three reasons.
    assert {c.scalar_fallback for c in CUDA_CASES} == {False, True}
    assert any(c.hidden % c.vec for c in CUDA_CASES)
    assert any(w % c.vec for c in CUDA_CASES for w in c.widths)
    assert any(c.misaligned and not (c.hidden % c.vec) for c in CUDA_CASES)
    assert all(c.elements <= CUDA_BUDGET and sum(c.widths) <= 8192 for c in CUDA_CASES)
    assert max(c.elements for c in CUDA_CASES) > 1_000_000  # a few are large
    assert all(c.tokens <= 129 and c.hidden <= 1032 for c in CPU_CASES)


@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: c.id)
def test_every_cuda_case_builds_with_the_layout_it_names(case):
    if case.chunk_rows != 0:
        # The chunks cover the plan's tokens in order, at most chunk_rows of one adapter each.
        order, tiles = ops.lora_sgmv_plan(build(case)["ids"], case.adapters)
        chunks = ops.lora_sgmv_chunks(tiles, case.chunk_rows)
        sizes = chunks[:, 1] - chunks[:, 0]
        assert chunks[:, 0].tolist() == [0] + chunks[:-1, 1].tolist()
        assert int(chunks[-1, 1]) == order.numel()
        assert int(sizes.max()) <= (case.chunk_rows or 64)
    p = build(case)
    pool, starts = p["pool"], p["starts"]
    assert starts.numel() == 2 * sum(r for row in case.ranks for r in row)
    ends = starts + p["lengths"]
    assert int(starts.min()) > 0 and int(ends.max()) < pool.numel()
    order = torch.argsort(starts)
    assert bool((starts[order][1:] > ends[order][:-1]).all())  # rows never touch: a gap between
    assert bool(torch.isnan(pool[ends]).all())  # ... and it is poison
    aligned = starts % 8 == 0
    assert bool(aligned.all()) != case.misaligned or starts.numel() == 0
    assert not torch.isnan(pool[starts]).any()
    for s in range(len(case.widths)):
        for a in range(case.adapters):
            r = int(p["ranks"][s, a])
            assert (p["a_rows"][s, a, r:] == 10**12).all() and (p["b_rows"][s, a, r:] < 0).all()
    assert p["ids"].dtype == case.index_dtype and int(p["ids"].max()) < case.adapters
    if case.popularity == "identical":
        assert set(p["ids"].tolist()) <= {0, -1}
    if case.popularity == "distinct" and case.tokens <= MAX_DISTINCT:
        kept = p["ids"][p["ids"] >= 0]
        assert kept.unique().numel() == kept.numel()


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_cpu_kernels_match_the_reference(case):
    p = build(case)
    h, y = run_ops(case, p, "cpu")
    h_ref, y_ref = reference(case, p, h)
    assert_h_close(h, h_ref, case)
    assert_y_close(y, y_ref, case, p)


# ---- on a GPU ------------------------------------------------------------------------------------

@cuda_only
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: c.id)
def test_cuda_kernels_match_the_cpu_kernels_and_the_reference(case):
    with contextlib.suppress(IndexError):
        ops.raise_index_errors()  # clears what earlier tests in this process left
    p = build(case)
    h_cpu, y_cpu = run_ops(case, p, "cpu")
    # CUDA's expand takes the CPU's h, so y differences are the expand kernels' own.
    h_cuda, y_cuda = run_ops(case, p, "cuda", h_in=h_cpu)
    h_ref, y_ref = reference(case, p, h_cpu)
    assert_h_close(h_cuda, h_ref, case)
    assert_h_close(h_cuda, h_cpu, case)
    assert_y_close(y_cuda, y_ref, case, p)
    assert_y_close(y_cpu, y_ref, case, p)
    rtol, atol = TOLERANCES[case.dtype]
    torch.testing.assert_close(y_cuda, y_cpu, rtol=rtol, atol=atol * 10)
    ops.raise_index_errors()  # the table entries past each rank were never followed
