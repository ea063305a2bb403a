"""GaLore ops against their references: fused Adam step (fp32 and 8-bit moments), projections,
opcheck and every rejection."""

import pytest
import torch

import fastllm.ops as ops
from fastllm._reference import (galore_adam8bit_step_reference, galore_adam_step_reference,
                                galore_project_back_reference, galore_project_reference)
from fastllm._reference.galore import (dequantize_blockwise_reference,
                                       quantize_blockwise_reference)
from helpers import FLOAT_DTYPES, TOLERANCES, poison, random_tensor

# (use left, use right): right-only (std for m >= n), left-only, both (full), none (plain AdamW)
SIDES = [(False, True), (True, False), (True, True), (False, False)]
SHAPES = [(37, 29), (16, 64), (1, 9), (130, 3)]
HYPER = dict(lr=3e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1, scale=0.25)


def make_projectors(m, n, rank, sides, device, dtype=torch.float32):
    left = right = None
    if sides[0]:
        left = torch.linalg.qr(torch.randn(m, rank))[0].to(device=device, dtype=dtype)
    if sides[1]:
        right = torch.linalg.qr(torch.randn(n, rank))[0].t().contiguous().to(device=device,
                                                                            dtype=dtype)
    return left, right


def low_shape(m, n, left, right):
    return (left.shape[1] if left is not None else m, right.shape[0] if right is not None else n)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("grad_is_projected", [False, True])
def test_adam_step_matches_reference(device, dtype, sides, shape, grad_is_projected):
    m, n = shape
    rank = min(3, m, n)
    left, right = make_projectors(m, n, rank, sides, device)
    if grad_is_projected and left is None and right is None:
        pytest.skip("nothing to project")
    param = random_tensor(m, n, dtype=dtype, device=device)
    full_grad = random_tensor(m, n, dtype=dtype, device=device)
    grad = galore_project_reference(full_grad, left, right) if grad_is_projected else full_grad
    low = low_shape(m, n, left, right)
    exp_avg = 0.1 * random_tensor(*low, device=device)
    exp_avg_sq = torch.rand(*low, device=device) * 0.1
    expected = [t.clone() for t in (param, exp_avg, exp_avg_sq)]
    for step in (1, 5):
        ops.galore_adam_step(param, grad, left, right, exp_avg, exp_avg_sq,
                             grad_is_projected=grad_is_projected, step=step, **HYPER)
        galore_adam_step_reference(*expected[:1], grad, left, right, *expected[1:],
                                   grad_is_projected=grad_is_projected, step=step, **HYPER)
    # Half-precision GEMMs round the low-rank gradient; moments are compared at that precision.
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(param.float(), expected[0].float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(exp_avg, expected[1], rtol=rtol, atol=atol)
    torch.testing.assert_close(exp_avg_sq, expected[2], rtol=rtol, atol=atol)
    assert not torch.equal(param.float(), full_grad.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("shape", [(37, 29), (300, 40), (2, 700)])
def test_adam8bit_step_matches_reference(device, dtype, sides, shape):
    m, n = shape
    left, right = make_projectors(m, n, min(5, m, n), sides, device)
    param = random_tensor(m, n, dtype=dtype, device=device)
    numel = torch.Size(low_shape(m, n, left, right)).numel()
    blocks = -(-numel // 256)
    state = [torch.zeros(numel, dtype=torch.int8, device=device),
             torch.zeros(blocks, device=device),
             torch.zeros(numel, dtype=torch.uint8, device=device),
             torch.zeros(blocks, device=device)]
    expected_param, expected_state = param.clone(), [t.clone() for t in state]
    hyper = dict(HYPER, beta2=0.999)
    # A bf16 GEMM rounds the low-rank gradient, and the codes would follow that rounding: give
    # both the same fp32 low-rank gradient there, so the codes must agree.
    projected = dtype != torch.float32 and (left is not None or right is not None)
    for step in range(1, 6):
        grad = random_tensor(m, n, dtype=dtype, device=device)
        if projected:
            grad = galore_project_reference(grad, left, right)
        ops.galore_adam8bit_step(param, grad, left, right, *state, step=step,
                                 grad_is_projected=projected, **hyper)
        galore_adam8bit_step_reference(expected_param, grad, left, right, *expected_state,
                                       grad_is_projected=projected, step=step, **hyper)
    # Identical formulas; a code may differ by one where a value sits on a rounding boundary.
    for ours, ref in zip(state, expected_state):
        torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-2, atol=1.0)
    assert (state[0] != 0).any() and (state[2] != 0).any()
    rtol, atol = TOLERANCES[dtype] if dtype != torch.float32 else (1e-4, 1e-4)
    torch.testing.assert_close(param.float(), expected_param.float(), rtol=rtol, atol=atol)


def test_adam8bit_tracks_fp32_moments(device):
    # Over many steps the 8-bit moments stay within quantisation error of fp32 moments.
    m, n = 64, 48
    left, right = make_projectors(m, n, 8, (False, True), device)
    p32 = random_tensor(m, n, device=device)
    p8 = p32.clone()
    low = low_shape(m, n, left, right)
    ea, eas = torch.zeros(low, device=device), torch.zeros(low, device=device)
    numel, blocks = ea.numel(), -(-ea.numel() // 256)
    state = [torch.zeros(numel, dtype=torch.int8, device=device), torch.zeros(blocks, device=device),
             torch.zeros(numel, dtype=torch.uint8, device=device),
             torch.zeros(blocks, device=device)]
    start = p32.clone()
    for step in range(1, 31):
        grad = random_tensor(m, n, device=device) + 0.5
        ops.galore_adam_step(p32, grad, left, right, ea, eas, step=step, lr=1e-2)
        ops.galore_adam8bit_step(p8, grad, left, right, *state, step=step, lr=1e-2)
    moved = (p32 - start).norm()
    assert (p8 - p32).norm() < 0.05 * moved
    m8 = dequantize_blockwise_reference(state[0], state[1], True).view(low)
    assert (m8 - ea).abs().max() < 0.03 * ea.abs().max()


@pytest.mark.parametrize("signed", [True, False])
def test_quantization_roundtrip(signed):
    x = torch.randn(1000) * torch.logspace(-4, 0, 1000)
    if not signed:
        x = x.square()
    codes, absmax = quantize_blockwise_reference(x, signed)
    back = dequantize_blockwise_reference(codes, absmax, signed)
    # Companding keeps small values: relative error stays bounded well below the block maximum.
    big = x.abs() > 0.05 * absmax.repeat_interleave(256)[:1000]
    rel = ((back - x).abs() / x.abs())[big]
    assert rel.max() < (0.1 if signed else 0.2)
    assert torch.equal(quantize_blockwise_reference(back, signed)[0], codes)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("sides", SIDES[:3])
def test_project_and_project_back(device, dtype, sides):
    m, n = 33, 21
    left, right = make_projectors(m, n, 4, sides, device)
    grad = random_tensor(m, n, dtype=dtype, device=device)
    rtol, atol = TOLERANCES[dtype]
    low = ops.galore_project(grad, left, right)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, galore_project_reference(grad, left, right), rtol=rtol,
                               atol=atol * 10)
    param = random_tensor(m, n, dtype=dtype, device=device)
    expected = 0.9 * param.float() - 0.5 * galore_project_back_reference(low, left, right)
    ops.galore_project_back_(param, low, left, right, alpha=-0.5, beta=0.9)
    torch.testing.assert_close(param.float(), expected, rtol=rtol, atol=atol * 10)


def test_project_writes_every_output_element(device):
    left, right = make_projectors(40, 30, 6, (True, False), device)
    del_me = poison(torch.empty(6, 30, device=device))
    del del_me
    low = ops.galore_project(random_tensor(40, 30, device=device), left, right)
    assert not low.isnan().any()


def test_low_rank_output_is_fully_written(device):
    # The low-rank normalised step is allocated uninitialised inside the op; a poisoned param that
    # the GEMM epilogue scales by beta = 1 would stay NaN only where nothing was written.
    m, n = 50, 20
    left, right = make_projectors(m, n, 4, (True, False), device)
    param = torch.zeros(m, n, device=device)
    low = low_shape(m, n, left, right)
    ea, eas = torch.zeros(low, device=device), torch.zeros(low, device=device)
    ops.galore_adam_step(param, random_tensor(m, n, device=device), left, right, ea, eas, lr=1.0,
                         step=1)
    assert torch.isfinite(param).all() and (param != 0).any()


def test_empty_weight(device):
    param = torch.empty(0, 7, device=device)
    ops.galore_adam_step(param, torch.empty(0, 7, device=device), None, None,
                         torch.empty(0, 7, device=device), torch.empty(0, 7, device=device),
                         lr=1e-3, step=1)
    state = [torch.empty(0, dtype=torch.int8, device=device), torch.empty(0, device=device),
             torch.empty(0, dtype=torch.uint8, device=device), torch.empty(0, device=device)]
    ops.galore_adam8bit_step(param, torch.empty(0, 7, device=device), None, None, *state,
                             lr=1e-3, step=1)


def _opcheck_args(device, eight_bit):
    m, n = 12, 10
    left, right = make_projectors(m, n, 3, (False, True), device)
    param, grad = random_tensor(m, n, device=device), random_tensor(m, n, device=device)
    if eight_bit:
        state = (torch.zeros(36, dtype=torch.int8, device=device), torch.zeros(1, device=device),
                 torch.zeros(36, dtype=torch.uint8, device=device), torch.zeros(1, device=device))
    else:
        state = (torch.zeros(m, 3, device=device), torch.zeros(m, 3, device=device))
    return (param, grad, None, right, *state, False, 1e-3, 0.9, 0.999, 1e-6, 0.0, 1.0, 1)


def test_opcheck(device):
    torch.library.opcheck(torch.ops.fastllm.galore_adam_step.default,
                          _opcheck_args(device, False))
    torch.library.opcheck(torch.ops.fastllm.galore_adam8bit_step.default,
                          _opcheck_args(device, True))
    left, right = make_projectors(12, 10, 3, (True, True), device)
    grad = random_tensor(12, 10, device=device)
    torch.library.opcheck(torch.ops.fastllm.galore_project.default, (grad, left, right))
    torch.library.opcheck(torch.ops.fastllm.galore_project_back_.default,
                          (grad.clone(), random_tensor(3, 3, device=device), left, right, -1.0,
                           1.0))


def _step(param, grad, left, right, ea, eas, **overrides):
    kwargs = dict(lr=1e-3, step=1)
    kwargs.update(overrides)
    ops.galore_adam_step(param, grad, left, right, ea, eas, **kwargs)


def test_rejections(device):
    m, n = 8, 6
    left, right = make_projectors(m, n, 2, (True, True), device)
    p, g = random_tensor(m, n, device=device), random_tensor(m, n, device=device)
    ea, eas = torch.zeros(2, n, device=device), torch.zeros(2, n, device=device)
    with pytest.raises(ValueError, match=r"galore_adam_step: left must be \[8, rank\]"):
        _step(p, g, left[:5], None, ea, eas)
    with pytest.raises(ValueError, match="right must be \\[rank, 6\\]"):
        _step(p, g, None, right[:, :4], ea, eas)
    with pytest.raises(ValueError, match="left and right must have the same rank"):
        _step(p, g, left, right[:1], ea, eas)
    with pytest.raises(ValueError, match="grad must have shape"):
        _step(p, g[:3], left, None, ea, eas)
    with pytest.raises(ValueError, match="exp_avg must have 12 elements"):
        _step(p, g, left, None, torch.zeros(3, n, device=device), eas)
    with pytest.raises(TypeError, match="exp_avg_sq must be Float"):
        _step(p, g, left, None, ea, eas.double())
    with pytest.raises(TypeError, match="param must have dtype in"):
        _step(p.double(), g.double(), left, None, ea, eas)
    with pytest.raises(ValueError, match="param must be contiguous"):
        _step(p.t(), g.t(), None, None, torch.zeros(m * n, device=device),
              torch.zeros(m * n, device=device))
    with pytest.raises(ValueError, match="param must be 2-D"):
        _step(p.reshape(-1), g.reshape(-1), left, None, ea, eas)
    with pytest.raises(ValueError, match="step must be >= 1"):
        _step(p, g, left, None, ea, eas, step=0)
    with pytest.raises(ValueError, match="beta1 must be in"):
        _step(p, g, left, None, ea, eas, beta1=1.0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        _step(p, g, left, None, ea, eas, eps=0.0)
    with pytest.raises(TypeError, match="exp_avg_codes must be Char"):
        ops.galore_adam8bit_step(p, g, left, None, torch.zeros(12, dtype=torch.uint8, device=device),
                                 torch.zeros(1, device=device),
                                 torch.zeros(12, dtype=torch.uint8, device=device),
                                 torch.zeros(1, device=device), lr=1e-3, step=1)
    with pytest.raises(ValueError, match="exp_avg_absmax must have 1 elements"):
        ops.galore_adam8bit_step(p, g, left, None, torch.zeros(12, dtype=torch.int8, device=device),
                                 torch.zeros(2, device=device),
                                 torch.zeros(12, dtype=torch.uint8, device=device),
                                 torch.zeros(1, device=device), lr=1e-3, step=1)
    with pytest.raises(ValueError, match="galore_project: at least one of left and right"):
        ops.galore_project(g, None, None)
    with pytest.raises(TypeError, match="galore_project_back_: low must be Float"):
        ops.galore_project_back_(p, torch.zeros(2, n, device=device).double(), left, None,
                                 alpha=1.0)
    # A rejected call leaves everything untouched.
    before = p.clone()
    with pytest.raises(ValueError):
        _step(p, g, left, None, ea, eas, step=0)
    assert torch.equal(p, before) and not ea.any()
