"""Sparse MLPs on the real SmolLM2-135M with real text: small, bounded versions of the bench."""

import math

import pytest
import torch

import fastllm.sparse as sparse
from fastllm.nn import SparseMLP


def perplexity(model, ids):
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=ids, use_cache=False).loss.item())


@pytest.fixture(scope="module")
def text_ids(smollm2, shakespeare):
    _, tokenizer = smollm2
    ids = tokenizer(shakespeare[:20000], return_tensors="pt").input_ids[0]
    return ids[:128].reshape(1, 128), ids[2000:2512].reshape(2, 256)  # eval, calibration


def test_oracle_and_threshold_quality_on_real_text(smollm2, text_ids):
    model, _ = smollm2
    eval_ids, calib_ids = text_ids
    dense = perplexity(model, eval_ids)
    try:
        sparse.sparsify(model, 0.3, mode="oracle", dense_above=None, compute="masked")
        oracle = perplexity(model, eval_ids) / dense
        sparse.sparsify(model, 0.3, mode="threshold", calibration_ids=calib_ids[:1, :128],
                        dense_above=None, compute="masked")
        threshold = perplexity(model, eval_ids) / dense
    finally:
        sparse.densify(model)
    assert perplexity(model, eval_ids) == pytest.approx(dense, rel=1e-6)
    # Measured with 256 tokens: oracle 0.996x, threshold 1.001x; bounds leave room for noise but
    # fail if selection picks the wrong neurons (random 30% costs far more).
    assert 0.97 < oracle < 1.03
    assert oracle - 0.01 <= threshold < 1.15


def test_kernel_decode_matches_masked_on_real_model(smollm2, text_ids):
    model, _ = smollm2
    eval_ids, calib_ids = text_ids
    prompt = eval_ids[:, :24]
    thresholds = sparse.calibrate_thresholds(model, calib_ids[:1, :64], 0.5)
    try:
        outs = {}
        for compute in ("masked", "kernel"):
            sparse.sparsify(model, 0.5, mode="threshold", thresholds=thresholds, dense_above=8,
                            compute=compute)
            with torch.no_grad():
                outs[compute] = model.generate(prompt, max_new_tokens=4, do_sample=False)
            layers = [m for m in model.modules() if isinstance(m, SparseMLP)]
            assert 0.3 < sum(m.last_density for m in layers) / len(layers) < 0.7
    finally:
        sparse.densify(model)
    assert torch.equal(outs["masked"], outs["kernel"])


def test_factored_predictor_beats_deja_vu_lowrank_on_real_layers(smollm2, text_ids):
    # SiLU-gated MLP: a linear logit cannot follow |up| (symmetric in its sign), the factored
    # predictor can. bench/sparse_predictor_study.py, 32k calibration tokens, all 30 layers:
    # factored rank 104 (14% of the MLP) top-k recall 0.72 at 50%, Deja Vu low-rank ~0.6.
    model, _ = smollm2
    _, calib_ids = text_ids
    kw = dict(layers=[0, 15], progress=False, heldout=0.25)
    factored = sparse.train_predictors(model, calib_ids, kind="factored", **kw)
    assert factored.kind == "factored" and factored.rank == 104
    lowrank = sparse.train_predictors(model, calib_ids, kind="lowrank", rank=128, epochs=4, **kw)
    key = "topk_recall_vs_oracle@0.5"
    for f, l in zip(factored.stats, lowrank.stats):
        assert f[key] > 0.62 and f[key] > l[key] + 0.03, (f, l)
        assert f["precision"] > f["label_density"] + 0.05, f


def test_int8_predictor_meets_the_recall_and_perplexity_targets(smollm2, text_ids):
    # Issue 5's targets at 50% sparsity: top-k recall >= 0.95 against the oracle and perplexity
    # within 5% of dense, by the int8 copy of gate and up (bits=8; the default is int4 since the
    # packed-int4 op, see the test below).
    model, _ = smollm2
    eval_ids, calib_ids = text_ids
    preds = sparse.train_predictors(model, calib_ids[:1], bits=8, progress=False)
    assert preds.kind == "quantized" and preds.layers[0].group == 64
    assert min(s["topk_recall_vs_oracle@0.5"] for s in preds.stats) > 0.95
    dense = perplexity(model, eval_ids)
    try:
        sparse.sparsify(model, 0.5, mode="predictor", predictors=preds, dense_above=None,
                        compute="masked")
        ratio = perplexity(model, eval_ids) / dense
    finally:
        sparse.densify(model)
    assert ratio < 1.05, ratio


def test_default_packed_int4_predictor_scores_as_the_study_measured(smollm2, text_ids):
    # The default predictor is int4 gate+up (group 32), packed two per byte. The budget study
    # (bench/sparse_budget_study.py: +4.8% held-out perplexity at 50%, recall 0.92) scored the
    # same codes stored one per int8 byte; on the CPU the packed op gives those scores bit for
    # bit on the real layers, so its figures hold for the packed storage.
    from fastllm._ops.sparse import unpack_int4_rows
    import fastllm.ops as ops
    model, _ = smollm2
    eval_ids, calib_ids = text_ids
    preds = sparse.train_predictors(model, calib_ids[:1], progress=False)
    first = preds.layers[0]
    assert (first.bits, first.group, first.q_up.dtype) == (4, 32, torch.uint8)
    inputs = []
    views = [sparse._make_view(s) for s in sparse.find_mlps(model)]
    sparse.collect_mlp_data(model, calib_ids[:1, :32],
                            lambda i, view, x: inputs.append((i, x.detach())))
    for i, x in inputs[::7]:
        p = preds.layers[i]
        # The predictor rounds CPU inputs (quantize_x); the packed and one-per-byte storages then
        # take different integer paths, equal up to fp32 summation order.
        one_per_byte = ops.quantized_neuron_scores(
            x, unpack_int4_rows(p.q_up), p.up_scale, q_gate=unpack_int4_rows(p.q_gate),
            gate_scale=p.gate_scale, activation=p.activation, quantize_x=True)
        got = p.magnitude(x)
        torch.testing.assert_close(got, one_per_byte, rtol=1e-4,
                                   atol=1e-5 * float(one_per_byte.abs().max()))
        exact = ops.quantized_neuron_scores(
            x, p.q_up, p.up_scale, q_gate=p.q_gate, gate_scale=p.gate_scale,
            activation=p.activation)
        assert torch.equal(exact, ops.quantized_neuron_scores(
            x, unpack_int4_rows(p.q_up), p.up_scale, q_gate=unpack_int4_rows(p.q_gate),
            gate_scale=p.gate_scale, activation=p.activation))
        n, d = views[i].up_w.shape
        assert p.weight_bytes() == 2 * n * d * (0.5 + 4 / 32)  # codes at half a byte, scales
    assert min(s["topk_recall_vs_oracle@0.5"] for s in preds.stats) > 0.85
    dense = perplexity(model, eval_ids)
    try:
        sparse.sparsify(model, 0.5, mode="predictor", predictors=preds, dense_above=None,
                        compute="masked")
        ratio = perplexity(model, eval_ids) / dense
    finally:
        sparse.densify(model)
    # 128 tokens, so looser than the study's 768 / 2048 held-out tokens: measured 1.085 on an
    # AMD EPYC (oracle 1.014 there), under 1.08 on the Intel Xeon where the bound was set; the
    # fp32 summation order of the machine's BLAS moves it. A wrong ranking (each layer scored by
    # the next layer's predictor) gives ~900x, so 1.12 still fails on any bad one.
    assert ratio < 1.12, ratio
