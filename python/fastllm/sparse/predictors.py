"""Deja Vu predictors: trained low-rank, closed-form factored and quantized (int8 / packed int4
gate+up) neuron scorers, their byte costs, and their safetensors files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.sparse_mlp import FactoredPredictor, LowRankPredictor, QuantizedPredictor
from .._optional import require
from .._progress import Progress, check_progress
from ._sites import (_batch_count, _collect, _make_view, _model_identity, check_positive_int,
                     check_token_ids, find_mlps)



class PredictorMismatchError(ValueError):
    """Saved predictors were trained for another model or configuration.

    >>> import transformers
    >>> _ = torch.manual_seed(0)
    >>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    ...     vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...     num_attention_heads=4)).eval()
    >>> ids = torch.randint(64, (4, 32))               # calibration token ids
    >>> fastllm.sparse.quantize_predictors(model, bits=8).save("preds.safetensors")
    >>> other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    ...     vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
    ...     num_attention_heads=4))
    >>> fastllm.sparse.Predictors.load("preds.safetensors", other)
    Traceback (most recent call last):
    fastllm.sparse.predictors.PredictorMismatchError: predictors in preds.safetensors were
    trained for another model (n_neurons: saved 128, model 256); ...
    """


@dataclass

class Predictors:
    """One neuron predictor per MLP (low-rank, factored or quantized: ``kind``) plus what they
    were made for (``identity``: the model's name, type and shapes) and, per layer, ``stats``
    (recall and precision on held-out tokens). Made by :func:`train_predictors` and its kinds;
    :meth:`save` / :meth:`load` keep them in a safetensors file (needs ``safetensors``).

    Examples:
        >>> import transformers
        >>> _ = torch.manual_seed(0)
        >>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        ...     vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...     num_attention_heads=4)).eval()
        >>> ids = torch.randint(64, (4, 32))               # calibration token ids
        >>> preds = fastllm.sparse.train_predictors(model, ids, progress=False)
        >>> preds.kind, len(preds.layers), preds.identity["n_neurons"]
        ('quantized', 2, 128)
        >>> preds.save("preds.safetensors")
        >>> loaded = fastllm.sparse.Predictors.load("preds.safetensors", model)  # checks the model
        >>> x = torch.randn(3, 64)
        >>> torch.equal(loaded.layers[0](x), preds.layers[0](x))
        True
        >>> _ = fastllm.sparse.sparsify(model, 0.5, predictors=loaded)
    """
    layers: nn.ModuleList
    identity: dict
    rank: int
    lookahead: bool = False
    label_share: float = 0.9
    stats: list = field(default_factory=list)  # per layer: recall/precision on held-out tokens
    # "lowrank" (Deja Vu, BCE-trained), "factored" (closed form) or "quantized" (int8 weights;
    # rank is 0, the group size is in the tensors' shapes)
    kind: str = "lowrank"

    def save(self, path) -> None:
        save_file = require("safetensors.torch", "Predictors.save").save_file
        tensors = {f"layers.{i}.{k}": v.detach().contiguous().cpu()
                   for i, layer in enumerate(self.layers) for k, v in layer.state_dict().items()}
        meta = {"fastllm_sparse_predictors": "1", "identity": json.dumps(self.identity),
                "rank": str(self.rank), "lookahead": str(int(self.lookahead)),
                "label_share": repr(self.label_share), "stats": json.dumps(self.stats),
                "kind": self.kind}
        if self.kind == "quantized":
            first = self.layers[0]
            meta["quantized"] = json.dumps({"bits": int(getattr(first, "bits", 8)),
                                            "score": str(getattr(first, "score", "gate_up")),
                                            "input_keep": getattr(first, "input_keep", None)})
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path, model: nn.Module) -> "Predictors":
        """Load predictors saved by :meth:`save`; refuse if they were trained for another model.

        The file is untrusted: safetensors only (no pickle), and a truncated file, missing
        metadata, or a tensor of the wrong name, shape or dtype raises
        :class:`PredictorMismatchError` naming the file and the tensor."""
        safe_open = require("safetensors", "Predictors.load").safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("fastllm_sparse_predictors") != "1":
                    raise PredictorMismatchError(f"{path} holds no fastllm sparse predictors")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except PredictorMismatchError:
            raise
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise PredictorMismatchError(f"cannot read {path} as a safetensors file (truncated "
                                         f"or another format?): {err}") from err
        try:
            saved = json.loads(meta["identity"])
            rank = int(meta["rank"])
            lookahead = bool(int(meta["lookahead"]))
            label_share = float(meta["label_share"])
            stats = json.loads(meta.get("stats", "[]"))
            quant = json.loads(meta.get("quantized", '{"bits": 8, "score": "gate_up"}'))
        except (KeyError, ValueError) as err:
            raise PredictorMismatchError(f"{path}: its metadata is incomplete or malformed "
                                         f"({type(err).__name__}: {err})") from err
        current = _model_identity(model)
        if not isinstance(saved, dict):
            raise PredictorMismatchError(f"{path}: its identity metadata is not a JSON object")
        diffs = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
        if diffs:
            detail = ", ".join(f"{k}: saved {a!r}, model {b!r}" for k, (a, b) in diffs.items())
            raise PredictorMismatchError(
                f"predictors in {path} were trained for another model ({detail}); "
                "train new ones with fastllm.sparse.train_predictors(model, calibration_ids)")
        kind = meta.get("kind", "lowrank")
        activation = _make_view(find_mlps(model)[0]).activation
        n_layers = current["n_layers"]
        states = [{} for _ in range(n_layers)]
        for key, tensor in tensors.items():
            parts = key.split(".", 2)
            if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() \
                    or int(parts[1]) >= n_layers:
                raise PredictorMismatchError(f"{path}: tensor {key!r} is not one of the "
                                             f"predictors of the model's {n_layers} layers")
            states[int(parts[1])][parts[2]] = tensor
        if kind == "quantized":
            layers = nn.ModuleList()
            for i, state in enumerate(states):
                _check_quantized_state(path, i, state, current)
                try:
                    layers.append(QuantizedPredictor.from_state(state, activation, **quant))
                except (KeyError, RuntimeError, ValueError, TypeError) as err:
                    raise PredictorMismatchError(f"{path}: layer {i}'s tensors do not make a "
                                                 f"quantized predictor: {err}") from err
        else:
            try:
                layers = nn.ModuleList(_new_predictor(kind, current["hidden_size"],
                                                      current["n_neurons"], rank, activation)
                                       for _ in states)
            except ValueError as err:
                raise PredictorMismatchError(f"{path}: {err}") from err
            for i, (layer, state) in enumerate(zip(layers, states)):
                _check_state(path, i, state, layer.state_dict())
                layer.load_state_dict(state)
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        layers.to(device=device, dtype=dtype)
        return cls(layers, saved, rank, lookahead, label_share, stats, kind)


def _check_state(path, layer: int, state: dict, expected: dict) -> None:
    """A saved predictor's tensors against a fresh one's: names, shapes and floating dtypes."""
    for key, want in expected.items():
        name = f"layers.{layer}.{key}"
        got = state.get(key)
        if got is None:
            raise PredictorMismatchError(f"{path}: tensor {name!r} is missing")
        if tuple(got.shape) != tuple(want.shape):
            raise PredictorMismatchError(f"{path}: tensor {name!r} has shape {list(got.shape)}, "
                                         f"expected {list(want.shape)}")
        if not got.is_floating_point():
            raise PredictorMismatchError(f"{path}: tensor {name!r} has dtype {got.dtype}, "
                                         "expected a floating dtype")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise PredictorMismatchError(f"{path}: tensor 'layers.{layer}.{extra[0]}' is not part of "
                                     "the predictor")


def _check_quantized_state(path, layer: int, state: dict, current: dict) -> None:
    """The codes of a quantized predictor cover the model's neurons and hidden size."""
    q = state.get("q_up")
    if q is None or q.dim() != 2:
        raise PredictorMismatchError(f"{path}: tensor 'layers.{layer}.q_up' is missing or not "
                                     "2-D")
    d = q.shape[1] * (2 if q.dtype == torch.uint8 else 1)
    if (q.shape[0], d) != (current["n_neurons"], current["hidden_size"]):
        raise PredictorMismatchError(
            f"{path}: tensor 'layers.{layer}.q_up' codes {q.shape[0]} neurons x {d} inputs, the "
            f"model has {current['n_neurons']} x {current['hidden_size']}")
    for key, tensor in state.items():
        if key.endswith(("scale", "norm")) or key.startswith("b_") or key == "offset":
            if not tensor.is_floating_point():
                raise PredictorMismatchError(f"{path}: tensor 'layers.{layer}.{key}' has dtype "
                                             f"{tensor.dtype}, expected a floating dtype")


def _new_predictor(kind: str, d: int, n: int, rank: int, activation: str) -> nn.Module:
    if kind == "factored":
        return FactoredPredictor(d, n, rank, activation)
    if kind == "lowrank":
        return LowRankPredictor(d, n, rank)
    raise ValueError(f"fastllm.sparse: unknown predictor kind {kind!r} (expected 'factored', "
                     "'quantized' or 'lowrank')")


PREDICTOR_KINDS = ("factored", "lowrank", "quantized")


def _check_bool(value, where: str, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"fastllm.sparse.{where}: {name} must be a bool, got {value!r}")


def predictor_cost(kind: str, d: int, n: int, rank: int, gated: bool = True) -> float:
    """Multiply-adds of one predictor call as a share of the dense MLP's (``3dn`` gated, ``2dn``
    plain). For ``"quantized"`` (``rank`` unused) they are the gate and up projections' own;
    what it saves is bytes (int8), see :class:`~fastllm.nn.QuantizedPredictor`.

    SmolLM2's MLP (d 576, n 1536):

    >>> round(fastllm.sparse.predictor_cost("factored", 576, 1536, rank=64), 3)
    0.088
    >>> round(fastllm.sparse.predictor_cost("quantized", 576, 1536, rank=0), 3)   # gate + up
    0.667
    """
    if kind not in PREDICTOR_KINDS:
        raise ValueError(f"fastllm.sparse.predictor_cost: kind must be one of "
                         f"{', '.join(repr(k) for k in PREDICTOR_KINDS)}, got {kind!r}")
    check_positive_int(d, "predictor_cost", "d")
    check_positive_int(n, "predictor_cost", "n")
    # The quantized predictor has no rank; the low-rank ones need one.
    check_positive_int(rank, "predictor_cost", "rank", minimum=0 if kind == "quantized" else 1)
    _check_bool(gated, "predictor_cost", "gated")
    if kind == "quantized":
        per_token = (2 if gated else 1) * d * n
    else:
        per_token = rank * (d + 2 * n) if kind == "factored" else rank * (d + n)
    return per_token / ((3 if gated else 2) * d * n)


def predictor_bytes_share(d: int, n: int, *, bits: int = 8, score: str = "gate_up",
                          group: int = 64, weight_bytes: float = 2.0, gated: bool = True,
                          as_stored: bool = False, input_keep: float | None = None) -> float:
    """Bytes a :class:`~fastllm.nn.QuantizedPredictor` reads per call, as a share of the dense
    MLP's weight bytes (``3dn`` gated, ``2dn`` plain, at ``weight_bytes`` per weight: 2 for
    fp16/bf16, 4 for fp32). Each quantized weight costs ``bits / 8`` (int8, or int4 packed two
    per byte, as stored and read by the op) plus ``4 / group`` for its fp32 scale;
    ``score="gate_up"`` quantizes ``2dn`` weights (``dn`` for a plain MLP), ``"gate"`` ``dn``.

    ``input_keep`` scales it by the share of input columns read, what a column-gather kernel
    (not written) would read; ``as_stored=True`` ignores it: today's op reads every column.

    SmolLM2 (d 576, n 1536), fp16: int8 gate+up (group 64) 0.354, int4 gate+up (group 32)
    0.208, int8 gate 0.177, int4 gate 0.104; halve them for fp32. The rows a sparse call then
    reads add ``1 - sparsity`` (gate, up and down rows of the kept neurons).

    >>> share = fastllm.sparse.predictor_bytes_share
    >>> round(share(576, 1536, bits=8), 3), round(share(576, 1536, bits=4, group=32), 3)
    (0.354, 0.208)
    >>> predictor = fastllm.nn.QuantizedPredictor.from_weights(
    ...     torch.randn(128, 64), torch.randn(128, 64), bits=8)     # up, gate of a 64 x 128 MLP
    >>> share(64, 128, bits=8, weight_bytes=4) == predictor.weight_bytes() / (3 * 64 * 128 * 4)
    True
    """
    if isinstance(bits, bool) or bits not in (8, 4):
        raise ValueError(f"fastllm.sparse.predictor_bytes_share: bits must be 8 or 4 (the widths "
                         f"QuantizedPredictor stores), got {bits!r}")
    if score not in ("gate_up", "gate"):
        raise ValueError(f"fastllm.sparse.predictor_bytes_share: score must be 'gate_up' or "
                         f"'gate', got {score!r}")
    check_positive_int(d, "predictor_bytes_share", "d")
    check_positive_int(n, "predictor_bytes_share", "n")
    check_positive_int(group, "predictor_bytes_share", "group")
    _check_bool(gated, "predictor_bytes_share", "gated")
    _check_bool(as_stored, "predictor_bytes_share", "as_stored")
    if isinstance(weight_bytes, bool) or not isinstance(weight_bytes, (int, float)) \
            or not weight_bytes > 0:
        raise ValueError(f"fastllm.sparse.predictor_bytes_share: weight_bytes must be a number "
                         f"> 0 (2 for fp16/bf16, 4 for fp32), got {weight_bytes!r}")
    if input_keep is not None and (isinstance(input_keep, bool)
                                   or not isinstance(input_keep, (int, float))
                                   or not 0 < input_keep <= 1):
        raise ValueError(f"fastllm.sparse.predictor_bytes_share: input_keep must be None or a "
                         f"number in (0, 1], got {input_keep!r}")
    if score == "gate" and not gated:
        raise ValueError("fastllm.sparse.predictor_bytes_share: score='gate' needs a gated MLP")
    per_weight = bits / 8 + 4 / group
    quantized = (2 if gated and score == "gate_up" else 1) * d * n
    if not as_stored and input_keep is not None:
        per_weight *= input_keep
    return quantized * per_weight / ((3 if gated else 2) * d * n * weight_bytes)

# Per weight dtype: (bits, score) of the default quantized predictor, chosen by
# bench/sparse_budget_study.py (SmolLM2, held-out text): the selection with the best estimated
# speed-up (bytes model: dense MLP bytes / (predictor bytes + kept rows' bytes)) at <= +5%
# perplexity at 50% sparsity, with the bytes the op reads from the storage. int4 gate+up (group
# 32, packed two per byte; +4.8% on 768 and on 2048 held-out tokens) wins for every dtype: 1.41x
# fp16 and 1.66x fp32 against int8 gate+up's 1.17x / 1.48x (+3.4%); gate-only scores, input
# channel sparsity (no column-gather kernel: no bytes saved as stored) and the threshold mode miss
# +5% by far. The margin is thin (the oracle itself costs +4.5%), and int4's top-k recall (0.92)
# is below int8's (0.995): bits=8 stays the choice where quality matters more than bytes.

_QUANTIZED_DEFAULTS = {torch.float32: (4, "gate_up"), torch.float16: (4, "gate_up"),
                       torch.bfloat16: (4, "gate_up")}


def default_quantized_selection(dtype: torch.dtype) -> tuple[int, str]:
    """``(bits, score)`` of the default :class:`~fastllm.nn.QuantizedPredictor` for a model whose
    weights are ``dtype`` (see :func:`quantize_predictors`); other dtypes get the fp32 choice.
    A model whose ``d_model`` is not a multiple of 32 (no whole packed-int4 words) gets 8 bits.

    >>> fastllm.sparse.default_quantized_selection(torch.float16)
    (4, 'gate_up')
    """
    return _QUANTIZED_DEFAULTS.get(dtype, _QUANTIZED_DEFAULTS[torch.float32])


def default_rank(kind: str, d: int, n: int, gated: bool = True, max_cost: float = 0.15) -> int:
    """The largest rank (a multiple of 8, at least 8) whose predictor costs at most ``max_cost``
    of the MLP.

    >>> rank = fastllm.sparse.default_rank("factored", 576, 1536)
    >>> rank, fastllm.sparse.predictor_cost("factored", 576, 1536, rank) <= 0.15
    (104, True)
    """
    if isinstance(max_cost, bool) or not isinstance(max_cost, (int, float)) or not max_cost > 0:
        raise ValueError(f"fastllm.sparse.default_rank: max_cost must be a number > 0 (a share "
                         f"of the MLP's multiply-adds), got {max_cost!r}")
    per_rank = predictor_cost(kind, d, n, 1, gated)
    return max(8, int(max_cost / per_rank) // 8 * 8)


def share_labels(h_abs: Tensor, share: float) -> Tensor:
    """Per row, the smallest set of neurons whose |h| sums to at least ``share`` of the row's."""
    values, order = h_abs.sort(dim=-1, descending=True)
    csum = values.cumsum(-1)
    total = csum[..., -1:].clamp_min(1e-30)
    # Keep a neuron if the mass before it is still short of the share.
    keep_sorted = (csum - values) < share * total
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def _steps(items, bar: Progress):
    """``items``, one progress step each."""
    for item in items:
        yield item
        bar.update()


def train_predictors(model: nn.Module, calibration_ids: Tensor, *, kind: str = "auto",
                     rank: int | None = None, max_cost: float = 0.15, label_share: float = 0.9,
                     heldout: float = 0.1, lookahead: bool = False, eval_sparsity: float = 0.5,
                     layers: list[int] | None = None, progress: bool | None = None, seed: int = 0,
                     weighting: bool = False, ridge: float = 1e-3, batch_size: int = 8,
                     epochs: int = 20, lr: float = 1e-3, batch_tokens: int = 256,
                     magnitude_weight: float = 0.0, init: str = "random",
                     group: int | None = None, bits: int | None = None,
                     score: str | None = None, input_keep: float | None = None) -> Predictors:
    """Fit one neuron predictor per MLP from the dense model's activations on ``calibration_ids``.

    ``kind="auto"`` takes ``"quantized"`` for gated MLPs (``"factored"`` with ``lookahead``, which
    the quantized form has not, or when ``d`` is not a multiple of 16) and ``"lowrank"`` for
    ReLU/plain MLPs. Why a quantized copy for gated MLPs: on SmolLM2 int8 ranks neurons like the
    oracle (top-k recall 0.995 at 50%) and the default int4 (fewer bytes) reaches 0.92, where the
    factored predictor at its default cost reaches 0.72.
    ``kind="factored"`` (gated MLPs) fits a
    :class:`~fastllm.nn.FactoredPredictor` in closed form, see :func:`fit_factored_predictors`;
    ``kind="quantized"`` needs no fit: a quantized copy of each MLP's gate and up weights (or
    gate only), one scale per ``group`` input columns (:class:`~fastllm.nn.QuantizedPredictor`,
    :func:`quantize_predictors`; ``bits`` and ``score`` pick the width and what is scored, by
    default per weight dtype); the calibration tokens only set the offsets and the stats.
    ``kind="lowrank"`` (the default for ReLU/plain MLPs, Deja Vu's predictor) trains
    ``Linear(d, rank) -> Linear(rank, n)`` logits with weighted BCE (``label_share``,
    ``epochs``, ``lr``, ``batch_tokens``, ``magnitude_weight``, ``init`` apply to it).
    ``rank=None`` takes the largest rank whose predictor costs at most ``max_cost`` of the MLP's
    multiply-adds (:func:`default_rank`). ``heldout`` of the tokens are kept out of the fit and
    give, per layer, ``Predictors.stats``: recall/precision of ``logit > 0`` against the labels
    (the neurons carrying ``label_share`` of ``|h|``; ``h > 0`` for ReLU) and
    ``topk_recall_vs_oracle@<eval_sparsity>``, the share of the oracle's top-k by ``|h|`` that the
    predictor's top-k finds. With ``lookahead`` the predictor of layer l (l >= 1) reads layer
    l-1's MLP input. ``layers`` restricts the fit to some layers (others stay untrained).
    ``progress``: report the dense passes and the layers on stderr (True, False, or None: only
    when stderr is a terminal).

    Examples:
        With a real model, ``ids`` are a few thousand tokens of ordinary text
        (``tokenizer(texts, return_tensors="pt", padding=True).input_ids``). Here random ids:

        >>> import transformers
        >>> _ = torch.manual_seed(0)
        >>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        ...     vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...     num_attention_heads=4)).eval()
        >>> ids = torch.randint(64, (4, 32))               # calibration token ids
        >>> preds = fastllm.sparse.train_predictors(model, ids, progress=False)
        >>> preds.kind, type(preds.layers[0]).__name__    # gated MLPs: a quantized copy
        ('quantized', 'QuantizedPredictor')
        >>> preds.stats[0]["topk_recall_vs_oracle@0.5"] > 0.8
        True
        >>> relu = fastllm.sparse.train_predictors(model, ids, kind="lowrank", rank=8, epochs=2,
        ...                                        progress=False)
        >>> type(relu.layers[0]).__name__, relu.rank
        ('LowRankPredictor', 8)
        >>> _ = fastllm.sparse.sparsify(model, 0.5, predictors=preds)
    """
    check_progress(progress, "fastllm.sparse.train_predictors")  # before any work
    check_token_ids(calibration_ids, "train_predictors")
    sites = find_mlps(model)
    first = _make_view(sites[0])
    if kind == "auto":
        if first.kind != "gated":
            kind = "lowrank"
        elif lookahead or first.up_w.shape[1] % 16:
            kind = "factored"
        else:
            kind = "quantized"
    if kind == "factored" and first.kind != "gated":
        raise ValueError("fastllm.sparse.train_predictors: kind='factored' needs a gated MLP "
                         "(gate/up/down); use kind='lowrank' for ReLU/plain MLPs")
    if kind == "quantized":
        if lookahead:
            raise ValueError("fastllm.sparse.train_predictors: kind='quantized' scores a layer from "
                             "its own weights and input, so it has no lookahead form; use "
                             "kind='factored' for lookahead")
        return quantize_predictors(model, calibration_ids, group=group, bits=bits, score=score,
                                   input_keep=input_keep, label_share=label_share,
                                   eval_sparsity=eval_sparsity, layers=layers, progress=progress,
                                   batch_size=batch_size)
    if rank is None:
        rank = default_rank(kind, first.up_w.shape[1], first.n_neurons,
                            first.kind == "gated", max_cost)
    if kind == "factored":
        return fit_factored_predictors(model, calibration_ids, rank=rank,
                                       label_share=label_share, heldout=heldout,
                                       lookahead=lookahead, eval_sparsity=eval_sparsity,
                                       layers=layers, progress=progress, seed=seed,
                                       weighting=weighting, ridge=ridge, batch_size=batch_size)
    if kind != "lowrank":
        _new_predictor(kind, 1, 1, 1, "silu")  # raises the unknown-kind error
    return _train_lowrank(model, calibration_ids, rank=rank, label_share=label_share,
                          epochs=epochs, lr=lr, batch_tokens=batch_tokens, heldout=heldout,
                          lookahead=lookahead, eval_sparsity=eval_sparsity, layers=layers,
                          magnitude_weight=magnitude_weight, init=init, progress=progress,
                          seed=seed)


def _held_stats(logits: Tensor, h_abs: Tensor, labels: Tensor, eval_sparsity: float) -> dict:
    n = h_abs.shape[1]
    keep = max(1, int(round((1 - eval_sparsity) * n)))
    chosen, truth = logits > 0, labels.bool()
    tp = (chosen & truth).sum().item()
    top_pred = logits.topk(keep, dim=-1).indices
    top_oracle = h_abs.topk(keep, dim=-1).indices
    hit = torch.zeros_like(truth).scatter_(1, top_oracle, True).gather(1, top_pred)
    return {"recall": tp / max(1, truth.sum().item()),
            "precision": tp / max(1, chosen.sum().item()),
            "label_density": truth.float().mean().item(),
            f"topk_recall_vs_oracle@{eval_sparsity:g}": hit.float().mean().item()}


@torch.no_grad()

def fit_factored_predictors(model: nn.Module, calibration_ids: Tensor, *, rank: int,
                            label_share: float = 0.9, heldout: float = 0.1,
                            lookahead: bool = False, eval_sparsity: float = 0.5,
                            layers: list[int] | None = None, progress: bool | None = None,
                            seed: int = 0, weighting: bool = False, ridge: float = 1e-3,
                            batch_size: int = 8, offset_tokens: int = 4096) -> Predictors:
    """Closed-form :class:`~fastllm.nn.FactoredPredictor` per gated MLP (reduced-rank regression).

    The predictor estimates the stacked pre-activations ``y = [gate; up] = W x`` (``W`` is
    ``2n x d``) through a rank-``rank`` map. One pass over the calibration tokens accumulates,
    per layer, the input second moment ``C = E[x x^T]`` (and ``E[x_{l-1} x_l^T]`` for
    lookahead), so any number of tokens costs ``O(d^2)`` memory per layer, no stored activations.
    The rank-r map minimising ``E||D (y - y_hat)||^2`` is ``B D V_r V_r^T D^-1``, with ``B`` the
    least-squares map (``W^T``, or ``C^-1 E[x_{l-1} x_l^T] W^T`` for lookahead) and ``V_r`` the
    top right singular vectors of ``chol(C)^T B D``. ``D`` (``weighting=True``) weights each
    output by how much its error moves ``h = act(gate) * up`` to first order: the gate row by
    ``rms(act'(gate) * up)``, the up row by ``rms(act(gate))`` (on SmolLM2 this changed top-k
    recall by < 0.002, so it is off by default). ``ridge`` adds
    ``ridge * mean(diag C)`` to ``C``. The per-layer offset makes ``logit > 0`` keep the
    ``1 - eval_sparsity`` share of neurons on (up to ``offset_tokens``) training tokens.

    >>> import transformers
    >>> _ = torch.manual_seed(0)
    >>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    ...     vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...     num_attention_heads=4)).eval()
    >>> ids = torch.randint(64, (4, 32))               # calibration token ids
    >>> preds = fastllm.sparse.fit_factored_predictors(model, ids, rank=16, progress=False)
    >>> preds.kind, type(preds.layers[0]).__name__, preds.rank
    ('factored', 'FactoredPredictor', 16)
    >>> again = fastllm.sparse.train_predictors(model, ids, kind="factored", rank=16,
    ...                                         progress=False)     # the same fit
    >>> x = torch.randn(2, 64)
    >>> torch.allclose(again.layers[1](x), preds.layers[1](x))
    True
    """
    show = check_progress(progress, "fastllm.sparse.fit_factored_predictors")
    check_token_ids(calibration_ids, "fit_factored_predictors")
    sites = find_mlps(model)
    views = [_make_view(s) for s in sites]
    n_layers = len(sites)
    which = list(range(n_layers)) if layers is None else list(layers)
    src_of = {i: (i - 1 if lookahead and i > 0 else i) for i in which}
    sources = set(src_of.values())
    d, n = views[0].up_w.shape[1], views[0].n_neurons
    gen = torch.Generator().manual_seed(seed)
    n_tokens = calibration_ids.numel()
    is_held = torch.zeros(n_tokens, dtype=torch.bool)
    is_held[torch.randperm(n_tokens, generator=gen)[:max(1, int(round(heldout * n_tokens)))]] = True
    if heldout <= 0:
        is_held.zero_()

    acc = torch.float64
    second = {i: torch.zeros(d, d, dtype=acc) for i in sources}
    cross = {i: torch.zeros(d, d, dtype=acc) for i in which if src_of[i] != i}
    w_sums = {i: torch.zeros(2 * n, dtype=acc) for i in which}
    counts = dict.fromkeys(range(n_layers), 0)
    position = dict.fromkeys(range(n_layers), 0)
    last_x: dict = {}
    held_x = {i: [] for i in range(n_layers)}
    train_x = {i: [] for i in range(n_layers)}
    kept_train = dict.fromkeys(range(n_layers), 0)

    def accumulate(i, view, x):
        rows = x.shape[0]
        mask = is_held[position[i]:position[i] + rows].to(x.device)
        position[i] += rows
        needed = i in sources or i in which
        if not needed:
            return None
        xf = x.float()
        xt = xf[~mask]
        if i in sources:
            second[i] += (xt.t() @ xt).to(acc).cpu()
            counts[i] += xt.shape[0]
        if i in which:
            if i in cross:
                prev = last_x[i - 1][~mask]
                cross[i] += (prev.t() @ xt).to(acc).cpu()
        if i in which and weighting:
            pre_g = F.linear(xt, view.gate_w.float(),
                             None if view.gate_b is None else view.gate_b.float())
            up = F.linear(xt, view.up_w.float(), None if view.up_b is None else view.up_b.float())
            eps = 1e-3
            slope = (view._act(pre_g + eps) - view._act(pre_g - eps)) / (2 * eps)
            w_sums[i] += torch.cat([(slope * up).pow(2).sum(0),
                                    view._act(pre_g).pow(2).sum(0)]).to(acc).cpu()
        held_x[i].append(xf[mask].to(torch.bfloat16).cpu())
        if kept_train[i] < offset_tokens:
            take = xt[:offset_tokens - kept_train[i]]
            train_x[i].append(take.to(torch.bfloat16).cpu())
            kept_train[i] += take.shape[0]
        last_x[i] = xf
        return None

    steps = _batch_count(calibration_ids, batch_size) + len(which)
    with Progress(steps, "fitting predictors", show) as bar:
        _collect(model, calibration_ids, accumulate, batch_size, bar)
        device = next(model.parameters()).device
        model_dtype = next(model.parameters()).dtype
        predictors = nn.ModuleList(FactoredPredictor(d, n, rank, views[0].activation)
                                   for _ in range(n_layers))
        stats = []
        for i in _steps(which, bar):
            view, src = views[i], src_of[i]
            w = torch.cat([view.gate_w, view.up_w]).detach().to(acc).cpu()       # [2n, d]
            c_ss = second[src] / max(1, counts[src])
            c_ss += ridge * c_ss.diagonal().mean() * torch.eye(d, dtype=acc)
            if src == i:
                least_squares = w.t()                                             # [d, 2n]
            else:
                least_squares = torch.linalg.solve(c_ss, cross[i] / max(1, counts[src])) @ w.t()
            weight = (w_sums[i] / max(1, counts[i])).sqrt().clamp_min(1e-6) if weighting \
                else torch.ones(2 * n, dtype=acc)
            chol = torch.linalg.cholesky(c_ss)
            _, _, vh = torch.linalg.svd(chol.t() @ least_squares * weight, full_matrices=False)
            v = vh[:rank].t()                                                     # [2n, r]
            pred = predictors[i]
            pred.down.weight.copy_((least_squares @ (weight[:, None] * v)).t())
            pred.up.weight.copy_(v / weight[:, None])
            biases = [torch.zeros(n) if b is None else b.detach().float().cpu()
                      for b in (view.gate_b, view.up_b)]
            pred.up.bias.copy_(torch.cat(biases))
            # Offset: logit > 0 keeps about `keep` neurons per token on training tokens.
            sample = torch.cat(train_x[src]).float() if train_x[src] else torch.zeros(0, d)
            if sample.shape[0]:
                scores = pred(sample)
                pred.offset.fill_(scores.flatten().kthvalue(
                    max(1, int(round(eval_sparsity * scores.numel())))).values.item())
            if held_x[i] and sum(t.shape[0] for t in held_x[i]):
                xs = torch.cat(held_x[src]).float()
                h = view.dense_hidden(torch.cat(held_x[i]).to(device=device, dtype=model_dtype))
                h_abs = h.float().abs().cpu()
                stats.append({"layer": i, **_held_stats(pred(xs), h_abs,
                                                         share_labels(h_abs, label_share),
                                                         eval_sparsity)})
        predictors.to(device=device, dtype=model_dtype)
        return Predictors(predictors, _model_identity(model), rank, lookahead, label_share, stats,
                          "factored")


@torch.no_grad()

def quantize_predictors(model: nn.Module, calibration_ids: Tensor | None = None, *,
                        group: int | None = None, bits: int | None = None,
                        score: str | None = None, impl: str = "op",
                        input_keep: float | None = None, label_share: float = 0.9,
                        eval_sparsity: float = 0.5,
                        layers: list[int] | None = None, progress: bool | None = None,
                        batch_size: int = 8, sample_tokens: int = 2048) -> Predictors:
    """One :class:`~fastllm.nn.QuantizedPredictor` per MLP: quantized gate and up weights (or gate
    only), one fp32 scale per ``group`` input columns. Nothing is fitted.

    ``bits``: 8 or 4. ``score``: ``"gate_up"`` ranks by ``|act(g) * u|`` (plain MLPs:
    ``|act(fc1)|``), ``"gate"`` (gated MLPs only, CATS-style) by ``|act(g)|`` from the gate rows
    alone, half the predictor's bytes. ``bits=None`` / ``score=None`` take the default for the
    model's weight dtype, :func:`default_quantized_selection` (chosen by
    ``bench/sparse_budget_study.py``: best bytes-model speed-up at <= +5% held-out perplexity at
    50% on SmolLM2; 8 bits where ``d`` is not a multiple of 32); plain MLPs always score
    ``"gate_up"``. 4 bits are stored packed two per byte, so ``bits=4`` needs ``d`` to be a
    multiple of 32. ``group=None``: 64 for 8 bits, 32 for 4 bits, or the next of 32/16 that
    divides ``d``. ``impl="torch"`` scores in PyTorch
    (dequantized) instead of the compiled op. ``input_keep`` (WINA-style, in (0, 1]): each
    token is scored from its top ``input_keep`` share of input channels by ``|x_i| ||W[:, i]||``
    (see :class:`~fastllm.nn.QuantizedPredictor`; a bytes saving only with a column-gather
    kernel, which is not written). Bytes: :func:`predictor_bytes_share`. With ``calibration_ids``, one dense pass keeps up to ``sample_tokens`` MLP inputs
    per layer, which set the offset (``logit > 0`` keeps the
    ``1 - eval_sparsity`` share) and give ``Predictors.stats`` on those tokens (the predictor was
    not trained on them, but the offset was set on them). ``layers`` restricts which MLPs get a
    predictor (the others keep an all-zero one, which scores every neuron 0).

    >>> import transformers
    >>> _ = torch.manual_seed(0)
    >>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    ...     vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...     num_attention_heads=4)).eval()
    >>> ids = torch.randint(64, (4, 32))               # calibration token ids
    >>> preds = fastllm.sparse.quantize_predictors(model, ids, bits=8, progress=False)
    >>> preds.layers[0]
    QuantizedPredictor(n_neurons=128, bits=8, group=64, score=gate_up, activation=silu, impl=op)
    >>> sorted(preds.stats[0])
    [...'topk_recall_vs_oracle@0.5'...]
    >>> round(fastllm.sparse.predictor_bytes_share(64, 128, bits=8, weight_bytes=4), 4)  # fp32
    0.1771
    >>> _ = fastllm.sparse.sparsify(model, 0.5, predictors=preds)
    """
    show = check_progress(progress, "fastllm.sparse.quantize_predictors")
    if calibration_ids is not None:
        check_token_ids(calibration_ids, "quantize_predictors")
    sites = find_mlps(model)
    views = [_make_view(s) for s in sites]
    which = list(range(len(sites))) if layers is None else list(layers)
    first = views[0]
    d, n = first.up_w.shape[1], first.n_neurons
    gated, bias = first.kind == "gated", first.up_b is not None
    default_bits, default_score = default_quantized_selection(first.up_w.dtype)
    if default_bits == 4 and d % 32:
        default_bits = 8  # packed int4 needs whole 16-byte words (32 columns) per row
    bits = default_bits if bits is None else bits
    score = (default_score if gated else "gate_up") if score is None else score
    if bits not in (8, 4) or isinstance(bits, bool):
        raise ValueError(f"fastllm.sparse.quantize_predictors: bits must be 8 or 4, got {bits!r}")
    if score not in ("gate_up", "gate"):
        raise ValueError(f"fastllm.sparse.quantize_predictors: score must be 'gate_up' or 'gate', "
                         f"got {score!r}")
    if score == "gate" and not gated:
        raise ValueError("fastllm.sparse.quantize_predictors: score='gate' needs a gated MLP "
                         "(gate/up/down); a plain MLP is scored by |act(fc1)| (score='gate_up')")
    if input_keep is not None and (isinstance(input_keep, bool) or not isinstance(
            input_keep, (int, float)) or not 0 < input_keep <= 1):
        raise ValueError(f"fastllm.sparse.quantize_predictors: input_keep must be None or in "
                         f"(0, 1], got {input_keep!r}")
    if impl not in ("op", "torch"):
        raise ValueError(f"fastllm.sparse.quantize_predictors: impl must be 'op' or 'torch', "
                         f"got {impl!r}")
    if group is None:
        group = next((g for g in ((64, 32, 16) if bits == 8 else (32, 16)) if d % g == 0), None)
        if group is None:
            raise ValueError(f"fastllm.sparse: the quantized predictor needs d_model ({d}) to be "
                             "a multiple of 16; use kind='factored' or kind='lowrank'")
    with_gate = gated and score == "gate_up"
    predictors = nn.ModuleList(QuantizedPredictor(d, n, group, first.activation, with_gate, bias,
                                                  bits=bits, score=score, impl=impl,
                                                  input_keep=input_keep)
                               for _ in sites)
    # Quantizing is quick; with calibration_ids the dense pass and each layer's stats dominate.
    steps = len(which) + (_batch_count(calibration_ids, batch_size) + len(which)
                          if calibration_ids is not None else 0)
    with Progress(steps, "quantizing predictors", show) as bar:
        for i in _steps(which, bar):
            v = views[i]
            predictors[i] = QuantizedPredictor.from_weights(v.up_w, v.gate_w, v.up_b, v.gate_b,
                                                            v.activation, group, bits=bits,
                                                            score=score, impl=impl,
                                                            input_keep=input_keep)
        stats = []
        if calibration_ids is not None:
            samples = {i: [] for i in which}
            kept = dict.fromkeys(which, 0)

            def keep_inputs(i, view, x):
                if i in samples and kept[i] < sample_tokens:
                    take = x[:sample_tokens - kept[i]].detach()
                    samples[i].append(take)
                    kept[i] += take.shape[0]
            _collect(model, calibration_ids, keep_inputs, batch_size, bar)
            for i in _steps(which, bar):
                x = torch.cat(samples[i])
                pred = predictors[i]
                scores = pred(x).float()
                pred.offset.fill_(scores.flatten().kthvalue(
                    max(1, int(round(eval_sparsity * scores.numel())))).values.item())
                h_abs = views[i].dense_hidden(x).float().abs().cpu()
                stats.append({"layer": i, **_held_stats((scores - pred.offset).cpu(), h_abs,
                                                         share_labels(h_abs, label_share),
                                                         eval_sparsity)})
        return Predictors(predictors, _model_identity(model), 0, False, label_share, stats,
                          "quantized")


def _train_lowrank(model: nn.Module, calibration_ids: Tensor, *, rank: int,
                   label_share: float = 0.9, epochs: int = 20, lr: float = 1e-3,
                   batch_tokens: int = 256, heldout: float = 0.1, lookahead: bool = False,
                   eval_sparsity: float = 0.5, layers: list[int] | None = None,
                   magnitude_weight: float = 0.0, init: str = "random", progress: bool | None = None,
                   seed: int = 0) -> Predictors:
    """Train one ``Linear(d, rank) -> Linear(rank, n)`` predictor per MLP from dense activations.

    Labels: ``act > 0`` for ReLU models; for SiLU-gated models the neurons carrying
    ``label_share`` of the row's ``|silu(gate) * up|`` mass. Loss: BCE with positives weighted by
    the negative/positive ratio (Deja Vu). ``heldout`` of the tokens are kept out of training and
    give, per layer, recall/precision against the labels (logit > 0) and the recall of top-k
    selection against the oracle top-k by ``|h|`` at ``eval_sparsity``, in ``Predictors.stats``.
    With ``lookahead`` the predictor of layer l (l >= 1) learns from layer l-1's MLP input.
    ``layers`` restricts training to some layers (others get untrained predictors; for tests).
    ``init="svd"`` starts each predictor from the rank-``rank`` SVD of the gate (fc1 for ReLU
    models) weight, so its logits begin as an approximation of the gate's pre-activation, which
    orders neurons much as ``|act(gate)|`` does; ``"random"`` (default) starts from nn.Linear's
    init. On SmolLM2 (4 layers, 1024 tokens, 5 epochs) SVD init did not raise top-k recall.
    ``magnitude_weight`` > 0 also weights each (token, neuron) term by
    ``1 + magnitude_weight * |h| / mean(|h|)`` of its row, so that missing a neuron with a large
    activation costs more than missing a small one.
    """
    show = check_progress(progress, "fastllm.sparse.train_predictors")
    model_dtype = next(model.parameters()).dtype

    n_layers = len(find_mlps(model))
    which = list(range(n_layers)) if layers is None else list(layers)
    needed = set(which) | ({i - 1 for i in which if i > 0} if lookahead else set())

    def capture(i, view, x):
        if i not in needed:
            return None
        h = view.dense_hidden(x).float()
        labels = h > 0 if view.activation == "relu" else share_labels(h.abs(), label_share)
        return x.float().cpu(), labels.cpu(), h.abs().to(torch.bfloat16).cpu()

    steps = _batch_count(calibration_ids, 4) + len(which)
    with Progress(steps, "training predictors", show) as bar:
        data = _collect(model, calibration_ids, capture, 4, bar)
        identity = _model_identity(model)
        d, n = identity["hidden_size"], identity["n_neurons"]
        gen = torch.Generator().manual_seed(seed)
        n_tokens = sum(x.shape[0] for x, _, _ in data[which[0]])
        perm = torch.randperm(n_tokens, generator=gen)
        n_held = max(1, int(round(heldout * n_tokens)))
        held, train = perm[:n_held], perm[n_held:]
        torch.manual_seed(seed)
        predictors = nn.ModuleList(LowRankPredictor(d, n, rank) for _ in data)
        if init == "svd":
            with torch.no_grad():
                for pred, site in zip(predictors, find_mlps(model)):
                    view = _make_view(site)
                    w = (view.gate_w if view.kind == "gated" else view.up_w).detach().float().cpu()
                    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
                    r = min(rank, sv.numel())
                    pred.down.weight.zero_()[:r] = vh[:r]
                    pred.up.weight.zero_()[:, :r] = u[:, :r] * sv[:r]
        elif init != "random":
            raise ValueError(f"fastllm.sparse.train_predictors: init must be 'svd' or 'random', got {init!r}")
        stats = []
        for i in _steps(which, bar):
            src = i - 1 if lookahead and i > 0 else i
            x = torch.cat([t[0] for t in data[src]])
            y = torch.cat([t[1] for t in data[i]]).float()
            h_abs = torch.cat([t[2] for t in data[i]]).float()
            pred = predictors[i]
            pos = y[train].mean().clamp(1e-4, 1 - 1e-4)
            pos_weight = ((1 - pos) / pos).expand(n)
            opt = torch.optim.AdamW(pred.parameters(), lr=lr)
            for _ in range(epochs):
                order = train[torch.randperm(train.numel(), generator=gen)]
                for start in range(0, order.numel(), batch_tokens):
                    b = order[start:start + batch_tokens]
                    weight = None
                    if magnitude_weight > 0:
                        hb = h_abs[b]
                        weight = 1 + magnitude_weight * hb / hb.mean(dim=1, keepdim=True).clamp_min(1e-12)
                    loss = F.binary_cross_entropy_with_logits(pred(x[b]), y[b], weight=weight,
                                                              pos_weight=pos_weight)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            with torch.no_grad():
                stats.append({"layer": i, **_held_stats(pred(x[held]), h_abs[held], y[held],
                                                        eval_sparsity)})
        device = next(model.parameters()).device
        predictors.to(device=device, dtype=model_dtype)
        return Predictors(predictors, identity, rank, lookahead, label_share, stats, "lowrank")
