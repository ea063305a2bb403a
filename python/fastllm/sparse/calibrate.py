"""Threshold mode (CATS style): per-layer thresholds on ``|act(gate)|`` calibrated to a target
sparsity from calibration text; no training."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._progress import Progress, check_progress
from ._sites import _batch_count, _collect, _per_layer, check_sparsity, check_token_ids, find_mlps



def gate_magnitudes(model: nn.Module, calibration_ids: Tensor, max_values: int = 1 << 22, *,
                    progress: bool | None = None, batch_size: int = 4) -> list[Tensor]:
    """Per layer, a sample of ``|act(gate)|`` (``|act(fc1)|`` for ReLU models) on the tokens.

    ``progress`` reports the dense passes (``batch_size`` sequences each) on stderr: True,
    False, or None (the default) for only when stderr is a terminal.

    >>> import transformers
    >>> _ = torch.manual_seed(0)
    >>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    ...     vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...     num_attention_heads=4)).eval()
    >>> ids = torch.randint(64, (4, 32))               # calibration token ids
    >>> magnitudes = fastllm.sparse.gate_magnitudes(model, ids, progress=False)
    >>> len(magnitudes), magnitudes[0].shape         # per layer: tokens x neurons values
    (2, torch.Size([16384]))
    >>> bool((magnitudes[0] >= 0).all())
    True
    """
    show = check_progress(progress, "fastllm.sparse.gate_magnitudes")
    check_token_ids(calibration_ids, "gate_magnitudes")
    _check_batch_size(batch_size, "gate_magnitudes")
    with Progress(_batch_count(calibration_ids, batch_size), "calibrating thresholds", show,
                  unit="batch") as bar:
        return _gate_magnitudes(model, calibration_ids, max_values, batch_size, bar)


def _check_batch_size(batch_size, where: str) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"fastllm.sparse.{where}: batch_size must be a positive int, "
                         f"got {batch_size!r}")


def _gate_magnitudes(model: nn.Module, calibration_ids: Tensor, max_values: int,
                     batch_size: int, bar: Progress) -> list[Tensor]:
    def magnitudes(i, view, x):
        pre = F.linear(x, view.gate_w if view.kind == "gated" else view.up_w,
                       view.gate_b if view.kind == "gated" else view.up_b)
        values = view._act(pre).abs().flatten().float()
        if values.numel() > max_values:  # a uniform sample keeps the quantile cheap
            values = values[torch.randint(values.numel(), (max_values,), device=values.device)]
        return values.cpu()

    return [torch.cat(v) for v in _collect(model, calibration_ids, magnitudes, batch_size, bar)]


def thresholds_from_magnitudes(magnitudes: list[Tensor], sparsity) -> list[float]:
    """Per layer, the value below which the given share of the sampled magnitudes lies.

    >>> magnitudes = [torch.arange(1.0, 11.0), torch.arange(10.0, 110.0, 10.0)]
    >>> fastllm.sparse.thresholds_from_magnitudes(magnitudes, 0.3)
    [3.0, 30.0]
    >>> fastllm.sparse.thresholds_from_magnitudes(magnitudes, [0.0, 0.5])   # 0: keep all
    [-1.0, 50.0]
    """
    check_sparsity(sparsity, "thresholds_from_magnitudes")
    return _thresholds(magnitudes, sparsity, Progress(0, "", False))


def _thresholds(magnitudes: list[Tensor], sparsity, bar: Progress) -> list[float]:
    out = []
    for values, s in zip(magnitudes, _per_layer(sparsity, len(magnitudes), "sparsity")):
        if s <= 0:
            out.append(-1.0)
        else:
            kth = max(1, min(values.numel(), int(round(s * values.numel()))))
            out.append(values.kthvalue(kth).values.item())
        bar.update()
    return out


def calibrate_thresholds(model: nn.Module, calibration_ids: Tensor, sparsity, *,
                         progress: bool | None = None, batch_size: int = 4) -> list[float]:
    """Per-layer thresholds on ``|act(gate)|`` (``|act(fc1)|`` for ReLU models) such that the
    given share of neurons (a float, or one per layer) falls below them on the calibration
    tokens. ``progress`` reports the dense passes (``batch_size`` sequences each) and each
    layer's quantile on stderr: True, False, or None (the default) for only when stderr is a
    terminal.

    >>> import transformers
    >>> _ = torch.manual_seed(0)
    >>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    ...     vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...     num_attention_heads=4)).eval()
    >>> ids = torch.randint(64, (4, 32))               # calibration token ids
    >>> thresholds = fastllm.sparse.calibrate_thresholds(model, ids, 0.5, progress=False)
    >>> magnitudes = fastllm.sparse.gate_magnitudes(model, ids, progress=False)
    >>> [round((m < t).float().mean().item(), 2) for m, t in zip(magnitudes, thresholds)]
    [0.5, 0.5]
    >>> _ = fastllm.sparse.sparsify(model, 0.5, mode="threshold", thresholds=thresholds)
    """
    show = check_progress(progress, "fastllm.sparse.calibrate_thresholds")
    check_sparsity(sparsity, "calibrate_thresholds")  # before the dense passes, not after
    check_token_ids(calibration_ids, "calibrate_thresholds")
    _check_batch_size(batch_size, "calibrate_thresholds")
    steps = _batch_count(calibration_ids, batch_size) + len(find_mlps(model))
    with Progress(steps, "calibrating thresholds", show) as bar:
        magnitudes = _gate_magnitudes(model, calibration_ids, 1 << 22, batch_size, bar)
        return _thresholds(magnitudes, sparsity, bar)
