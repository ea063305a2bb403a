"""Pure-PyTorch sparse MLP: the oracle for ``fastllm.ops.sparse_mlp`` and the dense baselines."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
    "silu": F.silu,
}


def _hidden(x, w_up, w_gate, b_up, b_gate, activation):
    act = _ACTIVATIONS[activation]
    up = x @ w_up.T + (b_up if b_up is not None else 0)
    if w_gate is None:
        return act(up)
    gate = x @ w_gate.T + (b_gate if b_gate is not None else 0)
    return act(gate) * up


def sparse_mlp_reference(x: Tensor, w_up: Tensor, w_gate: Tensor | None, w_down_t: Tensor,
                         b_up: Tensor | None, b_gate: Tensor | None, b_down: Tensor | None,
                         active_idx: Tensor, counts: Tensor | None = None,
                         activation: str = "silu", deterministic: bool = False) -> Tensor:
    """Gather the active rows, compute in fp32 (float64 stays float64), return x's dtype.

    ``active_idx`` 1-D: one set for every row of ``x`` (its first ``counts[0]`` entries with
    ``counts``); 2-D ``[rows, k]``: a set per row, of which the first ``counts[r]`` entries count
    (all ``k`` without counts).
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    f = lambda t: None if t is None else t.to(compute)  # noqa: E731
    xf = x.to(compute)
    idx = active_idx.long()
    out = torch.zeros(x.shape[0], w_down_t.shape[1], dtype=compute, device=x.device)
    if b_down is not None:
        out += f(b_down)
    if idx.dim() == 1:  # one set for every row, of which the first counts[0] entries count
        sets = [(slice(None), idx if counts is None else idx[: int(counts.reshape(-1)[0])])]
    else:
        k = idx.shape[1]
        n = counts.long().tolist() if counts is not None else [k] * idx.shape[0]
        sets = [(slice(r, r + 1), idx[r, : n[r]]) for r in range(idx.shape[0])]
    for rows, sel in sets:
        if sel.numel() == 0:
            continue
        h = _hidden(xf[rows], f(w_up)[sel], None if w_gate is None else f(w_gate)[sel],
                    None if b_up is None else f(b_up)[sel],
                    None if b_gate is None else f(b_gate)[sel], activation)
        out[rows] += h @ f(w_down_t)[sel]
    return out.to(x.dtype)


def dense_mlp_reference(x: Tensor, w_up: Tensor, w_gate: Tensor | None, w_down: Tensor,
                        b_up: Tensor | None = None, b_gate: Tensor | None = None,
                        b_down: Tensor | None = None, activation: str = "silu") -> Tensor:
    """The dense MLP with nn.Linear weights (``w_down`` is ``[d_out, n]``), in x's dtype."""
    h = _hidden(x, w_up, w_gate, b_up, b_gate, activation)
    return F.linear(h, w_down, b_down)


def _unpack_int4(packed: Tensor) -> Tensor:
    """Codes of packed int4 rows: byte i holds column 2i (low nibble) and 2i + 1 (high nibble),
    each a two's-complement 4-bit value."""
    nibbles = torch.stack((packed.long() % 16, packed.long() // 16), dim=-1)
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).reshape(packed.shape[0], -1)


def quantized_neuron_scores_reference(x: Tensor, q_up: Tensor, up_scale: Tensor,
                                      q_gate: Tensor | None = None,
                                      gate_scale: Tensor | None = None, b_up: Tensor | None = None,
                                      b_gate: Tensor | None = None,
                                      activation: str = "silu",
                                      quantize_x: bool = False) -> Tensor:
    """Dequantize (``q * scale`` per column group) and score ``|act(g) * u|`` in fp32. uint8
    weights are packed int4 (two codes per byte, ``fastllm._ops.sparse.pack_int4_rows``). With
    ``quantize_x`` each row of x is first rounded per scale group: scale ``max|x| / 127``, codes
    ``round(x / scale)`` (half to even), x replaced by ``codes * scale`` (0 where the scale is 0)."""
    x = x.float()
    if quantize_x:
        d = x.shape[-1]
        grouped = x.reshape(-1, up_scale.shape[1], d // up_scale.shape[1])
        scale = grouped.abs().amax(-1, keepdim=True) / 127
        rounded = torch.where(scale > 0, (grouped / scale).round() * scale,
                              torch.zeros_like(grouped))
        x = rounded.reshape(x.shape)

    def dequant(q, scale):
        if q.dtype == torch.uint8:
            q = _unpack_int4(q)
        n, d = q.shape
        groups = scale.shape[1]
        return (q.float().reshape(n, groups, d // groups) * scale[..., None].float()).reshape(n, d)
    w_gate = None if q_gate is None else dequant(q_gate, gate_scale)
    return _hidden(x, dequant(q_up, up_scale), w_gate,
                   None if b_up is None else b_up.float(),
                   None if b_gate is None else b_gate.float(), activation).abs()
