"""Threshold mode (CATS style): per-layer thresholds on ``|act(gate)|`` calibrated to a target
sparsity from calibration text; no training."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._sites import _per_layer, collect_mlp_data



def gate_magnitudes(model: nn.Module, calibration_ids: Tensor,
                    max_values: int = 1 << 22) -> list[Tensor]:
    """Per layer, a sample of ``|act(gate)|`` (``|act(fc1)|`` for ReLU models) on the tokens."""
    def magnitudes(i, view, x):
        pre = F.linear(x, view.gate_w if view.kind == "gated" else view.up_w,
                       view.gate_b if view.kind == "gated" else view.up_b)
        values = view._act(pre).abs().flatten().float()
        if values.numel() > max_values:  # a uniform sample keeps the quantile cheap
            values = values[torch.randint(values.numel(), (max_values,), device=values.device)]
        return values.cpu()

    return [torch.cat(v) for v in collect_mlp_data(model, calibration_ids, magnitudes)]


def thresholds_from_magnitudes(magnitudes: list[Tensor], sparsity) -> list[float]:
    """Per layer, the value below which the given share of the sampled magnitudes lies."""
    out = []
    for values, s in zip(magnitudes, _per_layer(sparsity, len(magnitudes), "sparsity")):
        if s <= 0:
            out.append(-1.0)
            continue
        kth = max(1, min(values.numel(), int(round(s * values.numel()))))
        out.append(values.kthvalue(kth).values.item())
    return out


def calibrate_thresholds(model: nn.Module, calibration_ids: Tensor, sparsity) -> list[float]:
    """Per-layer thresholds on ``|act(gate)|`` (``|act(fc1)|`` for ReLU models) such that the
    given share of neurons (a float, or one per layer) falls below them on the calibration
    tokens."""
    return thresholds_from_magnitudes(gate_magnitudes(model, calibration_ids), sparsity)
