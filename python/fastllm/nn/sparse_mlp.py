"""SparseMLP: a drop-in replacement for a transformer MLP that reads only the active neurons.

Wraps either a Llama-family MLP (``gate_proj``, ``up_proj``, ``down_proj``, SiLU-gated) or an OPT
decoder layer's ``fc1`` / ``fc2`` pair (ReLU). The original weights are shared, not copied, except
the down projection, which is also kept transposed (``[n_neurons, d_out]`` contiguous) so that each
active neuron's down weights are one contiguous row. The wrapped module is kept, so
:func:`fastllm.sparse.densify` restores it exactly.

How the active neurons are chosen (``mode``):
  - ``"predictor"``: a predictor (:class:`FactoredPredictor`, :class:`QuantizedPredictor` (int8
    or int4, gate+up or gate-only scores, optionally from the top input channels only) or
    Deja Vu's :class:`LowRankPredictor`) scores every neuron from the MLP input; the top ``keep`` neurons
    per token (or those with a logit above ``logit_threshold``) are active. With top-k and the
    kernel, the indices go straight to :func:`fastllm.ops.sparse_mlp` (no mask, no host sync).
  - ``"threshold"``: training-free (CATS style): the gate (fc1 for ReLU models) runs dense and the
    neurons whose ``|act(gate)|`` exceeds the calibrated per-layer threshold are active; up and
    down run sparse.
  - ``"oracle"``: the dense hidden values are computed and each token keeps its ``keep`` largest
    ``|h|``; an upper bound for quality, no speed-up.
  - ``"dense"``: the wrapped MLP, unchanged.

Row sets: for ``rows`` > 1 tokens at once, ``batch_sets="per_row"`` gives each token its own set
(2-D indices), ``"union"`` one shared set (the union of the rows' sets). Calls with more than
``dense_above`` tokens run the dense MLP (default 1: prefill and batched calls run dense, only
single-token decode steps run sparse, because on CPU per-row sets read each row's weights
separately and lose to one dense GEMM below ~80% sparsity); ``None`` never does.
``compute="masked"`` evaluates the same selection by zeroing inactive neurons of a dense MLP (for
fast quality sweeps); ``"kernel"`` (default) calls :func:`fastllm.ops.sparse_mlp`.

On a GPU no path reads device data on the host, so a decode step is CUDA-graph capturable and
``torch.compile(fullgraph=True)`` traces it without graph breaks:
  - top-k selection (predictor or oracle) hands the top-k indices to the kernel;
  - a mask (threshold mode, ``logit_threshold``, union sets, oracle with several rows) becomes,
    on the device, index sets of a fixed width: every neuron's slot, the active neurons first in
    index order, plus a count per set, which the kernel reads on the device (no ``nonzero``, no
    ``.item()`` to size the sets);
  - :attr:`SparseMLP.last_density` is kept as a tensor (:attr:`SparseMLP.last_density_tensor`);
    reading ``last_density`` converts it to a float, which synchronises: do it outside the loop.
Bad indices in the sets are guarded in the kernel (see :func:`fastllm.ops.sparse_mlp`).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._ops.sparse import (
    pack_int4_rows,
    quantize_rows_int8,
    quantize_rows_symmetric,
    quantized_neuron_scores,
    sparse_mlp,
    unpack_int4_rows,
)

__all__ = ["SparseMLP", "LowRankPredictor", "FactoredPredictor", "QuantizedPredictor",
           "quantize_rows"]

_ACT_NAMES = {nn.SiLU: "silu", nn.ReLU: "relu", nn.GELU: "gelu"}

SPARSE_MLP_MODES = ("predictor", "threshold", "oracle", "dense")
# The attributes that decide what a call computes; SparseMLP checks them whenever one is set.
_OPTIONS = ("mode", "keep", "threshold", "predictor", "logit_threshold", "batch_sets",
            "dense_above", "compute", "deterministic")


def _check_choice(where: str, name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{where}: {name} must be one of "
                         f"{', '.join(repr(c) for c in choices)}, got {value!r}")


def check_mlp_options(where: str, *, mode, batch_sets, dense_above, compute,
                      deterministic) -> None:
    """The options :func:`fastllm.sparse.sparsify` hands to every :class:`SparseMLP`: one check
    for both, so that sparsify can refuse them before it touches the model and a SparseMLP
    built directly gets the same messages."""
    _check_choice(where, "mode", mode, SPARSE_MLP_MODES)
    _check_choice(where, "batch_sets", batch_sets, ("per_row", "union"))
    _check_choice(where, "compute", compute, ("kernel", "masked"))
    if dense_above is not None and (isinstance(dense_above, bool)
                                    or not isinstance(dense_above, int) or dense_above < 0):
        raise ValueError(f"{where}: dense_above must be an int >= 0 or None, got "
                         f"{dense_above!r}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"{where}: deterministic must be a bool, got {deterministic!r}")


def _check_number(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"SparseMLP: {name} must be a number or None, got {value!r}")
    if math.isnan(value):  # every comparison with NaN is False: no neuron would be kept
        raise ValueError(f"SparseMLP: {name} must not be NaN, got {value!r}")


def _activation_name(fn) -> str:
    for cls, name in _ACT_NAMES.items():
        if isinstance(fn, cls):
            if name == "gelu" and getattr(fn, "approximate", "none") == "tanh":
                return "gelu_tanh"
            return name
    cls_name = type(fn).__name__.lower()
    for key in ("silu", "relu", "gelu"):
        if key in cls_name:
            return "gelu_tanh" if key == "gelu" and ("tanh" in cls_name or "new" in cls_name) \
                else key
    raise ValueError(f"SparseMLP: unsupported activation {type(fn).__name__}")


class LowRankPredictor(nn.Module):
    """Deja Vu's neuron predictor: ``Linear(d, rank) -> Linear(rank, n_neurons)``, no bias.

    Trained by :func:`fastllm.sparse.train_predictors` (``kind="lowrank"``); a logit per neuron.

    >>> pred = fastllm.nn.LowRankPredictor(d_model=64, n_neurons=256, rank=8)
    >>> pred(torch.randn(3, 64)).shape                      # [tokens, n_neurons]
    torch.Size([3, 256])
    >>> sum(p.numel() for p in pred.parameters()) == 8 * (64 + 256)
    True
    """

    def __init__(self, d_model: int, n_neurons: int, rank: int):
        super().__init__()
        self.down = nn.Linear(d_model, rank, bias=False)
        self.up = nn.Linear(rank, n_neurons, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))


class FactoredPredictor(nn.Module):
    """A predictor shaped like the SiLU-gated MLP it serves: ``z = Linear(d, rank)(x)``, then
    rank-``rank`` estimates of the gate and up pre-activations ``g, u = Linear(rank, 2n)(z)``, and
    the score ``log|silu(g) * u|`` (minus a per-layer offset, so ``logit > 0`` keeps about the
    share of neurons the offset was calibrated for).

    A linear logit cannot rank neurons by ``|silu(gate) * up|``: ``|up|`` is symmetric in the sign
    of ``up``, so a linear function of x cannot follow it. This form can, and its weights have a
    closed form (reduced-rank regression of ``[gate, up]`` on the input, see
    :func:`fastllm.sparse.train_predictors`). Cost: ``rank * (d + 2n)`` multiply-adds per token
    against ``3 * d * n`` for the MLP.

    >>> _ = torch.manual_seed(0)
    >>> pred = fastllm.nn.FactoredPredictor(d_model=64, n_neurons=256, rank=8)
    >>> x = torch.randn(3, 64)
    >>> pred(x).shape
    torch.Size([3, 256])
    >>> torch.equal(pred(x).topk(32).indices, pred.magnitude(x).topk(32).indices)  # same order
    True
    """

    def __init__(self, d_model: int, n_neurons: int, rank: int, activation: str = "silu"):
        super().__init__()
        self.n_neurons, self.activation = n_neurons, activation
        self.down = nn.Linear(d_model, rank, bias=False)
        self.up = nn.Linear(rank, 2 * n_neurons, bias=True)
        self.register_buffer("offset", torch.zeros(()))

    def magnitude(self, x: Tensor) -> Tensor:
        """``|act(g) * u|``: orders neurons as :meth:`forward` does, with fewer operations."""
        gate, up = self.up(self.down(x)).split(self.n_neurons, dim=-1)
        act = F.silu(gate) if self.activation == "silu" else F.gelu(
            gate, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return (act * up).abs()

    def forward(self, x: Tensor) -> Tensor:
        return torch.log(self.magnitude(x) + 1e-12) - self.offset


def quantize_rows(w: Tensor, group: int = 64, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Symmetric ``bits``-bit copy (8 or 4) of a ``[n, d]`` weight, one fp32 scale per ``group``
    input columns: ``(q int8 [n, d], scale fp32 [n, d // group])`` with ``w ~= q * scale``.

    8 bits is :func:`fastllm._ops.sparse.quantize_rows_int8` (``max|w| / 127``); 4 bits uses the
    levels ``-7..7`` (``max|w| / 7``), returned one code per int8 byte;
    :class:`QuantizedPredictor` packs them two per byte
    (:func:`fastllm._ops.sparse.pack_int4_rows`), the storage the op's packed-int4 path reads.

    >>> _ = torch.manual_seed(0)
    >>> w = torch.randn(4, 64)
    >>> q, scale = fastllm.nn.quantize_rows(w, group=32, bits=4)
    >>> q.dtype, tuple(scale.shape), int(q.abs().max()) <= 7
    (torch.int8, (4, 2), True)
    >>> error = (q.view(4, 2, 32) * scale[..., None]).view(4, 64) - w
    >>> bool((error.abs() <= scale.repeat_interleave(32, 1) / 2 + 1e-6).all())  # half a step
    True
    """
    if bits == 8:
        return quantize_rows_int8(w, group)
    if bits != 4:
        raise ValueError(f"quantize_rows: bits must be 8 or 4, got {bits!r}")
    return quantize_rows_symmetric(w, group, 7, "quantize_rows")


QUANTIZED_SCORES = ("gate_up", "gate")


class QuantizedPredictor(nn.Module):
    """Scores every neuron from a quantized copy of the MLP's own weights (one fp32 scale per
    ``group`` input columns) through :func:`fastllm.ops.quantized_neuron_scores`.

    ``score="gate_up"`` (default): ``|act(g) * u|`` from quantized gate and up rows
    (``|act(u)|`` for a plain MLP); it differs from the oracle's score only by the rounding of
    the weights, so its top-k recall is close to 1 at 8 bits. ``score="gate"`` (gated MLPs,
    CATS-style): ``|act(g)|`` from the quantized gate rows only, half the bytes and
    multiply-adds, blind to ``|up|``. ``bits``: 8 (``max|w|/127``) or 4 (levels -7..7).

    Storage: 8 bits as int8 ``[n, d]`` codes; 4 bits packed two per byte, uint8 ``[n, d / 2]``
    (column ``2i`` in the low nibble of byte ``i``, ``2i + 1`` in the high one, two's complement;
    :func:`fastllm._ops.sparse.pack_int4_rows`), which the op reads as such, so 4 bits needs
    ``d_model`` to be a multiple of 32. The packed scores equal those of the same codes stored
    one per int8 byte (only the storage differs). Bytes per token: ``bits / 8 + 4 / group`` per
    quantized weight, i.e. for ``d n`` (gate) or ``2 d n`` (gate+up) weights; see
    :meth:`weight_bytes` and :func:`fastllm.sparse.predictor_bytes_share`.
    ``input_keep`` (WINA/TEAL-style input sparsity of the predictor, 0 < input_keep <= 1): each
    token's scores use only its ``round(input_keep * d)`` input channels with the largest
    ``|x_i| * ||W[:, i]||`` (column norms of the dequantized scored rows), the other channels
    count as 0; a column-gather kernel would then read that share of the predictor's columns.
    None is written: the op is called on the masked input and reads every column, so this saves
    bytes only in the bytes model until such a kernel exists.
    ``impl="op"`` (default) uses the compiled op; ``impl="torch"`` dequantizes in PyTorch
    (same scores up to fp32 summation order; no compiled extension needed).
    ``quantize_x``: round each token's input to int8 per scale group before scoring (the op's
    ``quantize_x``, integer dots); ``None`` (default) does so on the CPU, where it makes the
    scores several times cheaper, and not on CUDA, where it saves nothing yet.
    Scales, biases and the offset stay fp32 when the module is cast to another dtype.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> w_gate, w_up = torch.randn(256, 64), torch.randn(256, 64)
        >>> pred = fastllm.nn.QuantizedPredictor.from_weights(w_up, w_gate, bits=8)
        >>> pred
        QuantizedPredictor(n_neurons=256, bits=8, group=64, score=gate_up, activation=silu, impl=op)
        >>> x = torch.randn(1, 64)
        >>> exact = (torch.nn.functional.silu(x @ w_gate.T) * (x @ w_up.T)).abs()
        >>> top = lambda scores: set(scores.topk(128).indices[0].tolist())
        >>> len(top(pred.magnitude(x)) & top(exact)) / 128 > 0.9   # ranks like the exact |h|
        True
        >>> pred.weight_bytes()      # int8 gate and up codes plus one fp32 scale per 64 columns
        34816
    """

    _FP32_BUFFERS = ("up_scale", "gate_scale", "b_up", "b_gate", "offset", "col_norm")

    def __init__(self, d_model: int, n_neurons: int, group: int = 64, activation: str = "silu",
                 gated: bool = True, bias: bool = False, *, bits: int = 8,
                 score: str = "gate_up", impl: str = "op", input_keep: float | None = None,
                 quantize_x: bool | None = None):
        super().__init__()
        if quantize_x is not None and not isinstance(quantize_x, bool):
            raise ValueError(f"QuantizedPredictor: quantize_x must be None, True or False, got "
                             f"{quantize_x!r}")
        if group <= 0 or d_model % group or group % 16:
            raise ValueError(f"QuantizedPredictor: group must divide d_model ({d_model}) and be a "
                             f"positive multiple of 16, got {group}")
        if bits not in (8, 4):
            raise ValueError(f"QuantizedPredictor: bits must be 8 or 4, got {bits!r}")
        if bits == 4 and d_model % 32:
            raise ValueError(f"QuantizedPredictor: 4 bits are stored packed in 16-byte words of 32 "
                             f"columns, so d_model must be a multiple of 32, got {d_model}; "
                             "use bits=8")
        if score not in QUANTIZED_SCORES:
            raise ValueError(f"QuantizedPredictor: score must be one of {QUANTIZED_SCORES}, "
                             f"got {score!r}")
        if impl not in ("op", "torch"):
            raise ValueError(f"QuantizedPredictor: impl must be 'op' or 'torch', got {impl!r}")
        if score == "gate" and gated:
            raise ValueError("QuantizedPredictor: score='gate' keeps the gate rows in q_up (no "
                             "q_gate); build it with gated=False or through from_weights")
        if input_keep is not None and not (isinstance(input_keep, (int, float))
                                           and 0 < input_keep <= 1):
            raise ValueError(f"QuantizedPredictor: input_keep must be None or in (0, 1], "
                             f"got {input_keep!r}")
        self.n_neurons, self.activation, self.group = n_neurons, activation, group
        self.bits, self.score, self.impl = bits, score, impl
        self.quantize_x = quantize_x
        self.input_keep = None if input_keep is None else float(input_keep)
        groups = d_model // group
        codes = ((n_neurons, d_model), torch.int8) if bits == 8 else \
            ((n_neurons, d_model // 2), torch.uint8)  # packed int4
        self.register_buffer("q_up", torch.zeros(codes[0], dtype=codes[1]))
        self.register_buffer("up_scale", torch.zeros(n_neurons, groups))
        self.register_buffer("q_gate", torch.zeros(codes[0], dtype=codes[1]) if gated else None)
        self.register_buffer("gate_scale", torch.zeros(n_neurons, groups) if gated else None)
        self.register_buffer("b_up", torch.zeros(n_neurons) if bias else None)
        self.register_buffer("b_gate", torch.zeros(n_neurons) if bias and gated else None)
        self.register_buffer("offset", torch.zeros(()))
        # Per input column, the norm of the scored (dequantized) weights: WINA's channel weight.
        self.register_buffer("col_norm", torch.zeros(d_model), persistent=False)

    def _set_col_norm(self) -> None:
        total = torch.zeros_like(self.col_norm, dtype=torch.float32)
        for q, scale in ((self.q_up, self.up_scale), (self.q_gate, self.gate_scale)):
            if q is not None:
                if q.dtype == torch.uint8:
                    q = unpack_int4_rows(q)
                n, d = q.shape
                w = q.float().reshape(n, scale.shape[1], d // scale.shape[1]) * scale[..., None]
                total += w.reshape(n, d).pow(2).sum(0)
        self.col_norm = total.sqrt()

    @classmethod
    def from_weights(cls, w_up: Tensor, w_gate: Tensor | None = None, b_up: Tensor | None = None,
                     b_gate: Tensor | None = None, activation: str = "silu",
                     group: int = 64, *, bits: int = 8, score: str = "gate_up",
                     impl: str = "op", input_keep: float | None = None,
                     quantize_x: bool | None = None) -> "QuantizedPredictor":
        """A predictor holding a quantized copy of ``w_up`` (``[n, d]``, fc1 for a plain MLP) and
        ``w_gate`` (None for a plain MLP), on their device; the other arguments as in the
        class. See the class example."""
        if score not in QUANTIZED_SCORES:
            raise ValueError(f"QuantizedPredictor: score must be one of {QUANTIZED_SCORES}, "
                             f"got {score!r}")
        if score == "gate":
            if w_gate is None:
                raise ValueError("QuantizedPredictor: score='gate' needs a gated MLP (w_gate); "
                                 "a plain MLP's score is |act(fc1)|, score='gate_up'")
            # |act(g)|: the gate rows take the place of the (only) scored projection.
            w_up, b_up, w_gate, b_gate = w_gate, b_gate, None, None
        with torch.device(w_up.device):  # built in place: no host copy to upload
            pred = cls(w_up.shape[1], w_up.shape[0], group, activation, w_gate is not None,
                       b_up is not None or b_gate is not None, bits=bits, score=score,
                       impl=impl, input_keep=input_keep, quantize_x=quantize_x)
        store = (lambda q: q) if bits == 8 else pack_int4_rows
        with torch.no_grad():
            q, scale = quantize_rows(w_up, group, bits)
            pred.q_up.copy_(store(q))
            pred.up_scale.copy_(scale)
            if w_gate is not None:
                q, scale = quantize_rows(w_gate, group, bits)
                pred.q_gate.copy_(store(q))
                pred.gate_scale.copy_(scale)
            for name, b in (("b_up", b_up), ("b_gate", b_gate)):
                if b is not None and getattr(pred, name) is not None:
                    getattr(pred, name).copy_(b.detach().float())
            pred._set_col_norm()
        return pred

    @classmethod
    def from_state(cls, state: dict, activation: str, *, bits: int = 8,
                   score: str = "gate_up", input_keep: float | None = None
                   ) -> "QuantizedPredictor":
        """A predictor rebuilt from a saved state dict (for loading).

        4-bit codes saved one per int8 byte (files written before the packed storage) are packed
        here; they were quantized the same way, so the scores are unchanged."""
        state = dict(state)
        for name in ("q_up", "q_gate"):
            q = state.get(name)
            if q is None:
                continue
            if q.dtype not in ((torch.int8,) if bits == 8 else (torch.uint8, torch.int8)):
                raise ValueError(f"QuantizedPredictor: saved {name} has dtype {q.dtype}, which is "
                                 f"no {bits}-bit storage (8 bits: int8 codes; 4 bits: uint8 "
                                 "packed or int8 one per byte)")
            if bits == 4 and q.dtype == torch.int8:
                state[name] = pack_int4_rows(q)  # raises if a code is outside 4 bits
        n, d = state["q_up"].shape
        if state["q_up"].dtype == torch.uint8:
            d *= 2
        pred = cls(d, n, d // state["up_scale"].shape[1], activation, "q_gate" in state,
                   "b_up" in state, bits=bits, score=score, input_keep=input_keep)
        pred.load_state_dict(state)
        with torch.no_grad():
            pred._set_col_norm()
        return pred

    def weight_bytes(self, as_stored: bool = False) -> int:
        """Bytes one call reads for its codes and scales (biases not counted): ``bits / 8`` per
        weight (the storage: int8, or packed int4) plus the fp32 scales. With ``input_keep`` the
        default counts only the kept share of the columns (what a column-gather kernel, not
        written, would read); ``as_stored=True`` counts what today's op reads: every column."""
        keep = 1.0 if as_stored or self.input_keep is None else self.input_keep
        total = 0.0
        for q, scale in ((self.q_up, self.up_scale), (self.q_gate, self.gate_scale)):
            if q is not None:
                total += (q.numel() * q.element_size() + scale.numel() * 4) * keep
        return int(total)

    def _apply(self, fn, recurse=True):
        kept = {k: self._buffers[k] for k in self._FP32_BUFFERS if self._buffers.get(k) is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():  # follow the device, keep fp32 (and the exact values)
            self._buffers[name] = old.to(self._buffers[name].device)
        return self

    def _sparse_input(self, x: Tensor) -> Tensor:
        d = x.shape[-1]
        m = max(1, int(round(self.input_keep * d)))
        if m >= d:
            return x
        weight = x.abs().float() * self.col_norm
        idx = weight.topk(m, dim=-1, sorted=False).indices
        return torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))

    def magnitude(self, x: Tensor) -> Tensor:
        if self.input_keep is not None:
            x = self._sparse_input(x)
        quantize_x = x.device.type == "cpu" if self.quantize_x is None else self.quantize_x
        if self.impl == "torch":
            from .._reference.sparse import quantized_neuron_scores_reference
            return quantized_neuron_scores_reference(x, self.q_up, self.up_scale, self.q_gate,
                                                     self.gate_scale, self.b_up, self.b_gate,
                                                     self.activation, quantize_x)
        # The buffers straight from their dict: nn.Module's attribute fallback, six times, cost
        # about 3 us a call (a tenth of the scores themselves at SmolLM2's shape on the CPU).
        buffers = self._buffers
        return quantized_neuron_scores(x, buffers["q_up"], buffers["up_scale"],
                                       q_gate=buffers["q_gate"], gate_scale=buffers["gate_scale"],
                                       b_up=buffers["b_up"], b_gate=buffers["b_gate"],
                                       activation=self.activation, quantize_x=quantize_x)

    def forward(self, x: Tensor) -> Tensor:
        return torch.log(self.magnitude(x) + 1e-12) - self.offset

    def extra_repr(self) -> str:
        return (f"n_neurons={self.n_neurons}, bits={self.bits}, group={self.group}, "
                f"score={self.score}, activation={self.activation}, impl={self.impl}"
                + ("" if self.quantize_x is None else f", quantize_x={self.quantize_x}")
                + ("" if self.input_keep is None else f", input_keep={self.input_keep:g}"))


class SparseMLP(nn.Module):
    """A dense MLP that reads only the weights of the neurons each token needs (Deja Vu).

    Usually installed by :func:`fastllm.sparse.sparsify`; build one directly to wrap a single MLP.

    Args:
        wrapped: a gated MLP (``gate_proj``/``up_proj``/``down_proj``, Llama family) or a plain one
            (``fc1``/``fc2``/``activation_fn``, OPT). Its weights are shared, not copied; a
            transposed copy of the down weights is added (one contiguous row per neuron).
        mode: ``"predictor"`` (a predictor picks the neurons), ``"threshold"`` (gate computed
            densely, neurons with ``|act(gate)| > threshold`` kept, CATS), ``"oracle"`` (top-k by
            the true ``|h|``: a quality bound, no speed-up) or ``"dense"``.
        keep: neurons kept per token in top-k selection (0 to the MLP's width; ``None``: all).
        threshold: the threshold mode's per-layer threshold (required in that mode).
        predictor: a ``QuantizedPredictor``, ``FactoredPredictor`` or ``LowRankPredictor``
            (required in predictor mode).
        logit_threshold: keep the neurons whose predictor logit exceeds it instead of the top
            ``keep`` (``None``: top-k).
        batch_sets: ``"per_row"`` (a set per token) or ``"union"`` (one set for the call).
        dense_above: calls with more tokens than this run dense (default 1: prefill dense,
            single-token decode steps sparse; ``None``: never dense).
        compute: ``"kernel"`` (``fastllm.ops.sparse_mlp``) or ``"masked"`` (dense math with the
            same selection; for quality studies).
        deterministic: on CUDA, sum partials in a fixed order instead of atomically.

    Bad options raise at construction, and when assigned later (``sparse.keep = 300`` on a
    256-neuron MLP raises ``ValueError``), not at the first call.

    ``last_density`` is the share of neurons the last call used (a float; reading it
    synchronises on a GPU), ``last_density_tensor`` its device twin.

    Examples:
        Any module with ``gate_proj``, ``up_proj``, ``down_proj`` and ``act_fn`` (a transformers
        ``LlamaMLP``, say) is a gated MLP:

        >>> _ = torch.manual_seed(0)
        >>> mlp = nn.Module()
        >>> mlp.gate_proj, mlp.up_proj = nn.Linear(64, 256), nn.Linear(64, 256)
        >>> mlp.down_proj, mlp.act_fn = nn.Linear(256, 64), nn.SiLU()
        >>> sparse = fastllm.nn.SparseMLP(mlp, mode="oracle", keep=128)  # half the neurons
        >>> x = torch.randn(1, 1, 64)                                     # one decode token
        >>> y = sparse(x)
        >>> y.shape, sparse.last_density
        (torch.Size([1, 1, 64]), 0.5)
        >>> h = sparse.dense_hidden(x[0]) * sparse.select(x[0])   # the kept neurons' h
        >>> torch.allclose(y[0], mlp.down_proj(h), atol=1e-5)
        True
        >>> sparse.keep = 256                                     # every neuron: the dense MLP
        >>> dense = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        >>> torch.allclose(sparse(x), dense, atol=1e-5)
        True
    """

    def __init__(self, wrapped: nn.Module, *, mode: str = "dense", keep: int | None = None,
                 threshold: float | None = None, predictor: LowRankPredictor | None = None,
                 logit_threshold: float | None = None, batch_sets: str = "per_row",
                 dense_above: int | None = 1, compute: str = "kernel",
                 deterministic: bool = False):
        super().__init__()
        if all(hasattr(wrapped, n) for n in ("gate_proj", "up_proj", "down_proj")):
            self.kind = "gated"
            self.gate_w, self.up_w = wrapped.gate_proj.weight, wrapped.up_proj.weight
            self.gate_b, self.up_b = wrapped.gate_proj.bias, wrapped.up_proj.bias
            down = wrapped.down_proj
            self.activation = _activation_name(wrapped.act_fn)
        elif all(hasattr(wrapped, n) for n in ("fc1", "fc2", "activation_fn")):
            self.kind = "plain"
            self.gate_w = self.gate_b = None
            self.up_w, self.up_b = wrapped.fc1.weight, wrapped.fc1.bias
            down = wrapped.fc2
            self.activation = _activation_name(wrapped.activation_fn)
        else:
            raise TypeError(f"SparseMLP: {type(wrapped).__name__} has neither gate_proj/up_proj/"
                            "down_proj nor fc1/fc2/activation_fn")
        # Kept outside the module tree (a list), so state_dict and .to() see no duplicate weights.
        self._wrapped = [wrapped]
        self.down_w, self.down_b = down.weight, down.bias
        self.register_buffer("down_t", down.weight.detach().t().contiguous(), persistent=False)
        self.n_neurons = self.up_w.shape[0]
        self._check_options(mode=mode, keep=keep, threshold=threshold, predictor=predictor,
                            logit_threshold=logit_threshold, batch_sets=batch_sets,
                            dense_above=dense_above, compute=compute, deterministic=deterministic)
        self.mode, self.keep, self.threshold = mode, keep, threshold
        self.predictor, self.logit_threshold = predictor, logit_threshold
        self.batch_sets, self.dense_above = batch_sets, dense_above
        self.compute, self.deterministic = compute, deterministic
        self.lookahead_logits: Tensor | None = None  # set by the previous layer in lookahead mode
        self.lookahead_event = None                  # recorded on the side stream after them
        self.next_layer: SparseMLP | None = None     # the layer this one predicts for
        self._side_event = None                      # reused for the event this layer records
        # Share of neurons active in the last call: a float, or a 0-dim tensor on the input's
        # device when it depends on the data (no host sync to produce it).
        self._density: float | Tensor | None = None
        self._options_checked = True

    def _check_options(self, *, mode, keep, threshold, predictor, logit_threshold, batch_sets,
                       dense_above, compute, deterministic) -> None:
        check_mlp_options("SparseMLP", mode=mode, batch_sets=batch_sets,
                          dense_above=dense_above, compute=compute, deterministic=deterministic)
        n = self.n_neurons
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int)
                                 or not 0 <= keep <= n):
            raise ValueError(f"SparseMLP: keep must be None (every neuron) or an int in [0, {n}] "
                             f"(this MLP has {n} neurons), got {keep!r}")
        _check_number("threshold", threshold)
        _check_number("logit_threshold", logit_threshold)
        if predictor is not None and not callable(predictor):
            raise TypeError(f"SparseMLP: predictor must be a module that scores the neurons "
                            f"(QuantizedPredictor, FactoredPredictor, LowRankPredictor) or None, "
                            f"got {type(predictor).__name__}")
        if mode == "predictor" and predictor is None:
            raise ValueError("SparseMLP: mode='predictor' needs a predictor (QuantizedPredictor, "
                             "FactoredPredictor or LowRankPredictor), got predictor=None")
        if mode == "threshold" and threshold is None:
            raise ValueError("SparseMLP: mode='threshold' needs a threshold (a number, e.g. from "
                             "fastllm.sparse.calibrate_thresholds), got threshold=None")

    def __setattr__(self, name: str, value) -> None:
        # The options are public attributes (``sparse.keep = 256``): a bad one assigned after
        # construction would otherwise surface only at the next call, as an unclear error.
        if name in _OPTIONS and self.__dict__.get("_options_checked"):
            options = {option: getattr(self, option) for option in _OPTIONS}
            options[name] = value
            self._check_options(**options)
        super().__setattr__(name, value)

    @property
    def wrapped(self) -> nn.Module:
        return self._wrapped[0]

    @property
    def last_density(self) -> float | None:
        """Share of neurons active in the last call, as a float. Reading it synchronises with the
        device when it was computed from the data (threshold and mask paths): for a loop that
        must not stop the GPU, keep :attr:`last_density_tensor` instead."""
        d = self._density
        return float(d) if isinstance(d, Tensor) else d

    @last_density.setter
    def last_density(self, value: float | Tensor | None) -> None:
        self._density = value

    @property
    def last_density_tensor(self) -> Tensor | None:
        """:attr:`last_density` without a sync: a 0-dim float32 tensor on the input's device (or
        ``None`` before the first call)."""
        d = self._density
        if d is None or isinstance(d, Tensor):
            return d
        return torch.tensor(d, dtype=torch.float32, device=self.up_w.device)

    # ---- pieces -------------------------------------------------------------------------------
    def _act(self, v: Tensor) -> Tensor:
        return {"silu": F.silu, "relu": F.relu, "gelu": F.gelu,
                "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[self.activation](v)

    def dense_hidden(self, x: Tensor) -> Tensor:
        up = F.linear(x, self.up_w, self.up_b)
        if self.kind == "gated":
            return self._act(F.linear(x, self.gate_w, self.gate_b)) * up
        return self._act(up)

    def dense_forward(self, x: Tensor) -> Tensor:
        return F.linear(self.dense_hidden(x), self.down_w, self.down_b)

    def _predict(self, x: Tensor) -> Tensor:
        if self.lookahead_logits is not None:
            logits = self.lookahead_logits
            event = self.lookahead_event
            self.lookahead_logits = self.lookahead_event = None
            if event is not None:
                # Made on the side stream: this stream waits for them, and the allocator must not
                # hand their memory back to the side stream before this stream's reads are done.
                current = torch.cuda.current_stream(logits.device)
                current.wait_event(event)
                logits.record_stream(current)
            if logits.shape[0] == x.shape[0]:
                return logits
        return self.predictor(x)

    def _launch_lookahead(self, x: Tensor) -> None:
        nxt = self.next_layer
        if nxt is None or nxt.predictor is None:
            return
        if x.is_cuda and torch.cuda.is_available():
            # The next layer's predictor overlaps this layer's MLP (and the next attention), on a
            # side stream of x's device (not the current device's: the model may live elsewhere).
            current = torch.cuda.current_stream(x.device)
            stream = _side_stream(x.device)
            stream.wait_stream(current)
            x.record_stream(stream)  # x's memory must outlive the side stream's read of it
            if self._side_event is None:
                self._side_event = torch.cuda.Event()
            with torch.cuda.stream(stream):
                nxt.lookahead_logits = nxt.predictor(x)
                self._side_event.record(stream)
            nxt.lookahead_event = self._side_event
        else:
            # CPU, or CUDA tensors without a CUDA runtime (fake tensors): the same work in order.
            nxt.lookahead_logits = nxt.predictor(x)

    def select(self, x: Tensor) -> Tensor:
        """Boolean mask [rows, n_neurons] of the active neurons for each row of x (2-D)."""
        if self.mode == "threshold":
            pre = F.linear(x, self.gate_w if self.kind == "gated" else self.up_w,
                           self.gate_b if self.kind == "gated" else self.up_b)
            return self._act(pre).abs() > self.threshold
        if self.mode == "oracle":
            scores = self.dense_hidden(x).abs()
        elif self.mode == "predictor":
            scores = self._predict(x)
            if self.logit_threshold is not None:
                return scores > self.logit_threshold
        else:
            raise ValueError(f"SparseMLP: unknown mode {self.mode!r}")
        keep = self.n_neurons if self.keep is None else self.keep
        top = scores.topk(keep, dim=-1).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, hidden: Tensor) -> Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        if self.mode == "dense" or (self.dense_above is not None and x.shape[0] > self.dense_above):
            self._density = 1.0
            return self.dense_forward(x).reshape(*shape[:-1], -1)
        if self.mode == "predictor" and self.next_layer is not None:
            # Started before this layer's own work, so on CUDA it overlaps it.
            self._launch_lookahead(x)
        if (self.mode == "predictor" and self.logit_threshold is None and self.compute == "kernel"
                and (x.shape[0] == 1 or self.batch_sets == "per_row") and x.shape[0] > 0):
            return self._topk_forward(x).reshape(*shape[:-1], -1)
        mask = self.select(x)
        if self.batch_sets == "union":
            mask = mask.any(dim=0, keepdim=True).expand_as(mask)
        # A tensor, not .item(): reading it back would stop the GPU (and break torch.compile).
        self._density = mask.float().mean() if x.shape[0] else 0.0
        if self.compute == "masked":
            out = F.linear(self.dense_hidden(x) * mask, self.down_w, self.down_b)
        else:
            out = self._kernel_forward(x, mask)
        return out.reshape(*shape[:-1], -1)

    def _topk_forward(self, x: Tensor) -> Tensor:
        # The decode path: top-k indices go straight to the kernel (int64 is accepted, order is
        # irrelevant), with no boolean mask, no nonzero and no host sync, which at batch 1 cost
        # more than the weight bytes they save on a small model.
        keep = self.n_neurons if self.keep is None else self.keep
        if self.lookahead_logits is None and hasattr(self.predictor, "magnitude"):
            scores = self.predictor.magnitude(x)
        else:
            scores = self._predict(x)
        top = scores.topk(keep, dim=-1, sorted=False).indices
        self._density = keep / self.n_neurons
        common = dict(w_gate=self.gate_w, b_up=self.up_b, b_gate=self.gate_b, b_down=self.down_b,
                      activation=self.activation, deterministic=self.deterministic)
        if x.shape[0] == 1:
            return sparse_mlp(x, self.up_w, self.down_t, top[0], **common)
        # Every row's set has exactly `keep` entries: no counts needed.
        return sparse_mlp(x, self.up_w, self.down_t, top.contiguous(), **common)

    def _kernel_forward(self, x: Tensor, mask: Tensor) -> Tensor:
        common = dict(w_gate=self.gate_w, b_up=self.up_b, b_gate=self.gate_b, b_down=self.down_b,
                      activation=self.activation, deterministic=self.deterministic)
        if self.batch_sets == "union" or x.shape[0] == 1:
            idx, counts = _mask_to_sets(mask[:1])
            return sparse_mlp(x, self.up_w, self.down_t, idx[0], counts=counts, **common)
        idx, counts = _mask_to_sets(mask)
        return sparse_mlp(x, self.up_w, self.down_t, idx, counts=counts, **common)

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, activation={self.activation}, mode={self.mode}, "
                f"keep={self.keep}, threshold={self.threshold}, n_neurons={self.n_neurons}")


def _mask_to_sets(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row index sets of a ``[rows, n]`` boolean mask, built on the device without reading it:
    ``(idx [rows, n], counts [rows])``, both int64. Row r of ``idx`` is a stable partition of
    ``0..n-1``: its active neurons first in increasing order (as ``nonzero`` lists them), then the
    inactive ones, which the kernel never reads (they are past ``counts[r]``).

    The width is ``n``, the only bound known without looking at the mask (``nonzero`` or a
    ``counts.max().item()`` would give a tighter one at the price of a host sync); the kernel
    spreads each set's real count over its blocks, and the padding costs a skipped task each.
    """
    n = mask.shape[1]
    counts = mask.sum(dim=1)
    slot = mask.cumsum(dim=1) - 1          # among the active neurons: this one's position
    neuron = torch.arange(n, device=mask.device).expand_as(slot)
    # An inactive neuron j follows every active one and the inactive ones before it.
    target = torch.where(mask, slot, counts.unsqueeze(1) + neuron - slot - 1)
    return torch.empty_like(target).scatter_(1, target, neuron), counts


_SIDE_STREAMS: dict = {}


def _side_stream(device):
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]
