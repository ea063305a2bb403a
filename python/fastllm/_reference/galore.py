"""References for GaLore: galore-torch's algorithm in plain torch, and the unfused op baselines.

``GaLoreAdamWReference`` restates galore-torch's ``GaLoreAdamW`` (arXiv 2403.03507) step by step, so
it is the trajectory oracle for :class:`fastllm.optim.GaLoreAdamW`:

* a projected gradient ``R`` of a 2-D gradient ``G`` (m x n) by the projector type: ``std`` projects
  on the right (``P = Vh[:r]``, ``R = G P^T``) when m >= n, else on the left (``P = U[:, :r]``,
  ``R = P^T G``); ``reverse_std`` the opposite; ``right``/``left`` always that side; ``full`` both;
* the projector recomputed from a full fp32 SVD of ``G`` whenever ``step % update_proj_gap == 0``
  (the step counter before it is incremented, so the first step refreshes);
* Adam moments in the low-rank space, kept unchanged across refreshes;
* ``p -= lr * sqrt(1 - beta2^t) / (1 - beta1^t) * scale * back(m / (sqrt(v) + eps))``, then the
  decoupled weight decay ``p -= lr * wd * p`` on the updated weight.

The op references (``galore_*_reference``) are the unfused torch versions of fastllm's fused ops,
used as test oracles and as the benchmark baseline.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
QUANT_BLOCK = 256


def projection_sides(shape: tuple[int, int], proj_type: str) -> tuple[bool, bool]:
    """(uses_left, uses_right) for a gradient of ``shape`` under galore-torch's rule."""
    m, n = shape
    if proj_type == "std":
        return (False, True) if m >= n else (True, False)
    if proj_type == "reverse_std":
        return (True, False) if m >= n else (False, True)
    if proj_type == "left":
        return True, False
    if proj_type == "right":
        return False, True
    if proj_type == "full":
        return True, True
    raise ValueError(f"unknown proj_type {proj_type!r}; expected one of {PROJ_TYPES}")


def galore_projector_reference(grad: Tensor, rank: int, proj_type: str
                               ) -> tuple[Tensor | None, Tensor | None]:
    """``(left, right)``: ``left`` is ``U[:, :rank]`` (m x r), ``right`` is ``Vh[:rank]`` (r x n),
    ``None`` for a side the projector type does not use. Full SVD in fp32, as galore-torch."""
    use_left, use_right = projection_sides(tuple(grad.shape), proj_type)
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    left = u[:, :rank].contiguous() if use_left else None
    right = vh[:rank].contiguous() if use_right else None
    return left, right


def galore_project_reference(grad: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """Down-projection ``left^T @ grad @ right^T`` (missing sides skipped), in fp32."""
    out = grad.float()
    if left is not None:
        out = left.float().t() @ out
    if right is not None:
        out = out @ right.float().t()
    return out


def galore_project_back_reference(low: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """Back-projection ``left @ low @ right`` (missing sides skipped), in fp32."""
    out = low.float()
    if left is not None:
        out = left.float() @ out
    if right is not None:
        out = out @ right.float()
    return out


def adam_step_size(lr: float, beta1: float, beta2: float, step: int) -> float:
    """Bias-corrected step size after ``step`` updates (step counts from 1)."""
    return lr * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)


def galore_adam_step_reference(param: Tensor, grad: Tensor, left: Tensor | None,
                               right: Tensor | None, exp_avg: Tensor, exp_avg_sq: Tensor, *,
                               grad_is_projected: bool, lr: float, beta1: float, beta2: float,
                               eps: float, weight_decay: float, scale: float, step: int) -> None:
    """The unfused torch form of ``fastllm.ops.galore_adam_step`` (the step number ``step`` is the
    count after this update, from 1). Moments are fp32; ``param`` is updated in place."""
    low = grad.float() if grad_is_projected else galore_project_reference(grad, left, right)
    exp_avg.mul_(beta1).add_(low, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
    norm = exp_avg / (exp_avg_sq.sqrt() + eps)
    update = galore_project_back_reference(norm, left, right)
    step_size = adam_step_size(lr, beta1, beta2, step)
    new = param.float() - step_size * scale * update
    new = new - lr * weight_decay * new
    param.copy_(new)


# ---- 8-bit moments -------------------------------------------------------------------------------
# Blocks of QUANT_BLOCK consecutive elements share one fp32 absmax. Values are companded so small
# moments keep relative precision: the first moment as sign * (|q| / 127)^2 * absmax (int8), the
# second moment as (q / 255)^4 * absmax (uint8).

def _blocks(x: Tensor) -> tuple[Tensor, int]:
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % QUANT_BLOCK
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, QUANT_BLOCK), flat.numel()


def quantize_blockwise_reference(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """``(codes, absmax)`` of ``x`` (flattened): int8 codes for the first moment (``signed``),
    uint8 codes for the non-negative second moment."""
    blocks, numel = _blocks(x)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
    if signed:
        codes = torch.round(127.0 * torch.sqrt(blocks.abs() / safe)) * blocks.sign()
        codes = codes.to(torch.int8)
    else:
        codes = torch.round(255.0 * torch.sqrt(torch.sqrt(blocks.clamp_min(0) / safe)))
        codes = codes.to(torch.uint8)
    return codes.reshape(-1)[:numel].contiguous(), absmax


def dequantize_blockwise_reference(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """The fp32 values (flat) that ``codes`` and ``absmax`` stand for."""
    blocks, numel = _blocks(codes.float())
    if signed:
        values = blocks.sign() * (blocks.abs() / 127.0) ** 2 * absmax.unsqueeze(1)
    else:
        values = (blocks / 255.0) ** 4 * absmax.unsqueeze(1)
    return values.reshape(-1)[:numel]


def galore_adam8bit_step_reference(param: Tensor, grad: Tensor, left: Tensor | None,
                                   right: Tensor | None, exp_avg_codes: Tensor,
                                   exp_avg_absmax: Tensor, exp_avg_sq_codes: Tensor,
                                   exp_avg_sq_absmax: Tensor, *, grad_is_projected: bool,
                                   lr: float, beta1: float, beta2: float, eps: float,
                                   weight_decay: float, scale: float, step: int) -> None:
    """``galore_adam_step_reference`` with moments stored as blockwise 8-bit codes (updated in
    place): dequantise, update in fp32, requantise with each block's new absmax."""
    low = grad.float() if grad_is_projected else galore_project_reference(grad, left, right)
    m = dequantize_blockwise_reference(exp_avg_codes, exp_avg_absmax, True).view_as(low)
    v = dequantize_blockwise_reference(exp_avg_sq_codes, exp_avg_sq_absmax, False).view_as(low)
    m = beta1 * m + (1.0 - beta1) * low
    v = beta2 * v + (1.0 - beta2) * low * low
    norm = m / (v.sqrt() + eps)
    codes, absmax = quantize_blockwise_reference(m, True)
    exp_avg_codes.copy_(codes)
    exp_avg_absmax.copy_(absmax)
    codes, absmax = quantize_blockwise_reference(v, False)
    exp_avg_sq_codes.copy_(codes)
    exp_avg_sq_absmax.copy_(absmax)
    update = galore_project_back_reference(norm, left, right)
    step_size = adam_step_size(lr, beta1, beta2, step)
    new = param.float() - step_size * scale * update
    new = new - lr * weight_decay * new
    param.copy_(new)


# ---- galore-torch's GaLoreAdamW, restated ---------------------------------------------------------

class GaLoreAdamWReference(torch.optim.Optimizer):
    """galore-torch's ``GaLoreAdamW`` in plain torch (the oracle for trajectories).

    Groups holding ``rank`` are projected with ``update_proj_gap``, ``scale`` and ``proj_type``;
    other groups are plain AdamW with weight decay applied after the update, as galore-torch does.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 correct_bias=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                if "rank" in group:
                    if state["step"] % group["update_proj_gap"] == 0:
                        state["left"], state["right"] = galore_projector_reference(
                            grad, group["rank"], group.get("proj_type", "std"))
                    grad = galore_project_reference(grad, state["left"], state["right"])
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size = adam_step_size(group["lr"], beta1, beta2, state["step"])
                norm_grad = exp_avg / denom
                if "rank" in group:
                    norm_grad = galore_project_back_reference(norm_grad, state["left"],
                                                              state["right"]) * group["scale"]
                p.add_(norm_grad.to(p.dtype), alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
