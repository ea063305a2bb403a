"""The cheaper quantized selections of issue 16: int4 weights, gate-only scores (CATS-style),
WINA-style input-channel sparsity of the predictor, the pure-PyTorch scoring path, the bytes
model, the per-dtype defaults, save/load and every rejection (tiny random models: fast)."""

import pytest
import torch
import torch.nn.functional as F

import fastllm.sparse as sparse
from fastllm._ops.sparse import unpack_int4_rows
from fastllm.nn import QuantizedPredictor, SparseMLP, quantize_rows
from helpers import random_tensor

transformers = pytest.importorskip("transformers")


def tiny_llama(name="tiny-llama-budget"):
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    config._name_or_path = name
    return transformers.LlamaForCausalLM(config).eval()


def tiny_opt():
    config = transformers.OPTConfig(vocab_size=97, hidden_size=48, ffn_dim=160,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    word_embed_proj_dim=48, max_position_embeddings=128)
    return transformers.OPTForCausalLM(config).eval()


def dequant(q, scale):
    if q.dtype == torch.uint8:  # 4 bits are stored packed two per byte
        q = unpack_int4_rows(q)
    n, d = q.shape
    return (q.float().reshape(n, scale.shape[1], -1) * scale[..., None]).reshape(n, d)


def topk_recall(scores, truth, keep):
    mask = torch.zeros_like(truth, dtype=torch.bool).scatter_(1, truth.topk(keep, -1).indices,
                                                              True)
    return mask.gather(1, scores.topk(keep, -1).indices).float().mean().item()


@pytest.mark.parametrize("group", [16, 32, 64])
def test_int4_quantizer_levels_and_error(group):
    w = random_tensor(40, 128)
    q, scale = quantize_rows(w, group, bits=4)
    assert q.dtype == torch.int8 and q.abs().max().item() <= 7
    assert scale.shape == (40, 128 // group)
    step = scale.repeat_interleave(group, dim=1)
    assert ((dequant(q, scale) - w).abs() <= step / 2 + 1e-6).all()
    # 8 bits is the int8 quantizer unchanged
    q8, s8 = quantize_rows(w, group, bits=8)
    assert q8.abs().max().item() == 127


def test_quantizer_rejects_other_widths():
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantize_rows(random_tensor(4, 32), 16, bits=3)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("score", ["gate_up", "gate"])
@pytest.mark.parametrize("bias", [False, True])
def test_scores_are_the_dequantized_mlp_and_torch_path_matches_op(bits, score, bias):
    torch.manual_seed(0)
    d, n = 64, 50
    w_up, w_gate = random_tensor(n, d) / 8, random_tensor(n, d) / 8
    b_up, b_gate = (random_tensor(n), random_tensor(n)) if bias else (None, None)
    # x unrounded: the scores are then exactly the dequantized MLP's (quantize_x is tested in
    # test_sparse_quantize_x.py)
    pred = QuantizedPredictor.from_weights(w_up, w_gate, b_up, b_gate, "silu", 32, bits=bits,
                                           score=score, quantize_x=False)
    assert pred.bits == bits and pred.score == score
    x = random_tensor(5, d)
    if score == "gate":
        assert pred.q_gate is None  # the gate rows are the only scored projection
        g = F.linear(x, dequant(pred.q_up, pred.up_scale), b_gate)
        expected = F.silu(g).abs()
    else:
        g = F.linear(x, dequant(pred.q_gate, pred.gate_scale), b_gate)
        u = F.linear(x, dequant(pred.q_up, pred.up_scale), b_up)
        expected = (F.silu(g) * u).abs()
    got = pred.magnitude(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    pred.impl = "torch"
    torch.testing.assert_close(pred.magnitude(x), got, rtol=1e-4, atol=1e-5)


def test_int4_gate_up_still_ranks_like_the_dense_mlp():
    torch.manual_seed(1)
    d, n = 128, 256
    w_up, w_gate = random_tensor(n, d), random_tensor(n, d)
    x = random_tensor(64, d)
    truth = (F.silu(x @ w_gate.T) * (x @ w_up.T)).abs()
    rec = {b: topk_recall(QuantizedPredictor.from_weights(w_up, w_gate, group=32, bits=b)
                          .magnitude(x), truth, n // 2) for b in (8, 4)}
    gate_only = topk_recall(QuantizedPredictor.from_weights(w_up, w_gate, group=32, score="gate")
                            .magnitude(x), truth, n // 2)
    assert rec[8] > 0.97 and rec[4] > 0.85 and rec[8] >= rec[4]
    assert gate_only < rec[4]  # blind to |up|


def test_input_keep_scores_the_top_channels_only():
    torch.manual_seed(2)
    d, n = 64, 40
    w_up, w_gate = random_tensor(n, d), random_tensor(n, d)
    full = QuantizedPredictor.from_weights(w_up, w_gate, group=32)
    same = QuantizedPredictor.from_weights(w_up, w_gate, group=32, input_keep=1.0)
    x = random_tensor(3, d)
    torch.testing.assert_close(same.magnitude(x), full.magnitude(x))
    half = QuantizedPredictor.from_weights(w_up, w_gate, group=32, input_keep=0.25)
    wg, wu = dequant(full.q_gate, full.gate_scale), dequant(full.q_up, full.up_scale)
    col = (wg.pow(2).sum(0) + wu.pow(2).sum(0)).sqrt()
    torch.testing.assert_close(half.col_norm, col, rtol=1e-5, atol=1e-6)
    idx = (x.abs() * col).topk(16, -1).indices
    xm = torch.zeros_like(x).scatter_(1, idx, x.gather(1, idx))
    torch.testing.assert_close(half.magnitude(x), full.magnitude(xm), rtol=1e-5, atol=1e-6)
    assert half.weight_bytes() < full.weight_bytes() == half.weight_bytes(as_stored=True)


def test_bytes_model_for_the_smollm2_shape():
    d, n = 576, 1536
    share = lambda **k: sparse.predictor_bytes_share(d, n, **k)  # noqa: E731
    assert share(bits=8, group=64) == pytest.approx(2 / 3 * (1 + 4 / 64) / 2)   # 0.354
    assert share(bits=4, group=32) == pytest.approx(2 / 3 * (0.5 + 4 / 32) / 2)  # 0.208
    assert share(bits=8, score="gate", group=64) == pytest.approx(0.177083333)
    assert share(bits=4, score="gate", group=32, weight_bytes=4) == pytest.approx(0.0520833)
    # as stored: int4 packed two per byte; only the column gather (input_keep) is not read so
    assert share(bits=4, group=32, as_stored=True) == share(bits=4, group=32)
    assert share(bits=8, group=64, input_keep=0.5, as_stored=True) == share(bits=8, group=64)
    assert share(bits=8, group=64, input_keep=0.5) == pytest.approx(share(bits=8, group=64) / 2)
    pred = QuantizedPredictor.from_weights(random_tensor(n, d), random_tensor(n, d), group=32,
                                           bits=4)
    assert pred.weight_bytes(as_stored=True) / (3 * d * n * 2) == pytest.approx(
        share(bits=4, group=32))
    with pytest.raises(ValueError, match="score must be"):
        share(score="up")
    with pytest.raises(ValueError, match="needs a gated MLP"):
        share(score="gate", gated=False)


def test_defaults_per_dtype_are_used_when_not_given():
    model = tiny_llama()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        bits, score = sparse.default_quantized_selection(dtype)
        assert bits in (8, 4) and score in ("gate_up", "gate")
    bits, score = sparse.default_quantized_selection(torch.float32)
    preds = sparse.quantize_predictors(model, None, progress=False)
    assert preds.layers[0].bits == bits and preds.layers[0].score == score
    # 4-bit default group is 32
    assert sparse.quantize_predictors(model, None, bits=4, progress=False).layers[0].group == 32


@pytest.mark.parametrize("bits,score,keep", [(4, "gate_up", None), (8, "gate", None),
                                             (4, "gate", 0.5)])
def test_reachable_from_sparsify_and_save_load(tmp_path, bits, score, keep):
    torch.manual_seed(0)
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 16))
    sparse.sparsify(model, 0.5, mode="predictor", calibration_ids=ids, kind="quantized",
                    bits=bits, score=score, input_keep=keep, group=32, progress=False,
                    dense_above=None)
    mlps = [m for m in model.modules() if isinstance(m, SparseMLP)]
    assert mlps and all(m.predictor.bits == bits and m.predictor.score == score
                        and m.predictor.input_keep == keep for m in mlps)
    step = torch.randint(0, 97, (1, 1))
    with torch.no_grad():
        fast = model(input_ids=step, use_cache=False).logits
    preds = sparse.Predictors(torch.nn.ModuleList(m.predictor for m in mlps),
                              sparse._model_identity(model), 0, kind="quantized")
    path = tmp_path / "p.safetensors"
    preds.save(path)
    loaded = sparse.Predictors.load(path, model)
    for a, b in zip(preds.layers, loaded.layers):
        assert (b.bits, b.score, b.input_keep) == (a.bits, a.score, a.input_keep)
        assert torch.equal(a.q_up, b.q_up) and torch.equal(a.col_norm, b.col_norm)
    sparse.sparsify(model, 0.5, mode="predictor", predictors=loaded, dense_above=None,
                    compute="masked")
    with torch.no_grad():
        masked = model(input_ids=step, use_cache=False).logits
    torch.testing.assert_close(fast, masked, rtol=1e-4, atol=1e-4)
    sparse.densify(model)


def test_old_files_without_the_new_metadata_load_as_int8_gate_up(tmp_path):
    model = tiny_llama()
    preds = sparse.quantize_predictors(model, None, bits=8, score="gate_up", progress=False)
    path = tmp_path / "old.safetensors"
    preds.save(path)
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.pop("quantized")
    save_file(tensors, str(path), metadata=meta)
    loaded = sparse.Predictors.load(path, model)
    assert loaded.layers[0].bits == 8 and loaded.layers[0].score == "gate_up"


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=6), "bits must be 8 or 4"),
    (dict(bits=True), "bits must be 8 or 4"),
    (dict(score="up"), "score must be"),
    (dict(input_keep=0.0), "input_keep must be"),
    (dict(input_keep=1.5), "input_keep must be"),
    (dict(impl="cuda"), "impl must be"),
])
def test_quantize_predictors_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sparse.quantize_predictors(tiny_llama(), None, progress=False, **kwargs)


def test_gate_only_needs_a_gate():
    with pytest.raises(ValueError, match="needs a gated MLP"):
        sparse.quantize_predictors(tiny_opt(), None, score="gate", group=16, progress=False)
    with pytest.raises(ValueError, match="needs a gated MLP"):
        QuantizedPredictor.from_weights(random_tensor(8, 32), None, group=16, score="gate")
    # plain MLPs default to gate_up (|act(fc1)|) whatever the gated default is
    preds = sparse.quantize_predictors(tiny_opt(), None, group=16, progress=False)
    assert preds.layers[0].score == "gate_up" and preds.layers[0].q_gate is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=2), "bits must be 8 or 4"),
    (dict(score="both"), "score must be"),
    (dict(impl="x"), "impl must be"),
    (dict(input_keep=-1), "input_keep must be"),
    (dict(gated=True, score="gate"), "score='gate' keeps the gate rows"),
])
def test_module_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizedPredictor(32, 8, 16, **kwargs)


def test_defaults_are_the_studys_choice_with_the_bytes_the_op_reads():
    # bench/sparse_budget_study.json holds the measured figures; its choice (recomputed here from
    # them, with the storage's bytes) must be what default_quantized_selection returns.
    import json
    import pathlib
    import sys
    bench = pathlib.Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    import sparse_budget_study
    res = json.loads((bench / "sparse_budget_study.json").read_text())
    choice = sparse_budget_study.choose(res)
    assert json.loads(json.dumps(choice)) == res["best_at_50pct_heldout_le_1.05"]
    names = {(4, "gate_up"): "int4 gate+up (group 32)", (8, "gate_up"): "int8 gate+up (group 64)"}
    for label, dtypes in (("fp16", (torch.float16, torch.bfloat16)), ("fp32", (torch.float32,))):
        selection, speedup, ppl = choice[f"{label}, as_stored"]
        assert ppl <= 1.05
        for dtype in dtypes:
            assert names[sparse.default_quantized_selection(dtype)] == selection
