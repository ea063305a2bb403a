"""GaLore steps without host synchronisation (issue 13).

A step that does not refresh the projector must read nothing back from a CUDA device. Shown here
without a GPU: GaLoreAdamW / GaLoreAdamW8bit / GaLoreAdafactor non-refresh steps run on fake CUDA
parameters (FakeTensorMode: `.item()`, `float(t)`, `bool(t)` raise); the device-side finiteness
check (the ops' `found_inf`) and its deferred report are tested on CPU by forcing that path. With
a GPU: the same steps run under `torch.cuda.set_sync_debug_mode("error")`.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

import fastllm
import fastllm.ops as ops
from fastllm.nn import to_galore_linear
from fastllm._ops.galore import QUANT_BLOCK
from fastllm.optim.galore import LOWRANK_GRAD
from fastllm.optim import (GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, GaLoreNumericalWarning,
                           galore_param_groups)
from helpers import random_tensor

needs_cuda = pytest.mark.skipif(
    not (fastllm.build_info()["cuda"] and torch.cuda.is_available()),
    reason="needs a GPU and a CUDA build")

GAP = 7  # update_proj_gap: steps 1..6 do not refresh


from test_galore_optim import Tiny  # noqa: E402  (two linears of opposite aspect, a norm)


def groups(model, **kw):
    return galore_param_groups(model, target_modules=["up", "down"], rank=6,
                               update_proj_gap=GAP, scale=0.25, **kw)


OPTIMIZERS = {
    "adamw": lambda params, **kw: GaLoreAdamW(params, lr=1e-2, weight_decay=0.01, **kw),
    "adamw8bit": lambda params, **kw: GaLoreAdamW8bit(params, lr=1e-2, weight_decay=0.01, **kw),
    "adafactor": lambda params, **kw: GaLoreAdafactor(params, weight_decay=0.01, **kw),
    "adafactor_beta1": lambda params, **kw: GaLoreAdafactor(params, beta1=0.9, **kw),
}


def loss_of(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 24, generator=g), torch.randn(8, 24, generator=g)
    device = next(model.parameters()).device
    return ((model(x.to(device)) - y.to(device)) ** 2).mean()


def step(model, opt, seed):
    loss_of(model, seed).backward()
    opt.step()
    opt.zero_grad()


# ---- fake CUDA parameters ---------------------------------------------------------------------

def fake_cuda_copy(make_opt, real_model, real_opt, layerwise=False, **kw):
    """A fake-CUDA model and optimizer in the state the real ones reached (after a refresh), to
    be used inside the FakeTensorMode that is active when this is called."""
    with torch.device("cuda"):
        model = Tiny()
    opt = make_opt(groups(model), layerwise=layerwise, **kw)
    for real_p, p in zip(real_model.parameters(), model.parameters()):
        state = real_opt.state[real_p]
        opt.state[p] = {k: torch.zeros(v.shape, dtype=v.dtype,
                                       device="cpu" if k == "low_shape" else "cuda")
                        if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    for gi, group in enumerate(opt.param_groups):
        for p in group["params"]:
            opt._publish_projector(p, group, opt.state[p])
    return model, opt


def fake_backward(model):
    """Gradients as a backward would leave them (the autograd engine needs a real CUDA runtime,
    so on fake CUDA tensors they are made by hand): a full ``.grad`` for nn.Linear and the
    regular parameters, and for a GaLoreLinear whatever its backward produces from the projector
    the optimizer published (a low-rank gradient, or the full one before a refresh)."""
    from fastllm.nn.galore_linear import GaLoreLinear, _GaLoreLinearFunction
    for module in model.modules():
        if isinstance(module, GaLoreLinear):
            x = torch.randn(8, module.in_features, device="cuda")
            ctx = SimpleNamespace(saved_tensors=(x,), weight=module.weight, has_bias=True,
                                  needs_input_grad=(False, True, True))
            _, grad_w, grad_b = _GaLoreLinearFunction.backward(
                ctx, torch.randn(8, module.out_features, device="cuda"))
            module.weight.grad = grad_w
            if module.bias is not None:
                module.bias.grad = grad_b
    for p in model.parameters():
        if p.grad is None and not hasattr(p, LOWRANK_GRAD):
            p.grad = torch.randn_like(p)


def run_step(model, opt):
    """opt.step(), or in layer-wise mode what the post-accumulate-grad hooks do."""
    if not opt.layerwise:
        opt.step()
        opt.zero_grad()
        return
    for gi, group in enumerate(opt.param_groups):
        for i, p in enumerate(group["params"]):
            opt._make_layerwise_hook(group, gi, i)(p)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("layerwise", [False, True])
def test_non_refresh_steps_run_on_fake_cuda_parameters(name, layerwise):
    make = OPTIMIZERS[name]
    real = Tiny()
    real_opt = make(groups(real))
    step(real, real_opt, 0)  # step 0: the refresh (SVD), which may synchronise
    kw = dict(accumulation_steps=2) if layerwise else {}
    with FakeTensorMode():
        model, opt = fake_cuda_copy(make, real, real_opt, layerwise, **kw)
        # Full gradients (what nn.Linear produces) ...
        for _ in range(2 if layerwise else 1):  # layer-wise: two micro-batches per step
            fake_backward(model)
            run_step(model, opt)
        # ... and low-rank ones, produced by GaLoreLinear's backward from the published projector.
        to_galore_linear(model, ["up", "down"])
        for _ in range(2 if layerwise else 1):
            fake_backward(model)
            run_step(model, opt)
        for p in model.parameters():
            assert opt.state[p]["step"] == 3
            assert p.device.type == "cuda"
        # The finiteness check ran on the device, for every parameter.
        assert set(opt._skipped) == set(model.parameters())


def test_fake_step_would_catch_a_host_read(monkeypatch):
    # If the step called float() on a tensor (as Adafactor's parameter scale used to), the fake
    # run would fail: the proof above is only as good as this.
    real = Tiny()
    real_opt = OPTIMIZERS["adafactor"](groups(real))
    step(real, real_opt, 0)
    original = GaLoreAdafactor._rms
    monkeypatch.setattr(GaLoreAdafactor, "_rms",
                        staticmethod(lambda t: torch.tensor(float(original(t)))))
    with FakeTensorMode():
        model, opt = fake_cuda_copy(OPTIMIZERS["adafactor"], real, real_opt)
        fake_backward(model)
        with pytest.raises(DataDependentOutputException):
            opt.step()


# ---- the device-side finiteness check, on CPU -------------------------------------------------

@pytest.fixture
def device_checks(monkeypatch):
    """Run the CUDA path's logic (found_inf on the device, deferred report) on CPU tensors."""
    monkeypatch.setattr(GaLoreAdamW, "_checks_on_device", staticmethod(lambda p: True))
    monkeypatch.setattr(GaLoreAdafactor, "_checks_on_device", staticmethod(lambda p: True))


def trajectory(name, steps=9):
    torch.manual_seed(1)
    model = Tiny()
    opt = OPTIMIZERS[name](groups(model))
    for s in range(steps):
        step(model, opt, s)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_device_check_path_follows_the_host_path(name, monkeypatch):
    host = trajectory(name)
    monkeypatch.setattr(GaLoreAdamW, "_checks_on_device", staticmethod(lambda p: True))
    monkeypatch.setattr(GaLoreAdafactor, "_checks_on_device", staticmethod(lambda p: True))
    device = trajectory(name)
    for a, b in zip(host, device):
        if name.startswith("adamw"):
            # The same GEMM and kernel; only the decay is applied in its own pass (fp32).
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_device_check_skips_a_non_finite_step_and_reports_it_later(name, device_checks):
    torch.manual_seed(2)
    model = Tiny()
    opt = OPTIMIZERS[name](groups(model))
    step(model, opt, 0)
    step(model, opt, 1)
    weight = model.up.weight
    before, other = weight.detach().clone(), model.down.weight.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[weight].items()
                    if isinstance(v, torch.Tensor)}
    loss_of(model, 2).backward()
    weight.grad[3, 5] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GaLoreNumericalWarning)  # nothing said yet: no sync
        opt.step()
    opt.zero_grad()
    assert torch.equal(weight, before)
    for k, v in state_before.items():
        assert torch.equal(opt.state[weight][k], v), k
    assert opt.state[weight]["step"] == 3  # counted: the host did not look
    assert not torch.equal(model.down.weight, other)  # the others stepped
    with pytest.warns(GaLoreNumericalWarning, match=r"up\.weight.*1 step\(s\) skipped"):
        report = opt.skipped_steps()
    assert report == {"parameter up.weight (group 1)": 1}
    assert opt.skipped_steps() == {}
    # A second bad step is reported by the next refresh (step 7), which synchronises anyway.
    loss_of(model, 3).backward()
    weight.grad[0, 0] = float("nan")
    opt.step()
    opt.zero_grad()
    with pytest.warns(GaLoreNumericalWarning, match=r"up\.weight.*1 step\(s\) skipped"):
        for s in range(4, GAP + 1):
            step(model, opt, s)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- found_inf in the ops ---------------------------------------------------------------------

SIDES = [(False, True), (True, False), (True, True), (False, False)]
HYPER = dict(lr=3e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1, scale=0.25)


def _projectors(m, n, rank, sides, device):
    left = torch.linalg.qr(torch.randn(m, rank))[0].to(device) if sides[0] else None
    right = torch.linalg.qr(torch.randn(n, rank))[0].t().contiguous().to(device) \
        if sides[1] else None
    return left, right


def _state(low, device, eight_bit):
    numel = low[0] * low[1]
    if not eight_bit:
        return [0.1 * random_tensor(*low, device=device), torch.rand(*low, device=device) * 0.1]
    blocks = -(-numel // QUANT_BLOCK)
    return [torch.randint(-127, 128, (numel,), dtype=torch.int8, device=device),
            torch.rand(blocks, device=device),
            torch.randint(0, 256, (numel,), dtype=torch.uint8, device=device),
            torch.rand(blocks, device=device)]


@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("eight_bit", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("flag_dtype", [torch.bool, torch.float32])
def test_found_inf_skips_or_steps(device, sides, eight_bit, dtype, flag_dtype):
    m, n, rank = 37, 29, 4
    left, right = _projectors(m, n, rank, sides, device)
    low = (rank if left is not None else m, rank if right is not None else n)
    fn = ops.galore_adam8bit_step if eight_bit else ops.galore_adam_step
    param = random_tensor(m, n, dtype=dtype, device=device)
    grad = random_tensor(m, n, dtype=dtype, device=device)
    state = _state(low, device, eight_bit)
    # Set: nothing changes, even with a non-finite gradient.
    bad = grad.clone()
    bad[1, 2] = float("nan")
    p, st = param.clone(), [t.clone() for t in state]
    fn(p, bad, left, right, *st, step=3, **HYPER,
       found_inf=torch.ones((), dtype=flag_dtype, device=device))
    assert torch.equal(p, param) and all(torch.equal(a, b) for a, b in zip(st, state))
    # Clear: the ordinary step.
    p, st = param.clone(), [t.clone() for t in state]
    fn(p, grad, left, right, *st, step=3, **HYPER,
       found_inf=torch.zeros(1, dtype=flag_dtype, device=device))
    q, sq = param.clone(), [t.clone() for t in state]
    fn(q, grad, left, right, *sq, step=3, **HYPER)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(p, q, **tol)
    for a, b in zip(st, sq):
        assert torch.equal(a, b)  # the moments' arithmetic is the same
    assert not torch.equal(p, param)


def test_found_inf_rejections(device):
    param = random_tensor(8, 6, device=device)
    m, v = torch.zeros(8, 6, device=device), torch.zeros(8, 6, device=device)
    for flag, error, match in [(torch.zeros(2, device=device), ValueError, "one element"),
                               (torch.zeros(1, dtype=torch.int32, device=device), TypeError,
                                "found_inf must have dtype")]:
        with pytest.raises(error, match=match):
            ops.galore_adam_step(param, param.clone(), None, None, m, v, lr=1e-3, step=1,
                                 found_inf=flag)


def test_opcheck_with_found_inf(device):
    param = random_tensor(12, 10, device=device)
    right = torch.linalg.qr(torch.randn(10, 3))[0].t().contiguous().to(device)
    for flag in (torch.zeros(1, device=device), torch.ones(1, dtype=torch.bool, device=device)):
        torch.library.opcheck(
            torch.ops.fastllm.galore_adam_step.default,
            (param.clone(), random_tensor(12, 10, device=device), None, right,
             torch.zeros(12, 3, device=device), torch.zeros(12, 3, device=device), False, 1e-2,
             0.9, 0.99, 1e-6, 0.1, 0.25, 2, flag))
        torch.library.opcheck(
            torch.ops.fastllm.galore_adam8bit_step.default,
            (param.clone(), random_tensor(12, 10, device=device), None, right,
             torch.zeros(36, dtype=torch.int8, device=device), torch.zeros(1, device=device),
             torch.zeros(36, dtype=torch.uint8, device=device), torch.zeros(1, device=device),
             False, 1e-2, 0.9, 0.99, 1e-6, 0.1, 0.25, 2, flag))


# ---- on a GPU --------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("layerwise", [False, True])
def test_cuda_non_refresh_steps_do_not_synchronise(name, layerwise):
    torch.manual_seed(3)
    model = Tiny().cuda()
    opt = OPTIMIZERS[name](groups(model), layerwise=layerwise)
    step(model, opt, 0)  # the refresh
    to_galore_linear(model, ["up", "down"])
    step(model, opt, 1)  # warm-up of the low-rank path
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for s in range(2, GAP):
            loss_of(model, s).backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.skipped_steps() == {}
    assert all(torch.isfinite(p).all() for p in model.parameters())


@needs_cuda
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cuda_non_finite_step_is_skipped_on_the_device(name):
    torch.manual_seed(4)
    model = Tiny().cuda()
    opt = OPTIMIZERS[name](groups(model))
    step(model, opt, 0)
    before = model.up.weight.detach().clone()
    loss_of(model, 1).backward()
    model.up.weight.grad[2, 2] = float("inf")
    opt.step()
    assert torch.equal(model.up.weight, before)
    with pytest.warns(GaLoreNumericalWarning, match="skipped"):
        assert opt.skipped_steps() == {"parameter up.weight (group 1)": 1}
