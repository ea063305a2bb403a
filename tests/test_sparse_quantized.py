"""quantized_neuron_scores (the int8 predictor's op) against its reference, the quantizer, the
QuantizedPredictor module and its predictors' save/load, opcheck, and every rejection."""

import pytest
import torch

import fastllm.ops as ops
import fastllm.sparse as sparse
from fastllm._ops.sparse import quantize_rows_int8
from fastllm._reference import quantized_neuron_scores_reference
from fastllm.nn import QuantizedPredictor, SparseMLP
from helpers import FLOAT_DTYPES, random_tensor

# (rows, d_in, n_neurons, group): one token, several groups per row, a group that is the whole
# row, a batch with a neuron count off any vector width, no rows at all
SHAPES = [(1, 64, 96, 16), (3, 96, 53, 32), (5, 576, 200, 64), (2, 48, 17, 48), (0, 32, 8, 16)]
ACTIVATIONS = [("silu", True), ("relu", False), ("gelu", False), ("gelu_tanh", True)]


def quantized_mlp(d_in, n, group, device, gated=True, bias=True):
    w_up = random_tensor(n, d_in) / d_in ** 0.5
    w_gate = random_tensor(n, d_in) / d_in ** 0.5 if gated else None
    q_up, up_scale = quantize_rows_int8(w_up, group)
    q_gate, gate_scale = quantize_rows_int8(w_gate, group) if gated else (None, None)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dict(q_up=to(q_up), up_scale=to(up_scale), q_gate=to(q_gate),
                gate_scale=to(gate_scale), b_up=to(random_tensor(n)) if bias else None,
                b_gate=to(random_tensor(n)) if bias and gated else None,
                w_up=w_up.to(device), w_gate=to(w_gate))


def call(x, w, activation="silu"):
    return ops.quantized_neuron_scores(x, w["q_up"], w["up_scale"], q_gate=w["q_gate"],
                                       gate_scale=w["gate_scale"], b_up=w["b_up"],
                                       b_gate=w["b_gate"], activation=activation)


def ref(x, w, activation="silu"):
    return quantized_neuron_scores_reference(x, w["q_up"], w["up_scale"], w["q_gate"],
                                             w["gate_scale"], w["b_up"], w["b_gate"], activation)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation,gated", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
def test_scores_match_reference(device, dtype, shape, activation, gated, bias):
    rows, d_in, n, group = shape
    w = quantized_mlp(d_in, n, group, device, gated=gated, bias=bias)
    x = random_tensor(rows, d_in, dtype=dtype, device=device)
    out = call(x, w, activation)
    assert out.dtype == torch.float32 and out.shape == (rows, n)
    # Same fp32 inputs on both sides; only the summation order differs.
    torch.testing.assert_close(out, ref(x, w, activation), rtol=1e-4, atol=1e-5)


def test_leading_dims_are_flattened(device):
    w = quantized_mlp(32, 24, 16, device)
    x = random_tensor(2, 3, 32, device=device)
    out = call(x, w)
    assert out.shape == (2, 3, 24)
    torch.testing.assert_close(out.reshape(6, 24), ref(x.reshape(6, 32), w), rtol=1e-4, atol=1e-5)


def test_quantizer_error_is_at_most_half_a_step():
    w = random_tensor(40, 96)
    w[3, 32:64] = 0  # an all-zero group: scale 0, codes 0
    q, scale = quantize_rows_int8(w, 32)
    assert q.dtype == torch.int8 and scale.shape == (40, 3)
    assert scale[3, 1] == 0 and (q[3, 32:64] == 0).all()
    assert q.abs().max() <= 127
    step = scale.repeat_interleave(32, dim=1)
    assert ((q.float() * step - w).abs() <= step / 2 + 1e-7).all()
    with pytest.raises(ValueError, match="group must divide"):
        quantize_rows_int8(w, 24)


def test_int8_scores_rank_neurons_like_the_dense_mlp(device):
    # The predictor's reason to exist: top half by int8 scores ~= top half by the true |h|.
    w = quantized_mlp(256, 1024, 64, device, bias=False)
    x = random_tensor(16, 256, device=device)
    h = (torch.nn.functional.silu(x @ w["w_gate"].T) * (x @ w["w_up"].T)).abs()
    keep = 512
    truth = torch.zeros_like(h, dtype=torch.bool).scatter_(1, h.topk(keep, -1).indices, True)
    recall = truth.gather(1, call(x, w).topk(keep, -1).indices).float().mean().item()
    assert recall > 0.97


def test_opcheck(device):
    w = quantized_mlp(48, 40, 16, device)
    x = random_tensor(3, 48, device=device)
    torch.library.opcheck(torch.ops.fastllm.quantized_neuron_scores.default,
                          (x, w["q_up"], w["up_scale"], w["q_gate"], w["gate_scale"], w["b_up"],
                           w["b_gate"], "silu"))


# ---- the module and its predictors -------------------------------------------------------------

def test_module_keeps_scales_fp32_when_cast():
    w_up, w_gate = random_tensor(24, 32), random_tensor(24, 32)
    pred = QuantizedPredictor.from_weights(w_up, w_gate, group=16)
    scale = pred.up_scale.clone()
    pred.to(torch.bfloat16)
    assert pred.up_scale.dtype == torch.float32 and torch.equal(pred.up_scale, scale)
    assert pred.q_up.dtype == torch.int8
    x = random_tensor(2, 32, dtype=torch.bfloat16)
    assert pred.magnitude(x).dtype == torch.float32


def test_module_rejects_a_group_that_does_not_fit():
    with pytest.raises(ValueError, match="group must divide d_model"):
        QuantizedPredictor(48, 10, group=32)


transformers = pytest.importorskip("transformers")


def tiny_llama(name="tiny-llama-q"):
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=160,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    config._name_or_path = name
    return transformers.LlamaForCausalLM(config).eval()


def test_quantized_predictors_select_like_the_oracle_and_save_load(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama()
    ids = torch.randint(0, 97, (4, 16))
    preds = sparse.train_predictors(model, ids, kind="quantized", group=16, progress=False)
    assert preds.kind == "quantized" and len(preds.stats) == 2
    assert all(s["topk_recall_vs_oracle@0.5"] > 0.95 for s in preds.stats)
    # The offset makes logit > 0 keep about half of the neurons on the calibration tokens.
    x = torch.randn(64, 48)
    assert 0.3 < (preds.layers[0](x) > 0).float().mean().item() < 0.7
    path = tmp_path / "q.safetensors"
    preds.save(path)
    loaded = sparse.Predictors.load(path, model)
    assert loaded.kind == "quantized" and loaded.layers[0].group == 16
    for a, b in zip(preds.layers, loaded.layers):
        assert torch.equal(a.q_gate, b.q_gate) and torch.equal(a.up_scale, b.up_scale)
        assert torch.equal(a.offset, b.offset)
    with pytest.raises(sparse.PredictorMismatchError):
        sparse.Predictors.load(path, tiny_llama("another-model"))
    # The decode fast path (top-k straight to the kernel) equals the masked evaluation.
    step = torch.randint(0, 97, (1, 1))
    sparse.sparsify(model, 0.5, mode="predictor", predictors=loaded, dense_above=None,
                    compute="masked")
    with torch.no_grad():
        masked = model(input_ids=step, use_cache=False).logits
    sparse.sparsify(model, 0.5, mode="predictor", predictors=loaded, dense_above=None)
    with torch.no_grad():
        fast = model(input_ids=step, use_cache=False).logits
    assert any(isinstance(m, SparseMLP) for m in model.modules())
    torch.testing.assert_close(fast, masked, rtol=1e-4, atol=1e-4)


def test_quantized_predictors_refuse_lookahead():
    with pytest.raises(ValueError, match="no lookahead form"):
        sparse.train_predictors(tiny_llama(), torch.randint(0, 97, (1, 8)), kind="quantized",
                                group=16, lookahead=True, progress=False)


# ---- rejections --------------------------------------------------------------------------------

def _bad_cases(device):
    w = quantized_mlp(32, 12, 16, device)
    x = random_tensor(2, 32, device=device)
    yield dict(q_up=w["q_up"].float()), TypeError, r"q_up must be int8 \(one weight per byte\)"
    yield dict(q_up=w["q_up"][:, :16].contiguous()), ValueError, "q_up must have shape"
    yield dict(up_scale=w["up_scale"].half()), TypeError, "up_scale must have dtype"
    yield dict(up_scale=torch.ones(12, 3, device=device)), ValueError, "groups dividing d_in"
    yield dict(up_scale=torch.ones(12, 4, device=device),
               gate_scale=torch.ones(12, 4, device=device)), ValueError, "multiple of 16"
    yield dict(gate_scale=None), ValueError, "q_gate and gate_scale must be given together"
    yield dict(gate_scale=torch.ones(12, 1, device=device)), ValueError, \
        "gate_scale must have up_scale's groups"
    yield dict(b_up=w["b_up"].half()), TypeError, "b_up must have dtype"
    yield dict(b_up=w["b_up"][:5].contiguous()), ValueError, "b_up must have length"
    yield dict(q_gate=None, gate_scale=None), ValueError, "b_gate was given without q_gate"
    yield dict(x=x[0]), ValueError, "x must be 2-D"
    yield dict(x=x.double()), TypeError, "x must have dtype"
    yield dict(q_up=torch.zeros(32, 12, dtype=torch.int8, device=device).t()), ValueError, \
        "q_up must be contiguous"
    yield dict(activation="tanh"), ValueError, "activation must be one of"
    yield dict(x=torch.zeros(2, 0, device=device), q_up=torch.zeros(12, 0, dtype=torch.int8,
               device=device), q_gate=None, gate_scale=None, b_gate=None), ValueError, \
        "at least one column"


@pytest.mark.parametrize("case", range(15))
def test_rejects_bad_arguments(device, case):
    change, error, match = list(_bad_cases(device))[case]
    w = quantized_mlp(32, 12, 16, device)
    args = dict(x=random_tensor(2, 32, device=device), q_up=w["q_up"], up_scale=w["up_scale"],
                q_gate=w["q_gate"], gate_scale=w["gate_scale"], b_up=w["b_up"],
                b_gate=w["b_gate"], activation="silu")
    args.update(change)
    with pytest.raises(error, match=match):
        torch.ops.fastllm.quantized_neuron_scores.default(*args.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rejects_a_misaligned_weight():
    w = quantized_mlp(32, 12, 16, "cuda")
    storage = torch.zeros(12 * 32 + 1, dtype=torch.int8, device="cuda")
    shifted = storage[1:].view(12, 32)
    shifted.copy_(w["q_up"])
    with pytest.raises(ValueError, match="16-byte boundary"):
        ops.quantized_neuron_scores(random_tensor(1, 32, device="cuda"), shifted, w["up_scale"])
