"""GaLore's ops: typed wrappers and fake implementations.

Re-exported by :mod:`fastllm.ops`; the schemas live in ``csrc/registration.cpp``. None of these ops
is differentiable: they are optimizer steps and projections of gradients.

Shapes: a projected weight ``param`` is ``[m, n]``; ``left`` is ``[m, r]`` (``U[:, :r]``) and/or
``right`` is ``[r, n]`` (``Vh[:r]``); the low-rank gradient is ``left^T grad right^T`` with a missing
side skipped (``[r, n]``, ``[m, r]`` or ``[r, r]``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import require_kernels_for as _require_kernels_for

__all__ = ["galore_adam_step", "galore_adam8bit_step", "galore_project", "galore_project_back_",
           "QUANT_BLOCK"]

#: Elements sharing one fp32 absmax in the 8-bit moment format.
QUANT_BLOCK = 256


def galore_adam_step(param: Tensor, grad: Tensor, left: Tensor | None, right: Tensor | None,
                     exp_avg: Tensor, exp_avg_sq: Tensor, *, grad_is_projected: bool = False,
                     lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6,
                     weight_decay: float = 0.0, scale: float = 1.0, step: int,
                     found_inf: Tensor | None = None) -> None:
    """One fused GaLore-AdamW step on ``param`` (in place), moments updated in place.

    Projects ``grad`` down (unless ``grad_is_projected``), updates the fp32 moments ``exp_avg`` /
    ``exp_avg_sq`` (low-rank shape) and normalises in the low-rank space, then writes
    ``param = decay * param - lr * bc * scale * decay * back(m / (sqrt(v) + eps))`` with one GEMM
    whose epilogue is the update (``decay = 1 - lr * weight_decay``, ``bc`` the bias correction
    after ``step`` updates, counting from 1). With ``left`` and ``right`` both ``None`` it is a
    plain AdamW step (decay after the update, as galore-torch), fused in one pass.

    Args:
        param: contiguous float32/float16/bfloat16 weight.
        grad: the full gradient (``param``'s shape) or, with ``grad_is_projected``, the low-rank one.
        left, right: projectors (any float dtype; cast to the weight's dtype for the GEMMs).
        exp_avg, exp_avg_sq: contiguous float32 moments with the low-rank gradient's numel.
        found_inf: optional one-element bool or float32 tensor on ``param``'s device (e.g.
            ``~torch.isfinite(grad).all()``, or torch.amp's ``found_inf``). Non-zero: the step is
            skipped, ``param`` and the moments are left unchanged. Read by the kernels on the
            device, so skipping a bad step costs no host synchronisation.

    Without projectors it is one AdamW step, with ``eps`` added before the bias correction as in
    galore-torch (``torch.optim.AdamW`` adds it after, so small gradients step a little apart):

    >>> _ = torch.manual_seed(0)
    >>> w, g = torch.randn(8, 8), torch.randn(8, 8)
    >>> m, v = torch.zeros(8, 8), torch.zeros(8, 8)
    >>> bc = (1 - 0.999) ** 0.5 / (1 - 0.9)             # bias correction after one step
    >>> expected = w - 1e-2 * bc * (0.1 * g) / ((0.001 * g * g).sqrt() + 1e-6)
    >>> fastllm.ops.galore_adam_step(w, g, None, None, m, v, lr=1e-2, step=1)
    >>> torch.allclose(w, expected, atol=1e-6), torch.allclose(m, 0.1 * g)
    (True, True)
    """
    _require_kernels_for(param, "galore_adam_step")
    torch.ops.fastllm.galore_adam_step.default(param, grad, left, right, exp_avg, exp_avg_sq,
                                               grad_is_projected, lr, beta1, beta2, eps,
                                               weight_decay, scale, step, found_inf)


def galore_adam8bit_step(param: Tensor, grad: Tensor, left: Tensor | None, right: Tensor | None,
                         exp_avg_codes: Tensor, exp_avg_absmax: Tensor, exp_avg_sq_codes: Tensor,
                         exp_avg_sq_absmax: Tensor, *, grad_is_projected: bool = False, lr: float,
                         beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6,
                         weight_decay: float = 0.0, scale: float = 1.0, step: int,
                         found_inf: Tensor | None = None) -> None:
    """:func:`galore_adam_step` with blockwise 8-bit moments, requantised in place.

    ``exp_avg_codes`` (int8) and ``exp_avg_sq_codes`` (uint8) hold one code per low-rank element;
    ``*_absmax`` (float32) one scale per block of :data:`QUANT_BLOCK` elements. Codes are companded:
    ``m = sign(q) (|q| / 127)^2 absmax`` and ``v = (q / 255)^4 absmax``, so small moments keep
    relative precision. Zero codes and zero absmax are a valid fresh state. ``found_inf`` as in
    :func:`galore_adam_step` (a skipped step leaves codes and absmax unchanged).

    >>> _ = torch.manual_seed(0)
    >>> w, g = torch.randn(16, 32), torch.randn(16, 32)
    >>> left = torch.linalg.svd(g, full_matrices=False).U[:, :4]    # rank-4 projector
    >>> numel = 4 * 32                                   # the low-rank gradient's elements
    >>> blocks = -(-numel // 256)                        # one absmax per 256 of them
    >>> m_codes = torch.zeros(numel, dtype=torch.int8)
    >>> v_codes = torch.zeros(numel, dtype=torch.uint8)
    >>> m_max, v_max = torch.zeros(blocks), torch.zeros(blocks)
    >>> before = w.clone()
    >>> fastllm.ops.galore_adam8bit_step(w, g, left, None, m_codes, m_max, v_codes, v_max,
    ...                                  lr=1e-2, step=1)
    >>> torch.linalg.matrix_rank(w - before, rtol=1e-4).item(), bool(m_codes.any())
    (4, True)
    """
    _require_kernels_for(param, "galore_adam8bit_step")
    torch.ops.fastllm.galore_adam8bit_step.default(
        param, grad, left, right, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes,
        exp_avg_sq_absmax, grad_is_projected, lr, beta1, beta2, eps, weight_decay, scale, step,
        found_inf)


def galore_project(grad: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """``left^T @ grad @ right^T`` (missing sides skipped) as a new float32 tensor.

    >>> _ = torch.manual_seed(0)
    >>> grad, left = torch.randn(16, 8), torch.randn(16, 2)
    >>> low = fastllm.ops.galore_project(grad, left, None)
    >>> low.shape, torch.allclose(low, left.T @ grad, atol=1e-5)
    (torch.Size([2, 8]), True)
    """
    return torch.ops.fastllm.galore_project.default(grad, left, right)


def galore_project_back_(param: Tensor, low: Tensor, left: Tensor | None, right: Tensor | None,
                         *, alpha: float, beta: float = 1.0) -> None:
    """``param = beta * param + alpha * (left @ low @ right)`` in place, as one GEMM.

    >>> _ = torch.manual_seed(0)
    >>> param, low, left = torch.randn(16, 8), torch.randn(2, 8), torch.randn(16, 2)
    >>> expected = 0.9 * param - 0.5 * left @ low
    >>> fastllm.ops.galore_project_back_(param, low, left, None, alpha=-0.5, beta=0.9)
    >>> torch.allclose(param, expected, atol=1e-5)
    True
    """
    torch.ops.fastllm.galore_project_back_.default(param, low, left, right, alpha, beta)


@torch.library.register_fake("fastllm::galore_adam_step")
def _galore_adam_step_fake(param, grad, left, right, exp_avg, exp_avg_sq, grad_is_projected, lr,
                           beta1, beta2, eps, weight_decay, scale, step, found_inf=None) -> None:
    return None


@torch.library.register_fake("fastllm::galore_adam8bit_step")
def _galore_adam8bit_step_fake(param, grad, left, right, m_codes, m_absmax, v_codes, v_absmax,
                               grad_is_projected, lr, beta1, beta2, eps, weight_decay, scale,
                               step, found_inf=None) -> None:
    return None


@torch.library.register_fake("fastllm::galore_project")
def _galore_project_fake(grad, left, right) -> Tensor:
    rows = left.shape[1] if left is not None else grad.shape[0]
    cols = right.shape[0] if right is not None else grad.shape[1]
    return grad.new_empty((rows, cols), dtype=torch.float32)


@torch.library.register_fake("fastllm::galore_project_back_")
def _galore_project_back_fake(param, low, left, right, alpha, beta) -> None:
    return None
