"""SparseMLP, sparsify/densify, thresholds and predictors on tiny random Llama and OPT models."""

import pytest
import torch

import fastllm.sparse as sparse
from fastllm.nn import FactoredPredictor, SparseMLP

transformers = pytest.importorskip("transformers")


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=160,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    config._name_or_path = "tiny-llama-test"
    return transformers.LlamaForCausalLM(config).eval()


def tiny_opt():
    config = transformers.OPTConfig(vocab_size=97, hidden_size=48, ffn_dim=160,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    word_embed_proj_dim=48, max_position_embeddings=128)
    config._name_or_path = "tiny-opt-test"
    return transformers.OPTForCausalLM(config).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_sparsify_with_every_neuron_equals_dense_and_densify_restores(make):
    model = make()
    ids = torch.randint(0, 97, (2, 12))
    dense = logits(model, ids)
    originals = [p.clone() for p in model.parameters()]
    sparse.sparsify(model, 0.0, mode="oracle", dense_above=None)
    assert sum(isinstance(m, SparseMLP) for m in model.modules()) == 2
    torch.testing.assert_close(logits(model, ids), dense, rtol=1e-4, atol=1e-4)
    sparse.densify(model)
    assert not any(isinstance(m, SparseMLP) for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), originals))
    assert torch.equal(logits(model, ids), dense)


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
@pytest.mark.parametrize("batch_sets", ["per_row", "union"])
def test_kernel_and_masked_paths_agree(make, batch_sets):
    model = make()
    ids = torch.randint(0, 97, (2, 10))
    sparse.sparsify(model, 0.6, mode="oracle", dense_above=None, batch_sets=batch_sets,
                    compute="masked")
    masked = logits(model, ids)
    sparse.sparsify(model, 0.6, mode="oracle", dense_above=None, batch_sets=batch_sets)
    torch.testing.assert_close(logits(model, ids), masked, rtol=1e-4, atol=1e-4)
    densities = [m.last_density for m in model.modules() if isinstance(m, SparseMLP)]
    if batch_sets == "per_row":
        assert all(abs(d - 0.4) < 0.01 for d in densities)
    else:
        assert all(d >= 0.4 for d in densities)


def test_opt_relu_oracle_at_natural_sparsity_is_exact():
    # A ReLU MLP restricted to the neurons with non-zero activation is the dense MLP.
    model = tiny_opt()
    ids = torch.randint(0, 97, (1, 8))
    dense = logits(model, ids)
    sparse.sparsify(model, 0.0, mode="threshold", calibration_ids=ids, dense_above=None)
    for m in model.modules():
        if isinstance(m, SparseMLP):
            m.threshold = 0.0  # |relu| > 0: exactly the non-zero neurons
    torch.testing.assert_close(logits(model, ids), dense, rtol=1e-4, atol=1e-4)
    assert all(m.last_density < 0.9 for m in model.modules() if isinstance(m, SparseMLP))


def test_threshold_calibration_hits_target_sparsity():
    model = tiny_llama()
    ids = torch.randint(0, 97, (4, 32))
    sparse.sparsify(model, [0.3, 0.7], mode="threshold", calibration_ids=ids, dense_above=None)
    logits(model, ids)
    densities = [m.last_density for m in model.modules() if isinstance(m, SparseMLP)]
    assert densities[0] == pytest.approx(0.7, abs=0.02)
    assert densities[1] == pytest.approx(0.3, abs=0.02)


def test_dense_above_runs_large_prefill_dense():
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 20))
    dense = logits(model, ids)
    sparse.sparsify(model, 0.9, mode="oracle", dense_above=16)
    assert torch.equal(logits(model, ids), dense)
    assert not torch.equal(logits(model, ids[:, :8]), dense[:, :8])


def test_predictors_train_save_load_and_refuse_other_models(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 97, (4, 48))
    preds = sparse.train_predictors(model, ids, kind="factored", rank=16, progress=False)
    assert len(preds.stats) == 2
    for s in preds.stats:
        assert 0 <= s["recall"] <= 1 and 0 <= s["precision"] <= 1
    path = tmp_path / "preds.safetensors"
    preds.save(path)
    loaded = sparse.Predictors.load(path, model)
    for a, b in zip(preds.layers.parameters(), loaded.layers.parameters()):
        assert torch.equal(a, b)
    sparse.sparsify(model, 0.5, mode="predictor", predictors=path, dense_above=None)
    out = logits(model, ids[:1, :6])
    assert out.isfinite().all()
    assert all(m.last_density == pytest.approx(0.5, abs=0.01)
               for m in model.modules() if isinstance(m, SparseMLP))
    with pytest.raises(sparse.PredictorMismatchError, match="another model"):
        sparse.Predictors.load(path, tiny_opt())
    other = tiny_llama()
    other.config._name_or_path = "someone-else"
    with pytest.raises(sparse.PredictorMismatchError, match="model_name"):
        sparse.Predictors.load(path, other)


def test_predictor_learns_relu_activity_better_than_chance():
    model = tiny_opt()
    ids = torch.randint(0, 97, (8, 48))
    preds = sparse.train_predictors(model, ids, rank=32, epochs=15, lr=3e-3, progress=False)
    for s in preds.stats:
        density = s["label_density"]
        # Logit > 0 selection must beat guessing at the label density.
        assert s["precision"] > density + 0.05 and s["recall"] > 0.6


def test_lookahead_predictors_feed_the_next_layer():
    model = tiny_llama()
    ids = torch.randint(0, 97, (4, 32))
    preds = sparse.train_predictors(model, ids, rank=16, lookahead=True, progress=False)
    assert preds.kind == "factored"  # auto: the int8 predictor has no lookahead form
    sparse.sparsify(model, 0.5, mode="predictor", predictors=preds, dense_above=None)
    layers = [m for m in model.modules() if isinstance(m, SparseMLP)]
    assert layers[0].next_layer is layers[1]
    calls = []
    layers[1].predictor.register_forward_hook(lambda m, a, o: calls.append(a[0].clone()))
    logits(model, ids[:1, :4])
    # The second layer's predictor ran once, on the first layer's MLP input.
    assert len(calls) == 1 and layers[1].lookahead_logits is None


def test_full_rank_factored_predictor_ranks_like_the_oracle():
    # At rank d the factored predictor reproduces gate and up exactly, so its top-k is the
    # oracle's; at a low rank it cannot be perfect. Both on held-out tokens.
    model = tiny_llama()
    ids = torch.randint(0, 97, (4, 48))
    full = sparse.train_predictors(model, ids, kind="factored", rank=48, progress=False)
    low = sparse.train_predictors(model, ids, kind="factored", rank=4, progress=False)
    for a, b in zip(full.stats, low.stats):
        assert a["topk_recall_vs_oracle@0.5"] > 0.999, a
        assert b["topk_recall_vs_oracle@0.5"] < 0.99, b
    sparse.sparsify(model, 0.5, mode="oracle", dense_above=None, compute="masked")
    oracle = logits(model, ids[:1, :8])
    sparse.sparsify(model, 0.5, mode="predictor", predictors=full, dense_above=None)
    torch.testing.assert_close(logits(model, ids[:1, :8]), oracle, rtol=1e-4, atol=1e-4)


def test_factored_offset_makes_logit_selection_hit_the_sparsity():
    model = tiny_llama()
    ids = torch.randint(0, 97, (4, 48))
    preds = sparse.train_predictors(model, ids, kind="factored", rank=16, eval_sparsity=0.7,
                                    progress=False)
    sparse.sparsify(model, 0.7, mode="predictor", predictors=preds, selection="logit",
                    dense_above=None)
    logits(model, ids)
    for m in model.modules():
        if isinstance(m, SparseMLP):
            assert m.last_density == pytest.approx(0.3, abs=0.05)


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
@pytest.mark.parametrize("rows", [1, 3])
def test_predictor_topk_fast_path_matches_masked(make, rows):
    model = make()
    ids = torch.randint(0, 97, (4, 32))
    preds = sparse.train_predictors(model, ids, kind="factored" if make is tiny_llama else "lowrank",
                                    rank=16, epochs=1, progress=False)
    step = ids[:1, :rows]
    sparse.sparsify(model, 0.6, mode="predictor", predictors=preds, dense_above=None,
                    compute="masked")
    masked = logits(model, step)
    sparse.sparsify(model, 0.6, mode="predictor", predictors=preds, dense_above=None)
    torch.testing.assert_close(logits(model, step), masked, rtol=1e-4, atol=1e-4)
    assert all(m.last_density == pytest.approx(0.4, abs=0.01)
               for m in model.modules() if isinstance(m, SparseMLP))


def test_default_rank_keeps_the_predictor_cheap():
    # SmolLM2's MLP (576 -> 1536): the factored predictor at the default rank costs <= 15%.
    rank = sparse.default_rank("factored", 576, 1536)
    assert rank == 104
    assert sparse.predictor_cost("factored", 576, 1536, rank) <= 0.15
    assert sparse.predictor_cost("factored", 576, 1536, rank + 8) > 0.15
    with pytest.raises(ValueError, match="gated MLP"):
        sparse.train_predictors(tiny_opt(), torch.randint(0, 97, (1, 8)), kind="factored")


def test_allocate_sparsity_keeps_the_average_and_favours_the_costly_layer():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 32))
    with torch.no_grad():  # make layer 1's MLP output ten times larger: absolute errors follow
        model.model.layers[1].mlp.down_proj.weight.mul_(10)
    per_layer = sparse.allocate_sparsity(model, None, ids, 0.5, error="absolute")
    assert len(per_layer) == 2 and sum(per_layer) / 2 == pytest.approx(0.5, abs=1e-6)
    assert per_layer[1] < per_layer[0] and all(0 <= s <= 0.9 for s in per_layer)
    relative = sparse.allocate_sparsity(model, None, ids, 0.5)
    assert sum(relative) / 2 == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sparsity=1.5), r"sparsity must be a number in \[0, 1\].*1.5"),
    (dict(sparsity=-0.5), r"sparsity must be a number in \[0, 1\].*-0.5"),
    (dict(sparsity=[0.5, True]), "sparsity must be a number"),
    (dict(sparsity="half"), "sparsity must be a number"),
    (dict(mode="treshold"), "mode must be one of 'predictor', 'threshold', 'oracle', 'dense'"),
    (dict(selection="top"), "selection must be one of 'topk', 'logit'"),
    (dict(batch_sets="shared"), "batch_sets must be one of 'per_row', 'union'"),
    (dict(compute="gpu"), "compute must be one of 'kernel', 'masked'"),
    (dict(dense_above=-1), "dense_above must be an int >= 0 or None"),
    (dict(dense_above=2.5), "dense_above must be an int >= 0 or None"),
])
def test_sparsify_rejects_bad_arguments_before_touching_the_model(kwargs, message):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mlp_types = [type(layer.mlp) for layer in model.model.layers]
    with pytest.raises(ValueError, match=message):
        sparse.sparsify(model, **{"mode": "oracle", **kwargs})
    assert [type(layer.mlp) for layer in model.model.layers] == mlp_types
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_sparsify_rejects_a_non_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sparse.sparsify("model", 0.5, mode="oracle")


def llama_mlp():
    return tiny_llama().model.layers[0].mlp  # 48 -> 160 neurons


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(mode="bogus"), ValueError,
     r"SparseMLP: mode must be one of 'predictor', 'threshold', 'oracle', 'dense', got 'bogus'"),
    (dict(mode="oracle", keep=161), ValueError,
     r"keep must be None \(every neuron\) or an int in \[0, 160\] .*got 161"),
    (dict(mode="oracle", keep=-1), ValueError, r"keep must be .* in \[0, 160\] .*got -1"),
    (dict(mode="oracle", keep=8.0), ValueError, r"keep must be .* in \[0, 160\] .*got 8.0"),
    (dict(mode="oracle", keep=True), ValueError, r"keep must be .* in \[0, 160\] .*got True"),
    (dict(mode="predictor", keep=8), ValueError,
     r"mode='predictor' needs a predictor .*got predictor=None"),
    (dict(mode="predictor", keep=8, predictor="factored"), TypeError,
     r"predictor must be a module .*got str"),
    (dict(mode="threshold"), ValueError, r"mode='threshold' needs a threshold .*got "
                                         r"threshold=None"),
    (dict(mode="threshold", threshold="0.1"), TypeError,
     r"threshold must be a number or None, got '0.1'"),
    (dict(mode="threshold", threshold=float("nan")), ValueError,
     r"threshold must not be NaN, got nan"),
    (dict(mode="oracle", logit_threshold=[0.0]), TypeError,
     r"logit_threshold must be a number or None, got \[0.0\]"),
    (dict(batch_sets="shared"), ValueError,
     r"SparseMLP: batch_sets must be one of 'per_row', 'union', got 'shared'"),
    (dict(compute="gpu"), ValueError,
     r"SparseMLP: compute must be one of 'kernel', 'masked', got 'gpu'"),
    (dict(dense_above=-1), ValueError, r"SparseMLP: dense_above must be an int >= 0 or None, "
                                       r"got -1"),
    (dict(deterministic=1), TypeError, r"SparseMLP: deterministic must be a bool, got 1"),
])
def test_sparse_mlp_rejects_bad_options_when_built(kwargs, error, message):
    with pytest.raises(error, match=message):
        SparseMLP(llama_mlp(), **kwargs)


def test_sparse_mlp_edge_options_are_accepted():
    mlp = llama_mlp()
    x = torch.randn(1, 1, 48)
    for keep in (0, 160, None):  # sparsify(..., 1.0) keeps 0 neurons: allowed
        sparse_mlp = SparseMLP(mlp, mode="oracle", keep=keep)
        assert sparse_mlp(x).shape == (1, 1, 48)
    assert SparseMLP(mlp, mode="threshold", threshold=0).threshold == 0
    assert SparseMLP(mlp, mode="dense").mode == "dense"


def test_sparse_mlp_checks_options_assigned_after_construction():
    mlp = llama_mlp()
    sparse_mlp = SparseMLP(mlp, mode="oracle", keep=64)
    with pytest.raises(ValueError, match=r"keep must be .* in \[0, 160\] .*got 500"):
        sparse_mlp.keep = 500
    with pytest.raises(ValueError, match=r"mode must be one of .*got 'treshold'"):
        sparse_mlp.mode = "treshold"
    with pytest.raises(ValueError, match=r"mode='threshold' needs a threshold"):
        sparse_mlp.mode = "threshold"   # the threshold must be set first
    with pytest.raises(ValueError, match=r"mode='predictor' needs a predictor"):
        sparse_mlp.mode = "predictor"
    assert (sparse_mlp.mode, sparse_mlp.keep) == ("oracle", 64)  # unchanged by the refusals
    sparse_mlp.threshold = 0.1
    sparse_mlp.mode = "threshold"
    with pytest.raises(ValueError, match=r"mode='threshold' needs a threshold"):
        sparse_mlp.threshold = None
    sparse_mlp.predictor = FactoredPredictor(48, 160, rank=8)
    sparse_mlp.mode = "predictor"
    with pytest.raises(ValueError, match=r"mode='predictor' needs a predictor"):
        sparse_mlp.predictor = None
    sparse_mlp.keep = 160
    assert sparse_mlp(torch.randn(1, 1, 48)).shape == (1, 1, 48)


@pytest.mark.parametrize("thresholds, error, message", [
    ([0.1, "high"], TypeError, r"thresholds must be numbers .*got 'high'"),
    ([0.1, float("nan")], ValueError, r"thresholds must be finite, got nan"),
    ([0.1, 0.2, 0.3], ValueError, r"thresholds has 3 entries for 2 layers"),
])
def test_sparsify_with_bad_thresholds_keeps_the_earlier_sparsification(thresholds, error,
                                                                         message):
    model = tiny_llama()
    sparse.sparsify(model, 0.5, mode="oracle")
    before = [layer.mlp for layer in model.model.layers]
    with pytest.raises(error, match=message):
        sparse.sparsify(model, 0.5, mode="threshold", thresholds=thresholds)
    assert [layer.mlp for layer in model.model.layers] == before  # not undone by the refusal


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(calibration_ids=torch.randn(2, 8)), ValueError,
     r"sparsify: calibration_ids must be a 2-D integer tensor .*got torch.float32 of shape "
     r"\(2, 8\)"),
    (dict(calibration_ids=torch.randint(0, 97, (8,))), ValueError,
     r"calibration_ids must be a 2-D integer tensor .*shape \(8,\)"),
    (dict(calibration_ids=torch.zeros(0, 8, dtype=torch.long)), ValueError,
     r"with at least one token"),
    (dict(calibration_ids=[[1, 2, 3]]), TypeError, r"calibration_ids must be a 2-D integer "
                                                   r"tensor of token ids \[batch, seq\], got list"),
    (dict(predictors=42), TypeError, r"predictors must be a fastllm.sparse.Predictors, a path "
                                     r"to saved ones, or None, got int"),
])
def test_sparsify_refuses_bad_calibration_ids_and_predictors_up_front(kwargs, error, message):
    model = tiny_llama()
    sparse.sparsify(model, 0.5, mode="oracle")
    before = [layer.mlp for layer in model.model.layers]
    with pytest.raises(error, match=message):
        sparse.sparsify(model, 0.5, mode="predictor", **kwargs)
    assert [layer.mlp for layer in model.model.layers] == before


@pytest.mark.parametrize("call", [
    lambda m, ids: sparse.train_predictors(m, ids),
    lambda m, ids: sparse.fit_factored_predictors(m, ids, rank=8),
    lambda m, ids: sparse.quantize_predictors(m, ids),
    lambda m, ids: sparse.calibrate_thresholds(m, ids, 0.5),
    lambda m, ids: sparse.gate_magnitudes(m, ids),
    lambda m, ids: sparse.collect_mlp_data(m, ids, lambda i, v, x: None),
    lambda m, ids: sparse.allocate_sparsity(m, None, ids, 0.5),
])
def test_every_calibration_entry_point_refuses_float_ids_before_running_the_model(call):
    model = tiny_llama()
    ran = []
    hook = model.model.embed_tokens.register_forward_hook(lambda *args: ran.append(1))
    with pytest.raises(ValueError, match=r"must be a 2-D integer tensor of token ids"):
        call(model, torch.rand(2, 8))
    hook.remove()
    assert not ran


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(model="model"), TypeError, r"allocate_sparsity: model must be an nn.Module, got str"),
    (dict(predictors="preds.pt"), TypeError,
     r"predictors must be a fastllm.sparse.Predictors or None .*got str"),
    (dict(sparsity=1.5), ValueError, r"sparsity must be a number in \[0, 1\].*1.5"),
    (dict(sparsity=[0.5, 0.5]), ValueError, r"sparsity must be one number in \[0, 1\]"),
    (dict(sparsity=0.95), ValueError, r"sparsity 0.95 is above max_sparsity 0.9"),
    (dict(step=0.3), ValueError, r"step must be 1/k for an integer k >= 1 .*got 0.3"),
    (dict(step=0), ValueError, r"step must be 1/k .*got 0"),
    (dict(max_sparsity=1.2), ValueError, r"sparsity must be a number in \[0, 1\].*1.2"),
    (dict(error="squared"), ValueError, r"error must be one of 'relative', 'absolute', "
                                        r"got 'squared'"),
])
def test_allocate_sparsity_rejects_bad_arguments_before_running_the_model(kwargs, error,
                                                                          message):
    model = tiny_llama()
    ran = []
    hook = model.model.embed_tokens.register_forward_hook(lambda *args: ran.append(1))
    args = {**dict(model=model, predictors=None, calibration_ids=torch.randint(0, 97, (2, 8)),
                   sparsity=0.5), **kwargs}
    with pytest.raises(error, match=message):
        sparse.allocate_sparsity(args.pop("model"), args.pop("predictors"),
                                 args.pop("calibration_ids"), args.pop("sparsity"), **args)
    hook.remove()
    assert not ran


def test_predictor_helpers_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"predictor_cost: kind must be one of 'factored', "
                                         r"'lowrank', 'quantized', got 'bogus'"):
        sparse.predictor_cost("bogus", 576, 1536, rank=64)
    with pytest.raises(ValueError, match=r"predictor_cost: kind must be one of .*got 'auto'"):
        sparse.default_rank("auto", 576, 1536)
    for bits in (5, 16, True, "8"):
        with pytest.raises(ValueError, match=rf"predictor_bytes_share: bits must be 8 or 4 .*"
                                             rf"got {bits!r}"):
            sparse.predictor_bytes_share(576, 1536, bits=bits)
    for d in (0, -4, 576.0, True):
        with pytest.raises(ValueError, match=rf"predictor_cost: d must be an int >= 1, "
                                             rf"got {d!r}"):
            sparse.predictor_cost("factored", d, 1536, rank=64)
        with pytest.raises(ValueError, match=rf"predictor_bytes_share: d must be an int >= 1, "
                                             rf"got {d!r}"):
            sparse.predictor_bytes_share(d, 1536)
    with pytest.raises(ValueError, match=r"predictor_cost: n must be an int >= 1, got 0"):
        sparse.predictor_cost("quantized", 576, 0, rank=0)
    with pytest.raises(ValueError, match=r"predictor_cost: rank must be an int >= 1, got 0"):
        sparse.predictor_cost("factored", 576, 1536, rank=0)
    assert sparse.predictor_cost("quantized", 576, 1536, rank=0) > 0  # no rank: 0 is fine
    with pytest.raises(TypeError, match=r"predictor_cost: gated must be a bool, got 'yes'"):
        sparse.predictor_cost("factored", 576, 1536, rank=8, gated="yes")
    with pytest.raises(ValueError, match=r"predictor_bytes_share: group must be an int >= 1, "
                                         r"got 0"):
        sparse.predictor_bytes_share(576, 1536, group=0)
    with pytest.raises(ValueError, match=r"weight_bytes must be a number > 0 .*got 0"):
        sparse.predictor_bytes_share(576, 1536, weight_bytes=0)
    with pytest.raises(ValueError, match=r"input_keep must be None or a number in \(0, 1\], "
                                         r"got 1.5"):
        sparse.predictor_bytes_share(576, 1536, input_keep=1.5)
    with pytest.raises(ValueError, match=r"default_rank: max_cost must be a number > 0 .*got "
                                         r"-0.1"):
        sparse.default_rank("factored", 576, 1536, max_cost=-0.1)


@pytest.mark.parametrize("sparsity", [1.5, -0.1, [0.5, 1.5], True, "half"])
def test_thresholds_reject_a_sparsity_outside_0_1(sparsity):
    bad = sparsity[1] if isinstance(sparsity, list) else sparsity
    message = (r"sparsity must be a number in \[0, 1\] \(the share of neurons skipped\), or a "
               rf"list of them, got {bad!r}")
    magnitudes = [torch.arange(1.0, 11.0), torch.arange(10.0, 110.0, 10.0)]
    with pytest.raises(ValueError, match=r"thresholds_from_magnitudes: " + message):
        sparse.thresholds_from_magnitudes(magnitudes, sparsity)
    model = tiny_llama()
    ran = []
    hook = model.model.embed_tokens.register_forward_hook(lambda *args: ran.append(1))
    with pytest.raises(ValueError, match=r"calibrate_thresholds: " + message):
        sparse.calibrate_thresholds(model, torch.randint(0, 97, (1, 8)), sparsity,
                                    progress=False)
    hook.remove()
    assert ran == []  # refused before the dense passes
