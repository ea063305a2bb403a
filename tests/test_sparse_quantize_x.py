"""quantized_neuron_scores(quantize_x=True): x rounded to int8 per scale group, integer dots (the
CPU's fast path for the predictor). Against the reference, a hand-computed case, the AVX2 paths
against the scalar one and packed int4 against int8 storage, opcheck, bad input, and the
QuantizedPredictor default (on for CPU inputs)."""

import pytest
import torch

import fastllm.ops as ops
from fastllm._ops.sparse import pack_int4_rows, quantize_rows_int8
from fastllm._reference import quantized_neuron_scores_reference
from fastllm.nn import QuantizedPredictor
from helpers import FLOAT_DTYPES, random_tensor

# (rows, d_in, n_neurons, group, packed): 16-column tails (group 16, 48), whole-row groups, a
# neuron count off any vector width, no rows. Packed rows with groups of whole 32-column blocks
# take 128-column chunks on AVX-512: a short last chunk of 1-3 blocks (64, 576, 608), a span of 16
# blocks with 1, 2, 3 or 4 blocks per group (576, 640, 1152, 2048; with 96 a group straddles
# spans).
SHAPES = [(1, 64, 96, 16, False), (3, 96, 53, 32, False), (2, 576, 200, 64, False),
          (2, 48, 17, 48, False), (0, 32, 8, 16, False), (1, 64, 40, 32, True),
          (3, 576, 77, 32, True), (2, 96, 9, 16, True), (1, 96, 9, 48, True),
          (2, 608, 19, 32, True), (1, 640, 21, 64, True), (2, 1152, 13, 96, True),
          (1, 2048, 9, 128, True)]


def weights(d_in, n, group, packed, gated=True, bias=False, device="cpu"):
    """int8 codes (in [-7, 7] when packed, so both storages hold the same codes)."""
    def codes(w):
        if not packed:
            return quantize_rows_int8(w, group)
        scale = w.reshape(n, d_in // group, group).abs().amax(-1) / 7
        q = (w.reshape(n, d_in // group, group) / scale[..., None].clamp_min(1e-12)).round()
        return q.clamp(-7, 7).to(torch.int8).reshape(n, d_in), scale
    q_up, up_scale = codes(random_tensor(n, d_in))
    q_gate, gate_scale = codes(random_tensor(n, d_in)) if gated else (None, None)
    store = pack_int4_rows if packed else (lambda q: q)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dict(q_up=to(store(q_up)), up_scale=to(up_scale),
                q_gate=None if q_gate is None else to(store(q_gate)), gate_scale=to(gate_scale),
                b_up=to(random_tensor(n)) if bias else None,
                b_gate=to(random_tensor(n)) if bias and gated else None,
                int8_up=q_up, int8_gate=q_gate)


def scores(x, w, activation="silu", quantize_x=True, up="q_up", gate="q_gate"):
    return ops.quantized_neuron_scores(x, w[up], w["up_scale"], q_gate=w[gate],
                                       gate_scale=w["gate_scale"], b_up=w["b_up"],
                                       b_gate=w["b_gate"], activation=activation,
                                       quantize_x=quantize_x)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gated,bias,activation", [(True, False, "silu"), (True, True, "gelu"),
                                                   (False, True, "relu")])
def test_scores_match_reference(device, dtype, shape, gated, bias, activation):
    rows, d_in, n, group, packed = shape
    w = weights(d_in, n, group, packed, gated, bias, device)
    x = random_tensor(rows, d_in, dtype=dtype, device=device)
    x[:, :group] = 0 if rows else x[:, :group]  # an all-zero group: scale 0, codes 0
    got = scores(x, w, activation)
    want = quantized_neuron_scores_reference(x, w["q_up"], w["up_scale"], w["q_gate"],
                                             w["gate_scale"], w["b_up"], w["b_gate"], activation,
                                             quantize_x=True)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    same_up_to_summation_order(got, want)


def test_a_hand_computed_case():
    # One neuron, group 16. x's group max is 127/64, so its scale is exactly 1/64: x = 1.0 is code
    # 64, and 1/128 and 3/128 are exactly half-way (0.5 and 1.5 steps): half to even gives 0, 2.
    x = torch.zeros(1, 16)
    x[0, 0], x[0, 1], x[0, 2], x[0, 3] = 127 / 64, 1.0, 1 / 128, 3 / 128
    q = torch.zeros(1, 16, dtype=torch.int8)
    q[0, 0], q[0, 1], q[0, 2], q[0, 3] = 1, -2, 100, 1
    scale = torch.tensor([[0.5]])
    got = ops.quantized_neuron_scores(x, q, scale, activation="relu", quantize_x=True)
    integer_dot = 127 * 1 + 64 * -2 + 0 * 100 + 2 * 1  # = 1
    assert got.item() == 0.5 * (1 / 64) * integer_dot
    without = ops.quantized_neuron_scores(x, q, scale, activation="relu")
    assert without.item() == pytest.approx(0.5 * (127 / 64 - 2 + 100 / 128 + 3 / 128))


def same_up_to_summation_order(got, want):
    # fp32 sums in another order: errors of a few ulps of the largest terms, so the tolerance
    # follows the scores' scale (a score near 0 is a difference of large terms).
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale + 1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("avx512", [True, False])
def test_vector_path_equals_scalar_path(shape, avx512, monkeypatch):
    # Groups of whole 32-column blocks take a block path (AVX-512 VNNI where the CPU has it, else
    # AVX2: float lanes, another summation order); the others the per-group path, which sums
    # each group's integers first: bit for bit.
    rows, d_in, n, group, packed = shape
    w = weights(d_in, n, group, packed, bias=True)
    x = random_tensor(rows, d_in)
    if not avx512:
        monkeypatch.setenv("FASTLLM_CPU_NO_AVX512", "1")
    vector = scores(x, w)
    monkeypatch.setenv("FASTLLM_CPU_SCALAR", "1")
    scalar = scores(x, w)
    if group % 32:
        assert torch.equal(scalar, vector)
    else:
        same_up_to_summation_order(vector, scalar)


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[4]])
def test_packed_int4_equals_int8_storage_of_the_same_codes(shape):
    rows, d_in, n, group, _ = shape
    w = weights(d_in, n, group, True)
    x = random_tensor(rows, d_in)
    packed, one_per_byte = scores(x, w), scores(x, w, up="int8_up", gate="int8_gate")
    if group % 32:
        assert torch.equal(packed, one_per_byte)
    else:
        same_up_to_summation_order(packed, one_per_byte)


def test_rounding_barely_moves_the_ranking():
    # The predictor only ranks: its top half with rounded x ~= its top half with fp32 x.
    w = weights(576, 1536, 32, True)
    x = random_tensor(8, 576)
    exact, rounded = scores(x, w, quantize_x=False), scores(x, w)
    keep = 768
    truth = torch.zeros_like(exact, dtype=torch.bool).scatter_(1, exact.topk(keep, -1).indices,
                                                               True)
    assert truth.gather(1, rounded.topk(keep, -1).indices).float().mean() > 0.98


def test_opcheck(device):
    w = weights(64, 40, 32, True, bias=True, device=device)
    x = random_tensor(3, 64, device=device)
    torch.library.opcheck(torch.ops.fastllm.quantized_neuron_scores.default,
                          (x, w["q_up"], w["up_scale"], w["q_gate"], w["gate_scale"], w["b_up"],
                           w["b_gate"], "silu", True))


def test_quantize_x_must_be_a_bool():
    w = weights(32, 8, 16, False)
    with pytest.raises(TypeError, match="quantize_x must be a bool, got str"):
        scores(random_tensor(1, 32), w, quantize_x="yes")
    with pytest.raises(ValueError, match="quantize_x must be None, True or False"):
        QuantizedPredictor(32, 8, group=16, quantize_x=1)


@pytest.mark.parametrize("activation", ["silu", "relu"])
def test_scores_hold_at_extreme_gates(activation):
    # SiLU and ReLU scores are computed on vectors (a polynomial e^x, clamped to [-87, 88]): gates
    # of +-200 must still give act(g) * u within rounding of the reference, and never inf or NaN.
    w = weights(64, 48, 32, True)
    w["gate_scale"] = w["gate_scale"] * torch.logspace(-3, 3, 48)[:, None]
    x = random_tensor(3, 64) * 4
    got = scores(x, w, activation)
    want = quantized_neuron_scores_reference(x, w["q_up"], w["up_scale"], w["q_gate"],
                                             w["gate_scale"], None, None, activation,
                                             quantize_x=True)
    gate = x @ (w["int8_gate"].float().view(48, 2, 32) * w["gate_scale"][..., None]).view(48, 64).T
    assert gate.max() > 200 and (-gate).max() > 200  # the scales reach both clamps
    assert torch.isfinite(got).all()
    same_up_to_summation_order(got, want)
    tiny = want < 1e-30  # e^-200 underflows; the clamp leaves at most e^-87 * |g u| there
    assert tiny.any() and (got[tiny] < 1e-30).all()


def test_predictor_rounds_cpu_inputs_unless_told_not_to():
    w_up, w_gate = random_tensor(64, 96), random_tensor(64, 96)
    x = random_tensor(2, 96)
    default = QuantizedPredictor.from_weights(w_up, w_gate, group=32, bits=4)
    off = QuantizedPredictor.from_weights(w_up, w_gate, group=32, bits=4, quantize_x=False)
    on = ops.quantized_neuron_scores(x, default.q_up, default.up_scale, q_gate=default.q_gate,
                                     gate_scale=default.gate_scale, quantize_x=True)
    assert torch.equal(default.magnitude(x), on)
    assert not torch.equal(off.magnitude(x), on)
    torch_impl = QuantizedPredictor.from_weights(w_up, w_gate, group=32, bits=4, impl="torch")
    torch.testing.assert_close(torch_impl.magnitude(x), on, rtol=1e-4, atol=1e-5)
    assert "quantize_x=False" in repr(off)
