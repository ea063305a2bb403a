"""lora_shrink / lora_expand against the per-adapter reference, over adapter popularity
distributions, mixed ranks, empty rows, both paths, fused slices; gradcheck, opcheck and every
rejection."""

import pytest
import torch

import fastllm.ops as ops
from fastllm._reference import lora_expand_reference, lora_shrink_reference
from helpers import FLOAT_DTYPES, TOLERANCES, poison, random_tensor, value_checks

RANKS = [1, 8, 16, 64, 128, 256]


def adapter_ids(popularity: str, tokens: int, adapters: int) -> torch.Tensor:
    """Batch adapter of every token under one of Punica's popularity patterns."""
    if popularity == "distinct":
        ids = torch.randperm(max(tokens, adapters))[:tokens] % adapters
    elif popularity == "uniform":
        ids = torch.randint(0, adapters, (tokens,))
    elif popularity == "zipf":
        weights = 1.0 / torch.arange(1, adapters + 1, dtype=torch.float64) ** 1.5
        ids = torch.multinomial(weights, tokens, replacement=True)
    elif popularity == "identical":
        ids = torch.zeros(tokens, dtype=torch.int64)
    else:
        raise ValueError(popularity)
    return ids


def paged_tables(ranks: torch.Tensor, widths: list[int], row_width: int, dtype, device,
                 spare: int = 64):
    """A pool holding, for each slice and adapter, A rows of row_width and B^T rows of widths[s],
    scattered in random order with gaps, plus the row tables that point at them."""
    slices, adapters = ranks.shape
    max_rank = max(1, int(ranks.max()))
    rows = []  # (kind, s, a, j, width)
    for s in range(slices):
        for a in range(adapters):
            for j in range(int(ranks[s, a])):
                rows.append((0, s, a, j, row_width))
                rows.append((1, s, a, j, widths[s]))
    perm = torch.randperm(len(rows)).tolist()
    a_rows = torch.zeros(slices, adapters, max_rank, dtype=torch.int64)
    b_rows = torch.zeros(slices, adapters, max_rank, dtype=torch.int64)
    pos = spare
    for i in perm:
        kind, s, a, j, width = rows[i]
        (a_rows if kind == 0 else b_rows)[s, a, j] = pos
        pos += width + 8  # gaps: a kernel that reads past a row's end reads poison
    pool = poison(torch.empty(pos + spare, dtype=dtype))
    filler = random_tensor(pos + spare, dtype=dtype)
    for kind, s, a, j, width in rows:
        start = int((a_rows if kind == 0 else b_rows)[s, a, j])
        pool[start:start + width] = filler[start:start + width]
    return (pool.to(device), a_rows.to(device), b_rows.to(device),
            ranks.to(device=device, dtype=torch.int32))


def mixed_ranks(slices, adapters):
    choice = torch.randint(0, len(RANKS), (adapters,))
    ranks = torch.tensor(RANKS)[choice]
    return ranks.unsqueeze(0).expand(slices, adapters).contiguous()


def check_case(device, dtype, tokens, adapters, popularity, widths, row_width, path,
               empty_every=5, index_dtype=torch.int64):
    slices = len(widths)
    ranks = mixed_ranks(slices, adapters)
    pool, a_rows, b_rows, ranks = paged_tables(ranks, widths, row_width, dtype, device)
    ids = adapter_ids(popularity, tokens, adapters)
    if empty_every:
        ids[::empty_every] = -1  # base-model rows
    ids = ids.to(device=device, dtype=index_dtype)
    x = random_tensor(tokens, row_width, dtype=dtype, device=device)
    h = ops.lora_shrink(x, pool, a_rows, ranks, ids, path)
    h_ref = lora_shrink_reference(x, pool, a_rows, ranks, ids)
    assert h.dtype == torch.float32 and h.shape == (slices, tokens, a_rows.shape[2])
    rtol, atol = TOLERANCES[torch.float32]
    torch.testing.assert_close(h, h_ref, rtol=rtol, atol=atol * row_width ** 0.5)

    scalings = torch.rand(slices, adapters, device=device) + 0.5
    y = random_tensor(tokens, sum(widths), dtype=dtype, device=device)
    before = y.clone()
    y_ref = lora_expand_reference(y, h, pool, b_rows, ranks, scalings, ids, widths)
    ops.lora_expand(y, h, pool, b_rows, ranks, scalings, ids, widths, path)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol * 10)
    base_rows = ids == -1
    torch.testing.assert_close(y[base_rows], before[base_rows], rtol=0, atol=0)


@pytest.mark.parametrize("popularity", ["distinct", "uniform", "zipf", "identical"])
@pytest.mark.parametrize("path", [1, 2])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_popularity_mixed_ranks(device, popularity, path, dtype):
    check_case(device, dtype, tokens=48, adapters=12, popularity=popularity, widths=[72],
               row_width=64, path=path)


@pytest.mark.parametrize("path", [0, 1, 2])
def test_fused_slices_odd_widths(device, path):
    # a fused qkv-like projection: three slices of different widths (multiples of 8) at once
    check_case(device, torch.float32, tokens=33, adapters=4, popularity="uniform",
               widths=[40, 24, 8], row_width=136, path=path, index_dtype=torch.int32)


@pytest.mark.parametrize("tokens, path", [(1, 0), (1, 2), (512, 1), (512, 2)])
def test_batch_1_and_512(device, tokens, path):
    check_case(device, torch.bfloat16, tokens=tokens, adapters=min(tokens, 40),
               popularity="zipf", widths=[32, 16], row_width=48, path=path, empty_every=7)


def test_all_rows_base_model_and_empty_batch(device):
    ranks = torch.tensor([[8, 3]], dtype=torch.int32)
    pool, a_rows, b_rows, ranks = paged_tables(ranks, [16], 24, torch.float32, device)
    x = random_tensor(5, 24, device=device)
    ids = torch.full((5,), -1, device=device)
    h = ops.lora_shrink(x, pool, a_rows, ranks, ids)
    assert (h == 0).all()
    y = random_tensor(5, 16, device=device)
    before = y.clone()
    ops.lora_expand(y, h, pool, b_rows, ranks, torch.ones(1, 2, device=device), ids, [16])
    assert torch.equal(y, before)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    h0 = ops.lora_shrink(x[:0], pool, a_rows, ranks, empty)
    assert h0.shape == (1, 0, 8)
    ops.lora_expand(y[:0], h0, pool, b_rows, ranks, torch.ones(1, 2, device=device), empty, [16])


def test_rows_beyond_rank_are_never_read(device):
    # Entries of the tables past an adapter's rank point outside the pool: must not be touched.
    ranks = torch.tensor([[2, 5]], dtype=torch.int32)
    pool, a_rows, b_rows, ranks = paged_tables(ranks, [16], 16, torch.float32, device)
    a_rows[0, 0, 2:] = 10**12
    b_rows[0, 0, 2:] = -(10**12)
    ids = torch.tensor([0, 1, 0, -1], device=device)
    x = random_tensor(4, 16, device=device)
    for path in (1, 2):
        h = ops.lora_shrink(x, pool, a_rows, ranks, ids, path)
        torch.testing.assert_close(h, lora_shrink_reference(x, pool, a_rows, ranks, ids))
        assert (h[0, 0, 2:] == 0).all()


# ---- autograd ------------------------------------------------------------------------------------

def _small_problem(device, widths=(8, 16)):
    ranks = torch.tensor([[3, 1, 4], [2, 0, 4]], dtype=torch.int32)[:len(widths)]
    pool, a_rows, b_rows, ranks = paged_tables(ranks, list(widths), 8, torch.float64, device,
                                               spare=4)
    pool = torch.randn_like(pool)  # gradcheck needs finite values everywhere
    ids = torch.tensor([0, 2, -1, 1, 0, 2], device=device)
    scalings = torch.tensor([[2.0, 0.5, 1.5], [1.0, 3.0, 0.25]], device=device)[:len(widths)]
    return pool, a_rows, b_rows, ranks, ids, scalings


@pytest.mark.parametrize("path", [1, 2])
def test_gradcheck_shrink(device, path):
    pool, a_rows, _, ranks, ids, _ = _small_problem(device)
    x = torch.randn(6, 8, dtype=torch.float64, device=device, requires_grad=True)
    pool.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, p: ops.lora_shrink(x, p, a_rows, ranks, ids, path), (x, pool))


@pytest.mark.parametrize("path", [1, 2])
def test_gradcheck_expand(device, path):
    pool, _, b_rows, ranks, ids, scalings = _small_problem(device)
    y = torch.randn(6, 24, dtype=torch.float64, device=device, requires_grad=True)
    h = torch.randn(2, 6, b_rows.shape[2], dtype=torch.float64, device=device, requires_grad=True)
    pool.requires_grad_()

    def fn(y, h, p):
        return ops.lora_expand(y.clone(), h, p, b_rows, ranks, scalings, ids, [8, 16], path)

    assert torch.autograd.gradcheck(fn, (y, h, pool))


def test_gradcheck_lora_layer_mixed_batch(device):
    # x -> base + LoRA(x), gradients for x and for every adapter's A and B rows (in the pool)
    pool, a_rows, b_rows, ranks, ids, scalings = _small_problem(device, widths=(16,))
    x = torch.randn(6, 8, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.randn(16, 8, dtype=torch.float64, device=device)
    pool.requires_grad_()

    def layer(x, p):
        y = x @ weight.T
        h = ops.lora_shrink(x, p, a_rows, ranks, ids)
        return ops.lora_expand(y, h, p, b_rows, ranks, scalings, ids, [16])

    assert torch.autograd.gradcheck(layer, (x, pool))


def test_opcheck(device):
    pool, a_rows, b_rows, ranks, ids, scalings = _small_problem(device)
    x = torch.randn(6, 8, dtype=torch.float64, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastllm.lora_shrink.default,
                          (x, pool.requires_grad_(), a_rows, ranks, ids, 2))
    pool32 = pool.detach().float()
    x32 = x.detach().float()
    h = torch.ops.fastllm.lora_shrink.default(x32, pool32, a_rows, ranks, ids, 1)
    torch.library.opcheck(torch.ops.fastllm.lora_shrink.default, (x32, pool32, a_rows, ranks, ids, 1))
    y = torch.randn(6, 24, device=device)
    for path in (1, 2):
        torch.library.opcheck(torch.ops.fastllm.lora_expand.default,
                              (y, h, pool32, b_rows, ranks, scalings, ids, [8, 16], path))


def test_torch_compile_traces_lora_ops(device):
    pool, a_rows, b_rows, ranks, ids, scalings = _small_problem(device, widths=(16,))
    pool = pool.float()
    x = random_tensor(6, 8, device=device)

    def layer(x, base):
        h = ops.lora_shrink(x, pool, a_rows, ranks, ids)
        return ops.lora_expand(base.clone(), h, pool, b_rows, ranks, scalings, ids, [16])

    base = random_tensor(6, 16, device=device)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, base), layer(x, base))


# ---- rejections ----------------------------------------------------------------------------------

def _shrink_args(device):
    pool, a_rows, _, ranks, ids, _ = _small_problem(device)
    return dict(x=random_tensor(6, 8, dtype=torch.float64, device=device), pool=pool,
                a_rows=a_rows, ranks=ranks, token_adapter=ids, path=0)


SHRINK_BAD = [
    ("x", lambda a: a["x"].float(), TypeError, r"lora_shrink: pool must have the dtype of x"),
    ("x", lambda a: a["x"][0], ValueError, r"lora_shrink: x must be 2-D"),
    ("x", lambda a: a["x"].t().contiguous().t(), ValueError, r"lora_shrink: x must be contiguous"),
    ("pool", lambda a: a["pool"].view(-1, 1), ValueError, r"lora_shrink: pool must be 1-D"),
    ("a_rows", lambda a: a["a_rows"].int(), TypeError, r"a_rows must have dtype in \{Long\}"),
    ("a_rows", lambda a: a["a_rows"][0], ValueError, r"a_rows must be 3-D"),
    ("a_rows", lambda a: a["a_rows"] + 10**9, IndexError, r"a_rows.*outside the pool"),
    ("ranks", lambda a: a["ranks"].long(), TypeError, r"ranks must have dtype in \{Int\}"),
    ("ranks", lambda a: a["ranks"][:, :2].contiguous(), ValueError, r"ranks must have shape"),
    ("ranks", lambda a: a["ranks"] + 5, ValueError, r"ranks must lie in \[0, 4\]"),
    ("token_adapter", lambda a: a["token_adapter"][:5], ValueError,
     r"token_adapter must have one entry per token \(6\), got 5"),
    ("token_adapter", lambda a: a["token_adapter"] + 3, IndexError,
     r"token_adapter must lie in \[-1, 3\)"),
    ("token_adapter", lambda a: a["token_adapter"].float(), TypeError,
     r"token_adapter must have dtype in \{Int, Long\}"),
    ("path", lambda a: 7, ValueError, r"path must be 0 \(auto\), 1 \(BGMV\) or 2 \(SGMV\), got 7"),
]


@pytest.mark.parametrize("case", range(len(SHRINK_BAD)))
def test_shrink_rejects_bad_input(device, case):
    name, make, error, message = SHRINK_BAD[case]
    args = _shrink_args(device)
    args[name] = make(args)
    with value_checks(device), pytest.raises(error, match=message):
        ops.lora_shrink(**args)


def _expand_args(device):
    pool, _, b_rows, ranks, ids, scalings = _small_problem(device)
    return dict(y=random_tensor(6, 24, dtype=torch.float64, device=device),
                h=torch.randn(2, 6, 4, dtype=torch.float64, device=device), pool=pool,
                b_rows=b_rows, ranks=ranks, scalings=scalings, token_adapter=ids,
                slice_sizes=[8, 16], path=0)


EXPAND_BAD = [
    ("slice_sizes", lambda a: [8, 8], ValueError, r"slice_sizes must add up to y's width 24"),
    ("slice_sizes", lambda a: [24], ValueError, r"slice_sizes must have one entry per slice \(2\)"),
    ("h", lambda a: a["h"].float(), TypeError, r"h must be Double"),
    ("h", lambda a: a["h"][:, :5].contiguous(), ValueError, r"h must have shape \[slices, tokens"),
    ("scalings", lambda a: a["scalings"].double(), TypeError, r"scalings must have dtype in \{Float\}"),
    ("scalings", lambda a: a["scalings"][:1].contiguous(), ValueError, r"scalings must have the shape"),
    ("b_rows", lambda a: a["b_rows"] - 10**6, IndexError, r"b_rows.*outside the pool"),
    ("y", lambda a: a["y"].float(), TypeError, r"lora_expand: pool must have the dtype of y"),
]


@pytest.mark.parametrize("case", range(len(EXPAND_BAD)))
def test_expand_rejects_bad_input_and_leaves_y_unchanged(device, case):
    name, make, error, message = EXPAND_BAD[case]
    args = _expand_args(device)
    args[name] = make(args)
    before = args["y"].clone()
    with value_checks(device), pytest.raises(error, match=message):
        ops.lora_expand(**args)
    torch.testing.assert_close(args["y"], before, rtol=0, atol=0)
