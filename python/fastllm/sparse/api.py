"""The user-facing switch: ``sparsify`` a model (per-layer sparsity, predictors, selection,
batch handling), ``densify`` it back, and ``allocate_sparsity`` across layers."""

from __future__ import annotations

import math
import pathlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._progress import check_progress
from ..nn.sparse_mlp import SPARSE_MLP_MODES, SparseMLP, _check_choice, check_mlp_options
from ._sites import (_dense_mlp, _install, _model_identity, _per_layer, check_sparsity,
                     check_token_ids, collect_mlp_data, densify, find_mlps)
from .calibrate import calibrate_thresholds
from .predictors import PredictorMismatchError, Predictors, train_predictors


@torch.no_grad()

def allocate_sparsity(model: nn.Module, predictors: "Predictors | None", calibration_ids: Tensor,
                      sparsity: float, *, step: float = 0.05, max_sparsity: float = 0.9,
                      error: str = "relative", progress: bool | None = None) -> list[float]:
    """Per-layer sparsities averaging ``sparsity`` that minimise the summed MLP output error.

    On ``calibration_ids`` each layer's MLP output error ``||W_down (h * (1 - mask))||^2`` of the
    predictor's top-k selection (the oracle's with ``predictors=None``) is measured on a grid of
    keep fractions (``step`` apart); ``error="relative"`` divides it by ``||W_down h||^2``, and
    ``"absolute"`` does not (layers with large MLP outputs then stay denser). Starting from every
    layer at ``max_sparsity``, density is added ``step`` at a time where it removes the most
    error, until the average density is ``1 - sparsity``. ``progress`` reports the dense
    passes on stderr: True, False, or None (the default) for only when stderr is a terminal.

    >>> import transformers
    >>> _ = torch.manual_seed(0)
    >>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    ...     vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...     num_attention_heads=4)).eval()
    >>> ids = torch.randint(64, (4, 32))               # calibration token ids
    >>> per_layer = fastllm.sparse.allocate_sparsity(model, None, ids, 0.5, progress=False)
    >>> len(per_layer), round(sum(per_layer) / len(per_layer), 6)   # one per MLP, mean 0.5
    (2, 0.5)
    >>> _ = fastllm.sparse.sparsify(model, per_layer, mode="oracle")
    """
    check_progress(progress, "fastllm.sparse.allocate_sparsity")
    _check_allocate_args(model, predictors, calibration_ids, sparsity, step, max_sparsity, error)
    grid = [round(k * step, 6) for k in range(1, int(round(1 / step)) + 1)]  # keep fractions
    grid = [g for g in grid if g >= 1 - max_sparsity - 1e-9]

    def errors(i, view, x):
        h = view.dense_hidden(x).float()
        scores = h.abs() if predictors is None else predictors.layers[i](x).float()
        order = scores.argsort(dim=-1, descending=True)
        down = view.down_w.float()
        full = F.linear(h, down)
        base = full.pow(2).sum().item() if error == "relative" else 1.0
        out = []
        for keep in grid:
            k = int(round(keep * view.n_neurons))
            dropped = torch.ones_like(h).scatter_(1, order[:, :k], 0.0)
            out.append(F.linear(h * dropped, down).pow(2).sum().item() / max(base, 1e-30))
        return out

    per_layer = collect_mlp_data(model, calibration_ids, errors, progress=progress)
    err = [[sum(c[j] for c in chunks) for j in range(len(grid))] for chunks in per_layer]
    level = [0] * len(err)  # index into grid
    budget = int(round((1 - sparsity - grid[0]) / step * len(err)))
    for _ in range(max(0, budget)):
        gains = [(e[l] - e[l + 1]) if l + 1 < len(grid) else -math.inf
                 for e, l in zip(err, level)]
        best = max(range(len(err)), key=gains.__getitem__)
        if gains[best] == -math.inf:
            break
        level[best] += 1
    return [round(1 - grid[l], 6) for l in level]


def _check_allocate_args(model, predictors, calibration_ids, sparsity, step, max_sparsity,
                         error) -> None:
    where = "fastllm.sparse.allocate_sparsity"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    if predictors is not None and not isinstance(predictors, Predictors):
        raise TypeError(f"{where}: predictors must be a fastllm.sparse.Predictors or None (the "
                        f"oracle's selection), got {type(predictors).__name__}")
    check_token_ids(calibration_ids, "allocate_sparsity")
    if isinstance(sparsity, (list, tuple)):
        raise ValueError(f"{where}: sparsity must be one number in [0, 1] (the average over the "
                         f"layers; the result is the per-layer list), got {sparsity!r}")
    check_sparsity(sparsity, "allocate_sparsity")
    # The grid of keep fractions is step, 2 step, ..., 1: step must divide 1.
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 1 \
            or abs(1 / step - round(1 / step)) > 1e-6:
        raise ValueError(f"{where}: step must be 1/k for an integer k >= 1 (0.05 = 1/20), "
                         f"got {step!r}")
    check_sparsity(max_sparsity, "allocate_sparsity")
    if sparsity > max_sparsity:
        raise ValueError(f"{where}: sparsity {sparsity!r} is above max_sparsity "
                         f"{max_sparsity!r}: no layer may be sparser than max_sparsity")
    _check_choice(where, "error", error, ("relative", "absolute"))


SPARSIFY_MODES = SPARSE_MLP_MODES


def _check_sparsify_args(model, sparsity, mode, selection, batch_sets, dense_above, compute,
                         deterministic, calibration_ids, thresholds, predictors) -> None:
    """Every argument of :func:`sparsify` checked before the model is touched: a sparsity
    outside [0, 1] would otherwise keep a negative or over-full neuron count, silently clamped
    into a dense or an empty MLP."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastllm.sparse.sparsify: model must be an nn.Module, got "
                        f"{type(model).__name__}")
    check_sparsity(sparsity, "sparsify")
    where = "fastllm.sparse.sparsify"
    check_mlp_options(where, mode=mode, batch_sets=batch_sets, dense_above=dense_above,
                      compute=compute, deterministic=deterministic)
    _check_choice(where, "selection", selection, ("topk", "logit"))
    if predictors is not None and not isinstance(predictors, (str, pathlib.Path, Predictors)):
        raise TypeError(f"{where}: predictors must be a fastllm.sparse.Predictors, a path to "
                        f"saved ones, or None, got {type(predictors).__name__}")
    if calibration_ids is not None:
        check_token_ids(calibration_ids, "sparsify")
    n_sites = len(find_mlps(model))
    _per_layer(sparsity, n_sites, "sparsity")
    if thresholds is not None:
        for value in _per_layer(thresholds, n_sites, "thresholds"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{where}: thresholds must be numbers (one per MLP, or one for "
                                f"all), got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{where}: thresholds must be finite, got {value!r}")


def sparsify(model: nn.Module, sparsity=0.5, mode: str = "predictor", predictors=None,
             calibration_ids: Tensor | None = None, *, selection: str = "topk",
             batch_sets: str = "per_row", dense_above: int | None = 1,
             compute: str = "kernel", deterministic: bool = False,
             thresholds: list[float] | None = None, progress: bool | None = None,
             **train_kwargs) -> nn.Module:
    """Swap every MLP for a :class:`SparseMLP` at ``sparsity`` (a float or one per layer).

    ``mode="threshold"`` calibrates per-layer thresholds from ``calibration_ids``;
    ``mode="predictor"`` uses ``predictors`` (a :class:`Predictors` or a path to saved ones) or
    trains them from ``calibration_ids``; ``mode="oracle"`` needs neither. ``selection="topk"``
    keeps ``(1 - sparsity) * n`` neurons per token; ``"logit"`` keeps those with logit > 0.
    Calls with more than ``dense_above`` tokens run dense (default 1: only single-token decode
    steps run sparse; ``None``: never). ``thresholds``
    (per layer) skips the threshold calibration.

    Valid values: ``sparsity`` in [0, 1] (the share of neurons skipped per token; 0.5 keeps
    ``round(0.5 * n)``), a float or a list with one per MLP; ``mode`` in ``"predictor"``,
    ``"threshold"``, ``"oracle"``, ``"dense"``; ``selection`` ``"topk"`` or ``"logit"``;
    ``batch_sets`` ``"per_row"`` or ``"union"``; ``dense_above`` an int >= 0 or ``None``;
    ``compute`` ``"kernel"`` or ``"masked"``. ``calibration_ids`` is a LongTensor ``[batch,
    seq]`` of token ids (a few thousand tokens of ordinary text); ``train_kwargs`` go to
    :func:`train_predictors` (e.g. ``kind``, ``rank``). ``progress`` reports the threshold
    calibration or the predictors' training on stderr: True, False, or None (the default) for
    only when stderr is a terminal.

    Returns ``model``, modified in place (every MLP replaced by a :class:`SparseMLP`; any earlier
    sparsification is undone first); :func:`densify` restores the dense MLPs. Raises
    ``ValueError`` for a missing calibration or an unknown mode, :class:`PredictorMismatchError`
    for predictors made for another model.

    Examples:
        >>> import transformers
        >>> _ = torch.manual_seed(0)
        >>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        ...     vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...     num_attention_heads=4)).eval()
        >>> ids = torch.randint(64, (4, 32))               # calibration token ids
        >>> dense = model(ids).logits
        >>> _ = fastllm.sparse.sparsify(model, 0.5, calibration_ids=ids, progress=False)
        >>> mlp = model.model.layers[0].mlp             # quantized predictors, 50% sparse
        >>> type(mlp).__name__, mlp.mode, mlp.keep, mlp.n_neurons
        ('SparseMLP', 'predictor', 64, 128)
        >>> torch.equal(model(ids).logits, dense)       # prefill (> dense_above tokens) is dense
        True
        >>> step = model(ids[:1, :1]).logits            # a one-token step runs sparse
        >>> mlp.last_density
        0.5
        >>> _ = fastllm.sparse.sparsify(model, 0.0, mode="oracle", dense_above=None)
        >>> torch.allclose(model(ids).logits, dense, atol=1e-5)   # keep everything: dense again
        True
        >>> _ = fastllm.sparse.sparsify(model, 0.3, mode="threshold", calibration_ids=ids,
        ...                             progress=False)
        >>> removed = fastllm.sparse.densify(model)
    """
    _check_sparsify_args(model, sparsity, mode, selection, batch_sets, dense_above, compute,
                         deterministic, calibration_ids, thresholds, predictors)
    check_progress(progress, "fastllm.sparse.sparsify")
    densify(model)
    sites = find_mlps(model)
    targets = _per_layer(sparsity, len(sites), "sparsity")
    preds = None
    if mode == "threshold" and thresholds is not None:
        thresholds = _per_layer(thresholds, len(sites), "thresholds")
    elif mode == "threshold":
        if calibration_ids is None:
            raise ValueError("fastllm.sparse.sparsify: threshold mode needs calibration_ids")
        thresholds = calibrate_thresholds(model, calibration_ids, targets, progress=progress)
    elif mode == "predictor":
        if isinstance(predictors, (str, pathlib.Path)):
            preds = Predictors.load(predictors, model)
        elif isinstance(predictors, Predictors):
            current = _model_identity(model)
            if predictors.identity != current:
                raise PredictorMismatchError(
                    f"predictors were trained for {predictors.identity}, model is {current}")
            preds = predictors
        elif calibration_ids is not None:
            preds = train_predictors(model, calibration_ids, progress=progress, **train_kwargs)
        else:
            raise ValueError("fastllm.sparse.sparsify: predictor mode needs predictors (or a path "
                             "to saved ones) or calibration_ids to train them")
    if mode != "threshold":
        thresholds = [None] * len(sites)
    installed = []
    for i, site in enumerate(sites):
        target = _dense_mlp(site)
        n = (target.up_proj.weight if site.kind == "llama" else target.fc1.weight).shape[0]
        keep = max(0, min(n, int(round((1 - targets[i]) * n))))
        installed.append(SparseMLP(target, mode=mode, keep=keep, threshold=thresholds[i],
                                   predictor=None if preds is None else preds.layers[i],
                                   logit_threshold=0.0 if selection == "logit" else None,
                                   batch_sets=batch_sets, dense_above=dense_above,
                                   compute=compute, deterministic=deterministic))
    # Installed only once every layer's SparseMLP accepted its options (a bad entry in
    # `thresholds` raises above), so a refusal never leaves the model half sparse.
    for site, sparse in zip(sites, installed):
        _install(site, sparse)
    if preds is not None and preds.lookahead:
        for a, b in zip(installed, installed[1:]):
            a.next_layer = b
    return model
