"""How good can a cheap neuron predictor be on SmolLM2-135M? (issue 5, predictor quality)

Fits factored predictors (``fastllm.sparse.train_predictors``, closed form) once at a large
rank on the first ``--calib`` tokens of a text, truncates them to smaller ranks (the rank-r fit
is the first r singular directions of the rank-R one, so truncation equals refitting), and
reports for each rank, on a disjoint held-out part of the text: the predictor's cost as a share
of the MLP's multiply-adds, its top-k recall against the oracle top-k by |silu(gate) * up| per
sparsity, and perplexity with every MLP in predictor mode (masked compute: the same selection as
the kernel). Dense, oracle, the int8 predictors (``kind="quantized"``, one row per ``--int8-groups``
entry) and the old Deja Vu-style BCE predictor are rows of the same table.

    python bench/sparse_predictor_study.py --text /path/tinyshakespeare.txt --calib 32768

Writes a JSON file (``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import torch

import fastllm.sparse as sparse

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(text_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import SMOLLM2_GGUF, smollm2_dir
    import transformers
    path = smollm2_dir()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
    return model, tokenizer, pathlib.Path(text_path).read_text()


def perplexity(model, ids):
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=ids, use_cache=False).loss.item())


def truncated(preds: sparse.Predictors, rank: int) -> sparse.Predictors:
    from fastllm.nn import FactoredPredictor
    layers = torch.nn.ModuleList()
    for p in preds.layers:
        q = FactoredPredictor(p.down.in_features, p.n_neurons, rank, p.activation)
        with torch.no_grad():
            q.down.weight.copy_(p.down.weight[:rank])
            q.up.weight.copy_(p.up.weight[:, :rank])
            q.up.bias.copy_(p.up.bias)
        layers.append(q)
    return sparse.Predictors(layers, preds.identity, rank, preds.lookahead, preds.label_share,
                             [], preds.kind)


def recall_vs_oracle(model, preds, ids, sparsities):
    """Mean over layers and held-out tokens of |top-k(pred) & top-k(|h|)| / k."""
    def hits(i, view, x):
        with torch.no_grad():
            scores, h = preds.layers[i](x), view.dense_hidden(x).abs()
            out = []
            for s in sparsities:
                keep = int(round((1 - s) * view.n_neurons))
                mask = torch.zeros_like(h, dtype=torch.bool).scatter_(
                    1, h.topk(keep, -1).indices, True)
                out.append(mask.gather(1, scores.topk(keep, -1).indices).float().mean().item())
            return out
    per_layer = sparse.collect_mlp_data(model, ids, hits)
    layer_means = [[sum(c[j] for c in chunks) / len(chunks) for j in range(len(sparsities))]
                   for chunks in per_layer]
    return {s: sum(l[j] for l in layer_means) / len(layer_means) for j, s in enumerate(sparsities)}, \
        [l[sparsities.index(0.5)] if 0.5 in sparsities else None for l in layer_means]


def ppl_at(model, ids, preds, sparsity, mode="predictor"):
    sparse.sparsify(model, sparsity, mode=mode, predictors=preds, dense_above=None,
                    compute="masked")
    try:
        return perplexity(model, ids)
    finally:
        sparse.densify(model)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default=str(ROOT / "tests/data/tinyshakespeare_200k.txt"))
    ap.add_argument("--calib", type=int, default=16384, help="calibration tokens")
    ap.add_argument("--eval", type=int, default=1024, help="held-out tokens")
    ap.add_argument("--ranks", default="32,64,96,104,128,192,288,576")
    ap.add_argument("--sparsities", default="0.3,0.4,0.5,0.6,0.7")
    ap.add_argument("--ppl-ranks", default="104,192,576", help="ranks with a full ppl sweep")
    ap.add_argument("--allocate", default="", help="ranks to try per-layer sparsity at 50%%")
    ap.add_argument("--lowrank", action="store_true", help="also the BCE low-rank predictor")
    ap.add_argument("--int8-groups", default="64,576",
                    help="scale group sizes of the int8 predictors ('' for none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/sparse_predictor_study.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, text = load(args.text)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    seq = 256
    calib = ids[: args.calib // seq * seq].reshape(-1, seq)
    held_start = int(ids.numel() * 0.8)  # the held-out text starts after 80% of the file
    assert held_start >= calib.numel(), "calibration and held-out text overlap"
    held = ids[held_start: held_start + args.eval // seq * seq].reshape(-1, seq)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    ppl_ranks = [int(r) for r in args.ppl_ranks.split(",")]
    d, n = model.config.hidden_size, model.config.intermediate_size
    res = {"calibration_tokens": calib.numel(), "heldout_tokens": held.numel(),
           "text": pathlib.Path(args.text).name, "rows": []}
    dense = perplexity(model, held)
    res["dense_ppl"] = dense
    print(f"dense ppl {dense:.3f} on {held.numel()} held-out tokens", flush=True)

    def row(name, cost, rec, ppls, extra=None):
        r = {"predictor": name, "cost_share": cost, "recall": rec,
             "ppl_ratio": {s: p / dense for s, p in ppls.items()}, **(extra or {})}
        res["rows"].append(r)
        print(json.dumps(r), flush=True)

    row("oracle", None, None, {s: ppl_at(model, held, None, s, "oracle") for s in sparsities})
    t0 = time.perf_counter()
    full = sparse.train_predictors(model, calib, kind="factored", rank=max(ranks),
                                   progress=False)
    fit_s = time.perf_counter() - t0
    res["fit_seconds_max_rank"] = fit_s
    for r in ranks:
        preds = truncated(full, r)
        rec, per_layer = recall_vs_oracle(model, preds, held, sparsities)
        ss = sparsities if r in ppl_ranks else [0.5]
        row(f"factored r={r}", sparse.predictor_cost("factored", d, n, r), rec,
            {s: ppl_at(model, held, preds, s) for s in ss}, {"recall_per_layer@0.5": per_layer})
    for r in [int(v) for v in args.allocate.split(",") if v]:
        preds = truncated(full, r)
        for error in ("relative", "absolute"):
            per_layer = sparse.allocate_sparsity(model, preds, calib[:8], 0.5, error=error)
            row(f"factored r={r}, per-layer sparsity ({error} error)",
                sparse.predictor_cost("factored", d, n, r), None,
                {0.5: ppl_at(model, held, preds, per_layer)}, {"per_layer_sparsity": per_layer})
    for group in [int(g) for g in args.int8_groups.split(",") if g]:
        preds = sparse.train_predictors(model, calib[:4], kind="quantized", group=group,
                                        progress=False)
        rec, per_layer = recall_vs_oracle(model, preds, held, sparsities)
        bytes_share = 2 * (1 + 4 / group) / (3 * 4)  # of the fp32 MLP's weight bytes
        row(f"int8 gate+up, group {group}", sparse.predictor_cost("quantized", d, n, 0), rec,
            {s: ppl_at(model, held, preds, s) for s in sparsities},
            {"recall_per_layer@0.5": per_layer, "bytes_share_fp32": bytes_share,
             "bytes_share_fp16": 2 * bytes_share})
    if args.lowrank:
        t0 = time.perf_counter()
        preds = sparse.train_predictors(model, calib, kind="lowrank", rank=128, epochs=10,
                                        progress=False)
        rec, per_layer = recall_vs_oracle(model, preds, held, sparsities)
        row("lowrank BCE r=128 (Deja Vu)", sparse.predictor_cost("lowrank", d, n, 128), rec,
            {0.5: ppl_at(model, held, preds, 0.5)},
            {"fit_seconds": time.perf_counter() - t0, "recall_per_layer@0.5": per_layer})
    pathlib.Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
