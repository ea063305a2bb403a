"""sparse_mlp against its reference and the dense MLP, opcheck, determinism, and every rejection."""

import pytest
import torch

import fastllm.ops as ops
from fastllm._reference import dense_mlp_reference, sparse_mlp_reference
from helpers import FLOAT_DTYPES, TOLERANCES, poison, random_tensor

# (rows, d_in, n_neurons, d_out, k): one token, odd sizes, an empty set, a small batch, wide output
SHAPES = [(1, 64, 96, 64, 40), (3, 37, 53, 29, 17), (2, 16, 24, 16, 0), (5, 128, 200, 72, 200),
          (2, 80, 150, 600, 61)]  # last: several output column blocks, tails everywhere
ACTIVATIONS = [("silu", True), ("relu", False), ("gelu", False), ("gelu_tanh", True)]


def make_mlp(d_in, n, d_out, dtype, device, gated=True, bias=True):
    w = dict(w_up=random_tensor(n, d_in, dtype=dtype, device=device) / d_in ** 0.5,
             w_gate=random_tensor(n, d_in, dtype=dtype, device=device) / d_in ** 0.5
             if gated else None,
             w_down_t=random_tensor(n, d_out, dtype=dtype, device=device) / n ** 0.5)
    w["b_up"] = random_tensor(n, dtype=dtype, device=device) if bias else None
    w["b_gate"] = random_tensor(n, dtype=dtype, device=device) if bias and gated else None
    w["b_down"] = random_tensor(d_out, dtype=dtype, device=device) if bias else None
    return w


def call(x, w, idx, counts=None, activation="silu", deterministic=False):
    return ops.sparse_mlp(x, w["w_up"], w["w_down_t"], idx, w_gate=w["w_gate"], b_up=w["b_up"],
                          b_gate=w["b_gate"], b_down=w["b_down"], counts=counts,
                          activation=activation, deterministic=deterministic)


def ref(x, w, idx, counts=None, activation="silu"):
    return sparse_mlp_reference(x, w["w_up"], w["w_gate"], w["w_down_t"], w["b_up"], w["b_gate"],
                                w["b_down"], idx, counts, activation)


def tol(dtype):
    rtol, atol = TOLERANCES[dtype]
    return dict(rtol=rtol * 4, atol=atol * 4)  # a few roundings of the fp32 sum into dtype


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation,gated", ACTIVATIONS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_shared_set_matches_reference(device, dtype, shape, activation, gated, index_dtype):
    rows, d_in, n, d_out, k = shape
    w = make_mlp(d_in, n, d_out, dtype, device, gated=gated)
    x = random_tensor(rows, d_in, dtype=dtype, device=device)
    idx = torch.randperm(n)[:k].to(device=device, dtype=index_dtype)
    torch.testing.assert_close(call(x, w, idx, activation=activation),
                               ref(x, w, idx, activation=activation), **tol(dtype))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation,gated", ACTIVATIONS[:2])
@pytest.mark.parametrize("deterministic", [False, True])
def test_per_row_sets_match_reference(device, dtype, shape, activation, gated, deterministic):
    rows, d_in, n, d_out, k = shape
    w = make_mlp(d_in, n, d_out, dtype, device, gated=gated)
    x = random_tensor(rows, d_in, dtype=dtype, device=device)
    idx = torch.stack([torch.randperm(n)[:k] for _ in range(rows)]).to(device, torch.int32)
    counts = torch.randint(0, k + 1, (rows,), dtype=torch.int32, device=device)
    # Padding past each count holds -1: it must never be read.
    padded = idx.clone()
    padded[torch.arange(k, device=device)[None, :] >= counts[:, None]] = -1
    torch.testing.assert_close(
        call(x, w, padded, counts, activation, deterministic),
        ref(x, w, idx, counts, activation), **tol(dtype))
    # Without counts, every entry of each row counts.
    torch.testing.assert_close(call(x, w, idx, None, activation, deterministic),
                               ref(x, w, idx, None, activation), **tol(dtype))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_all_neurons_equal_dense_mlp(device, dtype):
    w = make_mlp(96, 160, 80, dtype, device)
    x = random_tensor(4, 96, dtype=dtype, device=device)
    dense = dense_mlp_reference(x.float(), w["w_up"].float(), w["w_gate"].float(),
                                w["w_down_t"].float().t(), w["b_up"].float(),
                                w["b_gate"].float(), w["b_down"].float(), "silu")
    out = call(x, w, torch.arange(160, device=device))
    torch.testing.assert_close(out, dense.to(dtype), **tol(dtype))


def test_relu_nonzero_neurons_equal_dense_mlp(device):
    w = make_mlp(64, 256, 48, torch.float32, device, gated=False)
    x = random_tensor(1, 64, device=device)
    dense = dense_mlp_reference(x, w["w_up"], None, w["w_down_t"].t(), w["b_up"], None,
                                w["b_down"], "relu")
    active = ((x @ w["w_up"].T + w["b_up"]) > 0).squeeze(0).nonzero().squeeze(1)
    assert 0 < active.numel() < 256  # a real subset, or the test would prove nothing
    torch.testing.assert_close(call(x, w, active, activation="relu"), dense)


def test_empty_set_gives_bias_or_zeros(device):
    w = make_mlp(32, 40, 24, torch.float32, device)
    x = random_tensor(3, 32, device=device)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    torch.testing.assert_close(call(x, w, empty), w["b_down"].expand(3, 24))
    w["b_down"] = None
    torch.testing.assert_close(call(x, w, empty), torch.zeros(3, 24, device=device))


def test_every_output_element_written(device):
    w = make_mlp(32, 64, 96, torch.float32, device, bias=False)
    x = random_tensor(2, 32, device=device)
    del_me = poison(torch.empty(2, 96, device=device))
    del del_me
    out = call(x, w, torch.arange(0, 64, 3, device=device))
    assert not out.isnan().any()


def test_deterministic_mode_is_bitwise_repeatable(device):
    w = make_mlp(256, 1024, 256, torch.float32, device)
    x = random_tensor(2, 256, device=device)
    idx = torch.randperm(1024, device=device)[:700]
    first = call(x, w, idx, deterministic=True)
    for _ in range(3):
        assert torch.equal(call(x, w, idx, deterministic=True), first)


# The CPU kernel has two strategies (csrc/sparse/sparse_mlp_cpu.cpp): fused slices for sets of at
# most 4 rows (decode), two phases for wider ones. Both must give the reference's answer, and the
# fused one the same bits whatever the number of threads (its slices are fixed by the set's count).
@pytest.mark.parametrize("activation,gated", ACTIVATIONS[:2])
def test_cpu_strategies_agree_at_the_boundary(activation, gated):
    w = make_mlp(96, 2048, 80, torch.float32, "cpu", gated=gated)
    x = random_tensor(5, 96)
    idx = torch.randperm(2048)[:1500]
    fused = call(x[:4], w, idx, activation=activation)      # 4 rows: fused
    two_phase = call(x, w, idx, activation=activation)      # 5 rows: two phases
    torch.testing.assert_close(fused, ref(x[:4], w, idx, activation=activation))
    torch.testing.assert_close(two_phase[:4], fused)


@pytest.mark.parametrize("per_row", [False, True])
def test_cpu_fused_result_does_not_depend_on_threads(per_row):
    w = make_mlp(128, 4096, 96, torch.float32, "cpu")
    x = random_tensor(3, 128)
    if per_row:
        idx = torch.stack([torch.randperm(4096)[:3000] for _ in range(3)])
        counts = torch.tensor([3000, 1200, 7])
    else:
        idx, counts = torch.randperm(4096)[:3000], None
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = call(x, w, idx, counts)
        torch.set_num_threads(max(2, threads))
        parallel = [call(x, w, idx, counts) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    for out in parallel:
        assert torch.equal(out, serial)
    torch.testing.assert_close(serial, ref(x, w, idx, counts))


def test_leading_dims_are_flattened(device):
    w = make_mlp(16, 32, 8, torch.float32, device)
    x = random_tensor(2, 3, 16, device=device)
    idx = torch.arange(0, 32, 2, device=device)
    out = call(x, w, idx)
    assert out.shape == (2, 3, 8)
    torch.testing.assert_close(out.reshape(6, 8), ref(x.reshape(6, 16), w, idx))


@pytest.mark.parametrize("per_row", [False, True])
def test_opcheck(device, per_row):
    w = make_mlp(24, 40, 16, torch.float32, device)
    x = random_tensor(3, 24, device=device)
    if per_row:
        idx = torch.stack([torch.randperm(40)[:10] for _ in range(3)]).to(device)
        counts = torch.tensor([10, 0, 4], device=device)
    else:
        idx, counts = torch.randperm(40)[:10].to(device), None
    torch.library.opcheck(torch.ops.fastllm.sparse_mlp.default,
                          (x, w["w_up"], w["w_gate"], w["w_down_t"], w["b_up"], w["b_gate"],
                           w["b_down"], idx, counts, "silu", False))


# ---- rejections --------------------------------------------------------------------------------

def _bad_cases(device):
    w = make_mlp(8, 12, 6, torch.float32, device)
    x = random_tensor(2, 8, device=device)
    idx = torch.arange(5, device=device)
    yield "out of range", dict(idx=torch.tensor([0, 12], device=device)), IndexError, r"\[0, 12\)"
    yield "negative", dict(idx=torch.tensor([-1, 2], device=device)), IndexError, "active_idx"
    yield "float idx", dict(idx=idx.float()), TypeError, "active_idx must have dtype"
    yield "3-D idx", dict(idx=idx.reshape(1, 1, 5)), ValueError, "1-D .* or 2-D"
    yield "per-row rows", dict(idx=idx.reshape(1, 5)), ValueError, "one row per row of x"
    yield "counts with 1-D", dict(counts=torch.tensor([1, 2], device=device)), ValueError, \
        "counts is only meaningful"
    yield "count too big", dict(idx=torch.zeros(2, 3, dtype=torch.long, device=device),
                                counts=torch.tensor([4, 1], device=device)), IndexError, "counts"
    yield "counts dtype", dict(idx=torch.zeros(2, 3, dtype=torch.long, device=device),
                               counts=torch.tensor([1, 1], dtype=torch.int32, device=device)), \
        TypeError, "counts must have active_idx's dtype"
    yield "x dtype", dict(x=x.half()), TypeError, "w_up must have the dtype of x"
    yield "x double", dict(x=x.double(), w_up=w["w_up"].double()), TypeError, "x must have dtype"
    yield "w_up shape", dict(w_up=w["w_up"][:, :7].contiguous()), ValueError, "w_up must have shape"
    yield "w_gate shape", dict(w_gate=w["w_gate"][:11].contiguous()), ValueError, "w_gate"
    yield "w_down_t rows", dict(w_down_t=w["w_down_t"][:11].contiguous()), ValueError, "w_down_t"
    yield "b_down length", dict(b_down=w["b_down"][:5].contiguous()), ValueError, "b_down"
    yield "non-contiguous", dict(w_up=torch.randn(8, 12, device=device).t()), ValueError, \
        "w_up must be contiguous"
    yield "activation", dict(activation="tanh"), ValueError, "activation must be one of"
    yield "x 1-D", dict(x=x[0]), ValueError, "x must be 2-D"


@pytest.mark.parametrize("case", range(17))
def test_rejects_bad_arguments(device, case):
    name, change, error, match = list(_bad_cases(device))[case]
    w = make_mlp(8, 12, 6, torch.float32, device)
    args = dict(x=random_tensor(2, 8, device=device), w_up=w["w_up"], w_gate=w["w_gate"],
                w_down_t=w["w_down_t"], b_up=w["b_up"], b_gate=w["b_gate"], b_down=w["b_down"],
                idx=torch.arange(5, device=device), counts=None, activation="silu")
    args.update(change)
    with pytest.raises(error, match=match):
        torch.ops.fastllm.sparse_mlp.default(
            args["x"], args["w_up"], args["w_gate"], args["w_down_t"], args["b_up"],
            args["b_gate"], args["b_down"], args["idx"], args["counts"], args["activation"], False)
