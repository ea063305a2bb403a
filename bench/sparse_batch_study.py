"""Where the sparse MLP stops paying as the batch grows (issue 16, "Batch > 1").

Each token of a decode batch picks its own neurons; with per-row sets (`batch_sets="per_row"`)
the kernel reads each row's weights separately, so its cost grows with the batch while the dense
MLP's (one GEMM) grows much more slowly; with one shared set for the batch (`"union"`) the set
grows toward the whole MLP. This times `SparseMLP` in predictor mode (int8 gate+up predictor,
top-k, the decode path) against the dense MLP for batches 1-16, interleaved in the same run, on
one MLP of SmolLM2-135M (576 -> 1536) and of Llama-7B (4096 -> 11008) with random weights (speed
does not depend on the weights; the union's density does, so it is measured on random inputs and
reported, and it is an upper bound of a real model's, whose tokens share more neurons).

    python bench/sparse_batch_study.py [--quick] [--out bench/sparse_batch_study.json]

Writes the table and, per shape and sparsity, the largest batch at which the sparse MLP is still
faster than dense (`break_even`); `SparseMLP(dense_above=...)` is the runtime switch that falls
back to dense above a batch size.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402

from fastllm.nn import QuantizedPredictor, SparseMLP  # noqa: E402

SHAPES = [("smollm2 576x1536", 576, 1536), ("llama7b 4096x11008", 4096, 11008)]


class GatedMLP(nn.Module):
    def __init__(self, d: int, n: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, n, bias=False)
        self.up_proj = nn.Linear(d, n, bias=False)
        self.down_proj = nn.Linear(n, d, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def study(device: str, quick: bool, shapes=None, batches=None) -> dict:
    batches = batches or ([1, 2, 4, 8] if quick else [1, 2, 4, 8, 16])
    shapes = shapes or (SHAPES[:1] if quick else SHAPES)
    rows = []
    for label, d, n in shapes:
        torch.manual_seed(0)
        mlp = GatedMLP(d, n).to(device).eval()
        predictor = QuantizedPredictor.from_weights(mlp.up_proj.weight.detach(),
                                                    mlp.gate_proj.weight.detach(), group=64)
        for sparsity in (0.5, 0.8):
            keep = int(round((1 - sparsity) * n))
            per_row = SparseMLP(mlp, mode="predictor", keep=keep, predictor=predictor,
                                dense_above=None, batch_sets="per_row")
            union = SparseMLP(mlp, mode="predictor", keep=keep, predictor=predictor,
                              dense_above=None, batch_sets="union")
            for batch in batches:
                x = torch.randn(batch, d, device=device)
                with torch.no_grad():
                    union(x)
                    density = float(union.last_density)
                    timing = harness.time_interleaved(
                        {"dense": lambda: mlp(x), "per_row": lambda: per_row(x),
                         "union": lambda: union(x)}, device, repeats=5 if quick else 9)
                row = {"shape": label, "sparsity": sparsity, "batch": batch,
                       "dense_ms": timing["dense"] * 1e3,
                       "per_row_ms": timing["per_row"] * 1e3, "union_ms": timing["union"] * 1e3,
                       "per_row_speedup": timing["dense"] / timing["per_row"],
                       "union_speedup": timing["dense"] / timing["union"],
                       "union_density": density}
                rows.append(row)
                print(f"{label} s={sparsity:.0%} B={batch}: per-row {row['per_row_speedup']:.2f}x"
                      f", union {row['union_speedup']:.2f}x (density {density:.2f}) vs dense",
                      flush=True)
    break_even = {}
    for label, _, _ in shapes:
        for sparsity in (0.5, 0.8):
            mine = [r for r in rows if r["shape"] == label and r["sparsity"] == sparsity]
            best = max([r["batch"] for r in mine
                        if max(r["per_row_speedup"], r["union_speedup"]) > 1.0], default=0)
            break_even[f"{label} s={sparsity:.0%}"] = best
    return {"device": device, "machine": harness.machine_name(device),
            "torch_threads": torch.get_num_threads(), "commit": harness.git_commit(),
            "rows": rows, "break_even": break_even}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on the CPU (bench_sparse.py's setting: 1)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).with_suffix(".json")))
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    result = study(args.device, args.quick)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("largest batch where the sparse MLP beats dense:", result["break_even"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
