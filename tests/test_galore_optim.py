"""GaLore optimizers: trajectories against galore-torch's algorithm, 8-bit, Adafactor, layer-wise
mode under gradient accumulation, checkpoints, numerical failures, bad input, param groups."""

import io
import warnings

import pytest
import torch
from torch import nn

from fastllm._reference import GaLoreAdamWReference
from fastllm._reference.galore import PROJ_TYPES
from fastllm.optim import (GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, GaLoreNumericalWarning,
                           galore_param_groups)

STEPS = 30


class Tiny(nn.Module):
    """Two linears of opposite aspect (so std and reverse_std pick different sides), a norm."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 24, bias=False)
        self.norm = nn.LayerNorm(24)

    def forward(self, x):
        return self.norm(self.down(torch.tanh(self.up(x))))


def batches(n, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 24, generator=g), torch.randn(size, 24, generator=g))
            for _ in range(n)]


def groups(model, **kw):
    options = dict(rank=6, update_proj_gap=7, scale=0.25, proj_type="std")
    options.update(kw)
    return galore_param_groups(model, target_modules=["up", "down"], **options)


def train(model, opt, data, accumulation=1):
    losses = []
    for i in range(0, len(data), accumulation):
        for x, y in data[i:i + accumulation]:
            loss = ((model(x) - y) ** 2).mean() / accumulation
            loss.backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    return losses


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_params_close(a, b, rtol=1e-5, atol=1e-5):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_trajectory_matches_galore_reference(proj_type):
    torch.manual_seed(0)
    base = Tiny()
    data = batches(STEPS)
    results = []
    for cls in (GaLoreAdamW, GaLoreAdamWReference):
        model = Tiny()
        model.load_state_dict(base.state_dict())
        opt = cls(groups(model, proj_type=proj_type), lr=1e-2, weight_decay=0.05)
        train(model, opt, data)
        results.append(params_of(model))
    assert_params_close(*results)
    moved = max((a - b).abs().max() for a, b in zip(results[0], params_of(base)))
    assert moved > 1e-2


def test_bf16_weights_follow_fp32_trajectory():
    torch.manual_seed(1)
    base = Tiny()
    data = batches(STEPS)
    ref = Tiny()
    ref.load_state_dict(base.state_dict())
    train(ref, GaLoreAdamWReference(groups(ref), lr=1e-2), data)
    model = Tiny().to(torch.bfloat16)
    model.load_state_dict(base.state_dict())
    opt = GaLoreAdamW(groups(model), lr=1e-2)
    train(model, opt, [(x.bfloat16(), y.bfloat16()) for x, y in data])
    for a, b in zip(params_of(model), params_of(ref)):
        assert (a.float() - b).abs().max() < 0.05
    # Moments are fp32 whatever the weight's dtype.
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())


def test_8bit_trajectory_within_quantisation_tolerance():
    torch.manual_seed(2)
    base = Tiny()
    data = batches(STEPS)
    results = []
    for cls in (GaLoreAdamW, GaLoreAdamW8bit):
        model = Tiny()
        model.load_state_dict(base.state_dict())
        train(model, cls(groups(model), lr=1e-2), data)
        results.append(params_of(model))
    moved = sum((a - b).norm() for a, b in zip(results[0], params_of(base)))
    gap = sum((a - b).norm() for a, b in zip(*results))
    assert gap < 0.05 * moved


def _hf_adafactor():
    transformers = pytest.importorskip("transformers")
    return transformers.optimization.Adafactor


def test_adafactor_regular_group_matches_hf():
    Adafactor = _hf_adafactor()
    torch.manual_seed(3)
    base = nn.Linear(24, 24)
    data = batches(10)
    results = []
    for make in (lambda p: GaLoreAdafactor(p, weight_decay=0.01),
                 lambda p: Adafactor(p, weight_decay=0.01)):
        model = nn.Linear(24, 24)
        model.load_state_dict(base.state_dict())
        opt = make(model.parameters())
        for x, y in data:
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
        results.append(params_of(model))
    assert_params_close(*results)


def test_adafactor_projected_matches_hf_on_the_low_rank_gradient():
    # With a fixed lr and no parameter scaling, Adafactor's update depends only on the gradient:
    # HF Adafactor stepping a zero low-rank "parameter" with the projected gradient gives the
    # low-rank update that GaLoreAdafactor must back-project (scale 0.5).
    Adafactor = _hf_adafactor()
    torch.manual_seed(4)
    weight = nn.Parameter(torch.randn(40, 24))
    start = weight.detach().clone()
    opt = GaLoreAdafactor([{"params": [weight], "rank": 5, "update_proj_gap": 100, "scale": 0.5}],
                          lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9)
    low = nn.Parameter(torch.zeros(40, 5))
    hf = Adafactor([low], lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9)
    for _ in range(5):
        grad = torch.randn(40, 24)
        weight.grad = grad
        opt.step()
        right = opt.state[weight]["proj_right"]
        low.grad = grad @ right.t()
        hf.step()
    torch.testing.assert_close(weight.detach(), start + 0.5 * low.detach() @ right,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit])
@pytest.mark.parametrize("accumulation", [1, 3])
def test_layerwise_matches_global_step(cls, accumulation):
    torch.manual_seed(5)
    base = Tiny()
    data = batches(6 * accumulation)
    results = []
    for layerwise in (False, True):
        model = Tiny()
        model.load_state_dict(base.state_dict())
        opt = cls(groups(model, update_proj_gap=2), lr=1e-2, layerwise=layerwise,
                  accumulation_steps=accumulation)
        train(model, opt, data, accumulation)
        results.append(params_of(model))
        # Once per optimizer step, not once per micro-batch.
        assert {s["step"] for s in opt.state.values()} == {6}
        assert all(p.grad is None for p in model.parameters()) or not layerwise
    assert_params_close(*results)


def test_layerwise_frees_full_gradients_between_micro_batches():
    torch.manual_seed(6)
    model = Tiny()
    opt = GaLoreAdamW(groups(model, update_proj_gap=100), lr=1e-2, layerwise=True,
                      accumulation_steps=2)
    data = batches(4)
    train(model, opt, data[:2], 2)  # step 0 refreshes: full gradients are kept
    ((model(data[2][0]) - data[2][1]) ** 2).mean().backward()
    assert model.up.weight.grad is None and model.down.weight.grad is None
    assert model.up.weight._galore_lowrank_grad.shape == (40, 6)  # 40 x 24: right projection
    assert model.norm.weight.grad is not None  # not projected: accumulates as usual


@pytest.mark.parametrize("cls,kw", [(GaLoreAdamW, {}), (GaLoreAdamW8bit, {}),
                                    (GaLoreAdamW, {"svd": "randomized"}),
                                    (GaLoreAdamW, {"reproject_moments": True}),
                                    (GaLoreAdafactor, {})])
def test_state_dict_round_trip_resumes_bit_identically(cls, kw):
    torch.manual_seed(7)
    base = Tiny()
    data = batches(20)
    lr = {} if cls is GaLoreAdafactor else {"lr": 1e-2}
    model = Tiny()
    model.load_state_dict(base.state_dict())
    opt = cls(groups(model, update_proj_gap=4, **kw), **lr)
    train(model, opt, data[:9])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, data[9:])
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = Tiny()
    resumed.load_state_dict(checkpoint["model"])
    opt2 = cls(groups(resumed, update_proj_gap=4, **kw), **lr)
    opt2.load_state_dict(checkpoint["opt"])
    train(resumed, opt2, data[9:])
    for a, b in zip(params_of(model), params_of(resumed)):
        assert torch.equal(a, b)


def test_non_finite_gradient_keeps_weights_and_projector():
    torch.manual_seed(8)
    model = Tiny()
    opt = GaLoreAdamW(groups(model, update_proj_gap=2), lr=1e-2)
    data = batches(3)
    train(model, opt, data[:2])  # steps 0 (refresh) and 1
    before = params_of(model)
    right = opt.state[model.up.weight]["proj_right"].clone()
    ((model(data[2][0]) - data[2][1]) ** 2).mean().backward()
    model.up.weight.grad[0, 0] = float("nan")
    with pytest.warns(GaLoreNumericalWarning, match="non-finite gradient for parameter up.weight"):
        opt.step()
    assert torch.equal(model.up.weight, before[0])
    assert torch.equal(opt.state[model.up.weight]["proj_right"], right)
    assert opt.state[model.up.weight]["step"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model.down.weight, before[2])  # the others stepped


def test_svd_failure_keeps_previous_projector(monkeypatch):
    torch.manual_seed(9)
    model = Tiny()
    opt = GaLoreAdamW(groups(model, update_proj_gap=1), lr=1e-2)
    data = batches(2)
    train(model, opt, data[:1])
    right = opt.state[model.up.weight]["proj_right"].clone()

    def failing_svd(*args, **kwargs):
        raise torch.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(torch.linalg, "svd", failing_svd)
    with pytest.warns(GaLoreNumericalWarning, match="SVD failed"):
        train(model, opt, data[1:])
    assert torch.equal(opt.state[model.up.weight]["proj_right"], right)
    assert opt.state[model.up.weight]["step"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_svd_failure_at_first_step_skips_update(monkeypatch):
    model = Tiny()
    before = params_of(model)
    opt = GaLoreAdamW(groups(model), lr=1e-2)
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: (_ for _ in ()).throw(
        torch.linalg.LinAlgError("no convergence")))
    with pytest.warns(GaLoreNumericalWarning):
        train(model, opt, batches(1))
    assert torch.equal(model.up.weight, before[0])
    assert "step" in opt.state[model.up.weight] and opt.state[model.up.weight]["step"] == 0


def test_randomized_svd_finds_the_dominant_subspace():
    torch.manual_seed(10)
    u = torch.linalg.qr(torch.randn(200, 8))[0]
    v = torch.linalg.qr(torch.randn(120, 8))[0]
    grad = u @ torch.diag(torch.tensor([50., 40, 30, 20, 10, 5, 3, 2])) @ v.t()
    grad += 0.01 * torch.randn(200, 120)
    weights = {}
    for svd in ("full", "randomized"):
        w = nn.Parameter(torch.zeros(200, 120))
        opt = GaLoreAdamW([{"params": [w], "rank": 4, "svd": svd, "scale": 1.0}], lr=1e-2)
        w.grad = grad.clone()
        opt.step()
        weights[svd] = opt.state[w]["proj_right"]
    # Same subspace: the projection of one basis onto the other is (nearly) an isometry.
    overlap = weights["randomized"] @ weights["full"].t()
    torch.testing.assert_close(overlap.abs().svd().S, torch.ones(4), atol=1e-3, rtol=0)


def test_reproject_moments_is_identity_when_subspace_unchanged():
    w = nn.Parameter(torch.randn(30, 20))
    opt = GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 1,
                        "reproject_moments": True}], lr=1e-3)
    grad = torch.randn(30, 20)
    w.grad = grad.clone()
    opt.step()
    m1 = opt.state[w]["exp_avg"].clone()
    right1 = opt.state[w]["proj_right"].clone()
    state = opt.state[w]
    # Flip the sign of the basis: the moment must flip with it.
    opt._reproject_moments(state, None, -right1)
    torch.testing.assert_close(state["exp_avg"], -m1)


def test_bad_input_names_the_parameter():
    model = Tiny()
    with pytest.raises(ValueError, match=r"rank 30 exceeds min\(m, n\) = 24 for parameter up.weight"):
        GaLoreAdamW(galore_param_groups(model, ["up"], rank=30))
    with pytest.raises(ValueError, match="unknown proj_type 'diagonal'"):
        GaLoreAdamW(galore_param_groups(model, ["up"], rank=4, proj_type="diagonal"))
    with pytest.raises(ValueError, match=r"parameter norm.weight .*shape \(24,\); only 2-D"):
        GaLoreAdamW([{"params": list(model.norm.named_parameters(prefix="norm")), "rank": 2}])
    with pytest.raises(ValueError, match="matched no 2-D weight"):
        galore_param_groups(model, ["nothing"])
    with pytest.raises(ValueError, match="update_proj_gap must be a positive int"):
        GaLoreAdamW(galore_param_groups(model, ["up"], rank=4, update_proj_gap=0))
    with pytest.raises(ValueError, match="svd must be 'full' or 'randomized'"):
        GaLoreAdamW(galore_param_groups(model, ["up"], rank=4, svd="qr"))
    with pytest.raises(ValueError, match="lr must be None"):
        GaLoreAdafactor(model.parameters(), lr=1e-3)


def test_param_groups_targets():
    model = Tiny()
    all_linear = galore_param_groups(model, rank=8)
    names = {n for g in all_linear if "rank" in g for n, _ in g["params"]}
    assert names == {"up.weight", "down.weight"}
    regex = galore_param_groups(model, target_modules=r"^do", rank=8)
    assert {n for n, _ in regex[-1]["params"]} == {"down.weight"}
    assert {n for n, _ in regex[0]["params"]} == {"up.weight", "up.bias", "norm.weight",
                                                  "norm.bias"}
    opt = GaLoreAdamW(all_linear, lr=1e-3)
    assert opt.param_groups[-1]["param_names"] == ["up.weight", "down.weight"]


def test_state_is_low_rank_and_counted_exactly():
    model = nn.Linear(64, 64, bias=False)
    opt = GaLoreAdamW([{"params": [model.weight], "rank": 16}], lr=1e-3)
    model.weight.grad = torch.randn(64, 64)
    opt.step()
    # right projector 16x64 + two 64x16 moments, fp32
    assert opt.state_bytes() == 4 * (16 * 64 + 2 * 64 * 16)
    assert opt.state_bytes() <= 0.375 * 2 * 4 * 64 * 64


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit])
def test_state_dict_keeps_state_dtypes_for_bf16_weights(cls):
    # torch.optim casts loaded state to the parameter's dtype; fp32 moments of bf16 weights,
    # 8-bit codes and bf16 projectors must come back as they were saved.
    model = Tiny().to(torch.bfloat16)
    opt = cls(groups(model), lr=1e-2)
    train(model, opt, [(x.bfloat16(), y.bfloat16()) for x, y in batches(2)])
    before = {k: v.dtype for s in opt.state.values() for k, v in s.items()
              if isinstance(v, torch.Tensor)}
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    opt2 = cls(groups(model), lr=1e-2)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    after = {k: v.dtype for s in opt2.state.values() for k, v in s.items()
             if isinstance(v, torch.Tensor)}
    assert after == before
    assert torch.float32 in before.values()
