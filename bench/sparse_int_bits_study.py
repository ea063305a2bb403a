"""How few bits can the quantized predictor's copy of gate and up have? (issue 5)

Simulates symmetric per-group quantization of SmolLM2's gate and up weights at several widths
(dequantized in fp32, so any width can be tried without a kernel; 8 bits is what
``train_predictors(kind="quantized")`` builds, through the int8 op) and reports, on held-out text,
top-k recall against the oracle and perplexity with every MLP in predictor mode (masked compute).
1 bit is the sign times the group's mean |w|.

    python bench/sparse_int_bits_study.py --out bench/sparse_int_bits_study.json
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch
import torch.nn.functional as F
from torch import nn

import fastllm.sparse as sparse
from sparse_predictor_study import load, perplexity, ppl_at, recall_vs_oracle

ROOT = pathlib.Path(__file__).resolve().parents[1]


def fake_quantize(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    rows, cols = w.shape
    grouped = w.float().reshape(rows, cols // group, group)
    if bits == 1:
        return (grouped.sign() * grouped.abs().mean(-1, keepdim=True)).reshape(rows, cols)
    top = 2 ** (bits - 1) - 1
    scale = (grouped.abs().amax(-1, keepdim=True) / top).clamp_min(1e-12)
    return (torch.round(grouped / scale).clamp(-top, top) * scale).reshape(rows, cols)


class SimulatedPredictor(nn.Module):
    """|silu(g) * u| from fake-quantized gate and up weights (same interface as the real ones)."""

    def __init__(self, view, bits: int, group: int):
        super().__init__()
        self.n_neurons = view.n_neurons
        self.gate = fake_quantize(view.gate_w.detach(), bits, group)
        self.up = fake_quantize(view.up_w.detach(), bits, group)

    def magnitude(self, x):
        return (F.silu(x @ self.gate.T) * (x @ self.up.T)).abs()

    def forward(self, x):
        return torch.log(self.magnitude(x) + 1e-12)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default=str(ROOT / "tests/data/tinyshakespeare_200k.txt"))
    ap.add_argument("--eval", type=int, default=1024, help="held-out tokens")
    ap.add_argument("--widths", default="8:64,4:32,4:64,3:32,2:32,1:64", help="bits:group,...")
    ap.add_argument("--out", default="/tmp/sparse_int_bits_study.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tokenizer, text = load(args.text)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    seq = 256
    start = int(ids.numel() * 0.8)  # the held-out text of sparse_predictor_study.py
    held = ids[start: start + args.eval // seq * seq].reshape(-1, seq)
    dense = perplexity(model, held)
    views = [sparse._make_view(site) for site in sparse.find_mlps(model)]
    identity = sparse._model_identity(model)
    res = {"dense_ppl": dense, "heldout_tokens": held.numel(), "rows": []}
    for spec in args.widths.split(","):
        bits, group = (int(v) for v in spec.split(":"))
        layers = nn.ModuleList(SimulatedPredictor(v, bits, group) for v in views)
        preds = sparse.Predictors(layers, identity, 0, kind="quantized")
        recall, _ = recall_vs_oracle(model, preds, held[:2], [0.3, 0.5, 0.7])
        ppl = {s: ppl_at(model, held, preds, s) / dense for s in (0.5, 0.7)}
        row = {"bits": bits, "group": group, "recall (512 tokens)": recall, "ppl_ratio": ppl}
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    pathlib.Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
