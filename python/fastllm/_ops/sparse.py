"""The sparse MLP ops (the kernel and the quantized predictor's scores): typed wrappers and fake
implementations.

Re-exported by :mod:`fastllm.ops`; the schema lives in ``csrc/registration.cpp``. No autograd:
the op serves inference (decode); training goes through the dense MLP.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import require_kernels_for as _require_kernels_for

__all__ = ["sparse_mlp", "quantized_neuron_scores", "quantize_rows_int8", "pack_int4_rows",
           "unpack_int4_rows"]


def sparse_mlp(x: Tensor, w_up: Tensor, w_down_t: Tensor, active_idx: Tensor, *,
               w_gate: Tensor | None = None, b_up: Tensor | None = None,
               b_gate: Tensor | None = None, b_down: Tensor | None = None,
               counts: Tensor | None = None, activation: str = "silu",
               deterministic: bool = False) -> Tensor:
    """MLP output reading only the active neurons' weights.

    ``h_j = act(x . w_gate[j] + b_gate[j]) * (x . w_up[j] + b_up[j])`` with a gate, else
    ``act(x . w_up[j] + b_up[j])``; ``out = b_down + sum_j h_j * w_down_t[j]`` over the active j.

    Args:
        x: ``[..., d_in]`` float32, float16 or bfloat16 (accumulation is fp32).
        w_up, w_gate: ``[n, d_in]`` as stored by ``nn.Linear`` (one neuron per row).
        w_down_t: ``[n, d_out]``, the down projection's weight transposed and contiguous.
        active_idx: int32/int64. 1-D ``[k]``: one set shared by every row of ``x``; 2-D
            ``[rows, k]``: a set per row of the flattened ``x``. With ``counts`` only the first
            ``counts[s]`` entries of set ``s`` are used; the padding after them is never read.
        counts: one count per set, with ``active_idx``'s dtype: ``[1]`` for a 1-D
            ``active_idx``, ``[rows]`` for a 2-D one. Lets a caller build a set on the device
            with a fixed width known on the host (e.g. every neuron's slot, active ones first),
            so nothing is read back to size it.
        activation: ``"relu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"silu"``.
        deterministic: on CUDA, sum partial results in a fixed order instead of with atomics
            (CPU is always deterministic).

    An empty set gives ``b_down`` (or zeros).

    Index values: on CPU, an index outside ``[0, n)`` or a count outside ``[0, k]`` raises
    IndexError. On CUDA they are not read on the host (that would synchronise): the kernels skip
    a bad neuron (it contributes nothing), clamp a bad count into ``[0, k]``, and report either in
    the device error word, raised by :func:`fastllm.ops.raise_index_errors`; inside
    :func:`fastllm.ops.checked_indices` (or with ``FASTLLM_CHECK_INDICES=1``) they raise at the
    call as on CPU.

    >>> _ = torch.manual_seed(0)
    >>> w_gate, w_up, w_down = torch.randn(32, 8), torch.randn(32, 8), torch.randn(8, 32)
    >>> x, active = torch.randn(1, 8), torch.tensor([3, 7, 20])     # 3 of 32 neurons
    >>> out = fastllm.ops.sparse_mlp(x, w_up, w_down.T.contiguous(), active, w_gate=w_gate)
    >>> h = torch.nn.functional.silu(x @ w_gate[active].T) * (x @ w_up[active].T)
    >>> out.shape, torch.allclose(out, h @ w_down[:, active].T, atol=1e-5)
    (torch.Size([1, 8]), True)
    """
    _require_kernels_for(x, "sparse_mlp")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    out = torch.ops.fastllm.sparse_mlp.default(
        x2.contiguous(), w_up, w_gate, w_down_t, b_up, b_gate, b_down, active_idx, counts,
        activation, deterministic)
    return out.reshape(*lead, w_down_t.shape[1])


@torch.library.register_fake("fastllm::sparse_mlp")
def _sparse_mlp_fake(x, w_up, w_gate, w_down_t, b_up, b_gate, b_down, active_idx, counts,
                     activation, deterministic=False):
    torch._check(x.dim() == 2, lambda: "fastllm.sparse_mlp: x must be 2-D")
    torch._check(w_down_t.dim() == 2, lambda: "fastllm.sparse_mlp: w_down_t must be 2-D")
    return x.new_empty((x.shape[0], w_down_t.shape[1]))


def quantize_rows_int8(w: Tensor, group: int = 64) -> tuple[Tensor, Tensor]:
    """Symmetric int8 copy of a ``[n, d]`` weight with one fp32 scale per ``group`` input columns.

    Returns ``(q, scale)``: ``q`` int8 ``[n, d]``, ``scale`` fp32 ``[n, d // group]``, and
    ``w ~= q * scale`` group by group (``scale = max|w| / 127`` over the group; an all-zero group
    gets scale 0). ``group`` must divide ``d`` and be a multiple of 16.
    """
    return quantize_rows_symmetric(w, group, 127, "quantize_rows_int8")


def quantize_rows_symmetric(w: Tensor, group: int, levels: int,
                            name: str) -> tuple[Tensor, Tensor]:
    """``w ~= q * scale`` with ``q`` int8 in ``[-levels, levels]`` and one fp32 scale per
    ``group`` input columns (``max|w| / levels``); errors name the caller ``name``."""
    if w.dim() != 2:
        raise ValueError(f"{name}: w must be 2-D, got shape {tuple(w.shape)}")
    n, d = w.shape
    if group <= 0 or d % group or group % 16:
        raise ValueError(f"{name}: group must divide d_in ({d}) and be a positive "
                         f"multiple of 16, got {group}")
    grouped = w.detach().float().reshape(n, d // group, group)
    scale = grouped.abs().amax(dim=-1) / float(levels)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(grouped / safe[..., None]).clamp_(-levels, levels).to(torch.int8)
    return q.reshape(n, d).contiguous(), scale.contiguous()


def pack_int4_rows(q: Tensor) -> Tensor:
    """Two int4 codes per byte: int8 ``[n, d]`` with values in ``[-8, 7]`` -> uint8 ``[n, d / 2]``.

    Byte ``i`` of a row holds column ``2i`` in its low nibble and column ``2i + 1`` in its high
    nibble, each as a two's-complement 4-bit value (the storage
    :func:`quantized_neuron_scores` reads when given uint8 weights). Lossless for codes in
    ``[-8, 7]``; :func:`unpack_int4_rows` inverts it.
    """
    if q.dim() != 2 or q.dtype != torch.int8:
        raise ValueError(f"pack_int4_rows: q must be a 2-D int8 tensor, got {q.dtype} of shape "
                         f"{tuple(q.shape)}")
    if q.shape[1] % 2:
        raise ValueError(f"pack_int4_rows: q must have an even number of columns, got "
                         f"{q.shape[1]}")
    if q.numel() and (q.min().item() < -8 or q.max().item() > 7):
        raise ValueError("pack_int4_rows: codes must lie in [-8, 7] (4 bits), got values in "
                         f"[{q.min().item()}, {q.max().item()}]")
    nibbles = q.to(torch.uint8) & 0x0F  # two's complement: the low 4 bits of the int8 value
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()


def unpack_int4_rows(packed: Tensor) -> Tensor:
    """The int8 ``[n, 2 * m]`` codes of a uint8 ``[n, m]`` packed-int4 tensor
    (see :func:`pack_int4_rows`)."""
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4_rows: packed must be a 2-D uint8 tensor, got "
                         f"{packed.dtype} of shape {tuple(packed.shape)}")
    # (u ^ 8) - 8 sign-extends a 4-bit code u.
    low = ((packed & 0x0F) ^ 8).to(torch.int8) - 8
    high = ((packed >> 4) ^ 8).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


def quantized_neuron_scores(x: Tensor, q_up: Tensor, up_scale: Tensor, *,
                            q_gate: Tensor | None = None, gate_scale: Tensor | None = None,
                            b_up: Tensor | None = None, b_gate: Tensor | None = None,
                            activation: str = "silu", quantize_x: bool = False) -> Tensor:
    """Per-neuron scores ``|act(g) * u|`` (``|act(u)|`` without a gate) from int8 or packed int4
    weights.

    ``u = sum over column groups of up_scale[:, g] * (q_up[:, group g] . x[group g]) + b_up``,
    likewise ``g``; see :func:`quantize_rows_int8` for the layout. The scores rank neurons as
    :meth:`fastllm.nn.SparseMLP.dense_hidden` would, up to the quantization error.

    Args:
        x: ``[..., d_in]`` float32, float16 or bfloat16.
        q_up, q_gate: int8 ``[n, d_in]`` (one code per byte) or uint8 ``[n, d_in / 2]`` (packed
            int4, two codes per byte, :func:`pack_int4_rows`; then ``d_in`` must be a multiple of
            32), both of one storage; up_scale, gate_scale: fp32 ``[n, d_in // group]`` with
            ``group`` a multiple of 16 (``q_gate`` and ``gate_scale`` together or not at all).
        b_up, b_gate: optional fp32 ``[n]``.
        activation: ``"relu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"silu"``.
        quantize_x: round each row of ``x`` to int8 per scale group first (symmetric, scale
            ``max|x| / 127`` over the group, round half to even) and score with integer dots: on
            the CPU this is several times faster (no widening of every code to fp32); the scores
            move by the rounding of x (the ranking barely: docs/sparse.md). On CUDA x is rounded
            the same way by tensor ops and then scored in fp32.

    Returns fp32 ``[..., n]``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> w, x = torch.randn(6, 64), torch.randn(2, 64)
        >>> q, scale = quantize_rows_int8(w, group=32)
        >>> scores = quantized_neuron_scores(x, q, scale, activation="relu")
        >>> scores.shape
        torch.Size([2, 6])
        >>> dequantized = (q.view(6, 2, 32) * scale[..., None]).view(6, 64)
        >>> torch.allclose(scores, torch.relu(x @ dequantized.T).abs(), atol=1e-4)
        True
        >>> rounded = quantized_neuron_scores(x, q, scale, activation="relu", quantize_x=True)
        >>> torch.equal(rounded.argmax(-1), scores.argmax(-1))   # x rounded to int8 too
        True
    """
    if not isinstance(quantize_x, bool):
        raise TypeError(f"quantized_neuron_scores: quantize_x must be a bool, got "
                        f"{type(quantize_x).__name__} {quantize_x!r}")
    _require_kernels_for(x, "quantized_neuron_scores")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    out = torch.ops.fastllm.quantized_neuron_scores.default(
        x2.contiguous(), q_up, up_scale, q_gate, gate_scale, b_up, b_gate, activation, quantize_x)
    return out.reshape(*lead, q_up.shape[0])


@torch.library.register_fake("fastllm::quantized_neuron_scores")
def _quantized_neuron_scores_fake(x, q_up, up_scale, q_gate, gate_scale, b_up, b_gate, activation,
                                  quantize_x=False):
    torch._check(x.dim() == 2, lambda: "fastllm.quantized_neuron_scores: x must be 2-D")
    torch._check(q_up.dim() == 2, lambda: "fastllm.quantized_neuron_scores: q_up must be 2-D")
    return x.new_empty((x.shape[0], q_up.shape[0]), dtype=torch.float32)
