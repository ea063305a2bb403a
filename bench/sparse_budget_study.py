"""Which neuron selection fits the GPU byte budget? (issue 16, "a predictor that fits the byte budget")

The default predictor for gated MLPs (int8 gate+up scores) reads a third of an fp16 MLP's bytes
before any sparse row. This study compares cheaper selections on SmolLM2-135M-Instruct (fp32,
CPU, masked compute: the same selection as the kernel):

  - ``oracle``: top-k by the true |silu(gate) * up| (quality bound; not realizable);
  - ``threshold``: the existing CATS-style mode, gate dense, per-layer |silu(gate)| thresholds
    calibrated on the calibration text;
  - ``gate fp16/32 top-k``: top-k by the exact |silu(gate)| (gate dense; isolates what
    quantizing the gate costs);
  - ``int8 gate+up`` (group 64, the current default), ``int4 gate+up`` (group 32),
    ``int8 gate`` (group 64), ``int4 gate`` (group 32): :func:`fastllm.sparse.quantize_predictors`
    with ``bits`` / ``score``.

For each: top-k recall against the oracle top-k, perplexity at 30/50/70% on the tuning text
(the first ``--eval`` tokens of the calibration text, which set the thresholds) and on held-out
text (``--eval`` tokens starting at 90% of the file: a part no earlier study evaluated on, fixed
before any result of this study was seen), and bytes per token as a share of the dense MLP's
(predictor bytes + the kept neurons' gate, up and down rows), for fp16 and fp32 weights; and the
bytes-model speed-up ``dense bytes / (predictor bytes + rows bytes)``. int4 codes are counted
at half a byte: the op reads them packed two per byte (they were scored one per int8 byte when
the figures were measured; the packed path gives the same scores, tests/test_sparse_packed_int4.py).

    python bench/sparse_budget_study.py --out bench/sparse_budget_study.json
    python bench/sparse_budget_study.py --rebytes   # bytes and choice only, from the saved JSON
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastllm.sparse as sparse
from fastllm.nn import SparseMLP

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from sparse_predictor_study import load, perplexity, recall_vs_oracle  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (bits, score, group, input_keep) of the quantized selections compared.
QUANTIZED = ((8, "gate_up", 64, None), (4, "gate_up", 32, None), (8, "gate", 64, None),
             (4, "gate", 32, None), (8, "gate_up", 64, 0.5), (8, "gate_up", 64, 0.25),
             (4, "gate_up", 32, 0.5))
BYTES_NOTE = (
    "share of the dense MLP's weight bytes per token (3dn weights at 2 B fp16 / 4 B fp32): "
    "predictor bytes (quantized weights at bits/8 B, int4 packed two per byte as the op reads "
    "them, + fp32 scale per group; the threshold mode and the gate top-k reference read the dense "
    "gate, 1/3) + rows read (1 - sparsity of gate, up and down; for threshold the realized "
    "density). With input_keep the plain fields assume a column-gather kernel that does not "
    "exist; 'total_as_stored' / 'bytes_model_speedup_as_stored' are what the op reads (every "
    "input column)")
CHOICE_NOTE = ("as_stored: bytes the op reads from today's storage (int8, or int4 packed two per "
               "byte; every input column read even with input_keep); packed: also counting a "
               "column-gather kernel (not written) for input_keep")


def row_name(bits, score, group, keep):
    name = f"int{bits} {score.replace('_', '+')} (group {group})"
    if keep is not None:
        name += f", top {keep:.0%} input channels by |x|*col norm (WINA)"
    return name


def quantized_bytes(d, n, bits, score, group, keep):
    """(model shares, as-stored shares or None) for fp16 and fp32 weights."""
    share = tuple(sparse.predictor_bytes_share(d, n, bits=bits, score=score, group=group,
                                               weight_bytes=w, input_keep=keep) for w in (2, 4))
    stored = None if keep is None else tuple(
        sparse.predictor_bytes_share(d, n, bits=bits, score=score, group=group, weight_bytes=w,
                                     as_stored=True) for w in (2, 4))
    return share, stored


def bytes_entry(pred_share16, pred_share32, density, note=None, as_stored=None):
    out = {}
    for name, share in (("fp16", pred_share16), ("fp32", pred_share32)):
        total = share + density
        out[name] = {"predictor": share, "rows": density, "total": total,
                     "bytes_model_speedup": 1 / total}
    if as_stored is not None:  # what the op reads where it differs (input_keep: every column)
        for name, share in zip(("fp16", "fp32"), as_stored):
            out[name]["total_as_stored"] = share + density
            out[name]["bytes_model_speedup_as_stored"] = 1 / (share + density)
    if note:
        out["note"] = note
    return out


def choose(res):
    """Per weight dtype: best bytes-model speed-up at 50% with held-out ppl ratio <= 1.05."""
    choice = {}
    for dt in ("fp16", "fp32"):
        for key, label in (("bytes_model_speedup_as_stored", "as_stored"),
                           ("bytes_model_speedup", "packed")):
            best = None
            for r in res["rows"]:
                b = r["bytes_share"]
                if b is None or r["ppl_ratio"]["heldout"][_key(r["ppl_ratio"]["heldout"])] > 1.05:
                    continue
                e = b["heldout"][_key(b["heldout"])] if "heldout" in b else b[_key(b)]
                sp = e[dt].get(key, e[dt]["bytes_model_speedup"])
                if best is None or sp > best[1]:
                    best = (r["selection"], sp, r["ppl_ratio"]["heldout"][_key(
                        r["ppl_ratio"]["heldout"])])
            choice[f"{dt}, {label}"] = best
    return choice


def _key(by_sparsity):
    # 0.5 in a fresh result, "0.5" once it went through JSON
    return 0.5 if 0.5 in by_sparsity else "0.5"


class GateTopK(nn.Module):
    """|act(x W_gate^T)| from the dense gate (reference for the gate-only scores)."""

    def __init__(self, view):
        super().__init__()
        self.w, self.b, self.act = view.gate_w, view.gate_b, view._act

    def magnitude(self, x):
        return self.act(F.linear(x, self.w, self.b)).abs().float()

    def forward(self, x):
        return torch.log(self.magnitude(x) + 1e-12)


def ppl_and_density(model, ids, sparsity, mode, preds=None, thresholds=None):
    sparse.sparsify(model, sparsity, mode=mode, predictors=preds, thresholds=thresholds,
                    dense_above=None, compute="masked")
    try:
        ppl = perplexity(model, ids)
        dens = [m.last_density for m in model.modules() if isinstance(m, SparseMLP)]
        return ppl, sum(dens) / len(dens)
    finally:
        sparse.densify(model)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default=str(ROOT / "tests/data/tinyshakespeare_200k.txt"))
    ap.add_argument("--calib", type=int, default=4096, help="calibration tokens (thresholds)")
    ap.add_argument("--eval", type=int, default=1024, help="tokens per evaluated text")
    ap.add_argument("--sparsities", default="0.3,0.5,0.7")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).with_suffix(".json")))
    ap.add_argument("--confirm", type=int, default=0,
                    help="only re-check the two gate+up widths at 50%% on this many held-out "
                         "tokens (from the same start) and add them to the existing --out JSON")
    ap.add_argument("--rebytes", action="store_true",
                    help="recompute only the bytes and the choice in the existing --out JSON "
                         "(no model run): for a change in storage, not in the scores")
    args = ap.parse_args()
    if args.rebytes:
        return rebytes(pathlib.Path(args.out))
    if args.confirm:
        return confirm(args)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model, tokenizer, text = load(args.text)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    seq = 256
    calib = ids[: args.calib // seq * seq].reshape(-1, seq)
    tuning = calib.reshape(-1)[: args.eval // seq * seq].reshape(-1, seq)
    held_start = int(ids.numel() * 0.9)  # fixed before any result: no study evaluated here
    assert held_start >= calib.numel(), "calibration and held-out text overlap"
    held = ids[held_start: held_start + args.eval // seq * seq].reshape(-1, seq)
    texts = {"tuning": tuning, "heldout": held}
    sparsities = [float(s) for s in args.sparsities.split(",")]
    views = [sparse._make_view(s) for s in sparse.find_mlps(model)]
    d, n = views[0].up_w.shape[1], views[0].n_neurons
    identity = sparse._model_identity(model)
    res = {"model": "SmolLM2-135M-Instruct (GGUF, fp32, CPU)", "text": pathlib.Path(args.text).name,
           "tokens_in_file": ids.numel(), "calibration_tokens": calib.numel(),
           "tuning_text": f"tokens 0..{tuning.numel()} (inside the calibration text)",
           "heldout_text": f"tokens {held_start}..{held_start + held.numel()} (starts at 90% of "
                           "the file; chosen before looking at results; earlier studies used "
                           "1024 tokens at 80%)",
           "compute": "masked (same selection as the kernel); every MLP sparse, every token",
           "threads": args.threads, "d": d, "n": n, "sparsities": sparsities,
           "dense_ppl": {k: perplexity(model, v) for k, v in texts.items()}, "rows": []}
    print(json.dumps(res["dense_ppl"]), flush=True)

    def add_row(name, recall, ppls, bytes_by_s, extra=None):
        r = {"selection": name, "recall": recall,
             "ppl_ratio": {t: {s: p / res["dense_ppl"][t] for s, p in v.items()}
                           for t, v in ppls.items()},
             "bytes_share": bytes_by_s, **(extra or {})}
        res["rows"].append(r)
        print(json.dumps(r), flush=True)

    # oracle
    ppls = {t: {s: ppl_and_density(model, v, s, "oracle")[0] for s in sparsities}
            for t, v in texts.items()}
    add_row("oracle (true |h| top-k; not realizable)", {t: {s: 1.0 for s in sparsities}
                                                        for t in texts}, ppls, None)

    # threshold (existing mode): calibrated on the calibration text
    mags = sparse.gate_magnitudes(model, calib)
    ppls, dens = {}, {}
    for t, v in texts.items():
        ppls[t], dens[t] = {}, {}
        for s in sparsities:
            th = sparse.thresholds_from_magnitudes(mags, s)
            ppls[t][s], dens[t][s] = ppl_and_density(model, v, s, "threshold", thresholds=th)
    del mags
    add_row("threshold |silu(gate)| (CATS, gate dense; existing mode)", None, ppls,
            {t: {s: bytes_entry(1 / 3, 1 / 3, dens[t][s],
                                "gate read densely (1/3) + kept gate/up/down rows (the kernel "
                                "re-reads the kept gate rows; reusing them would save "
                                f"{dens[t][s] / 3:.3f})") for s in sparsities}
             for t in texts}, {"realized_density": dens})

    def quantized_row(name, preds, pred16, pred32, as_stored=None):
        rec = {t: recall_vs_oracle(model, preds, v, sparsities)[0] for t, v in texts.items()}
        ppls = {t: {s: ppl_and_density(model, v, s, "predictor", preds)[0] for s in sparsities}
                for t, v in texts.items()}
        add_row(name, rec, ppls, {s: bytes_entry(pred16, pred32, 1 - s, as_stored=as_stored)
                                  for s in sparsities})

    gate_preds = sparse.Predictors(nn.ModuleList(GateTopK(v) for v in views), identity, 0,
                                   kind="study")
    quantized_row("gate top-k, dense gate weights (reference)", gate_preds, 1 / 3, 1 / 3)
    for bits, score, group, keep in QUANTIZED:
        preds = sparse.quantize_predictors(model, None, bits=bits, score=score, group=group,
                                           input_keep=keep, progress=False)
        share, stored = quantized_bytes(d, n, bits, score, group, keep)
        quantized_row(row_name(bits, score, group, keep), preds, share[0], share[1], stored)

    # Defaults: best bytes-model speed-up at 50% with held-out ppl <= +5%, per weight dtype.
    choice = choose(res)
    res["best_at_50pct_heldout_le_1.05"] = choice
    res["choice_note"] = CHOICE_NOTE
    res["seconds"] = time.perf_counter() - t_start
    print(json.dumps(choice, indent=1))
    pathlib.Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


def rebytes(path: pathlib.Path) -> None:
    """Bytes of every quantized row and the per-dtype choice, from the saved figures: the storage
    changed (int4 packed) but not the scores, so recall and perplexity stand as measured."""
    res = json.loads(path.read_text())
    d, n = res["d"], res["n"]
    rows = {r["selection"]: r for r in res["rows"]}
    for bits, score, group, keep in QUANTIZED:
        r = rows[row_name(bits, score, group, keep)]
        share, stored = quantized_bytes(d, n, bits, score, group, keep)
        r["bytes_share"] = {s: bytes_entry(share[0], share[1], 1 - float(s), as_stored=stored)
                            for s in r["bytes_share"]}
    res["note"]["bytes"] = BYTES_NOTE
    res["note"]["default_rule"] = (
        "per dtype, the selection with the best bytes-model speed-up at 50% among those with "
        "held-out ppl ratio <= 1.05 at 50%, with the bytes the op reads (as_stored): int4 gate+up "
        "(group 32, packed two per byte) for fp32 and fp16/bf16 (fp16 1.41x vs int8 gate+up's "
        "1.17x, fp32 1.66x vs 1.48x) at held-out +4.8% (2048 tokens: +4.8%, int8 +4.3%, oracle "
        "+4.6%). The figures were measured with int4 codes stored one per int8 byte; the packed "
        "op gives the same scores (bit for bit on the CPU), so only the bytes were recomputed "
        "(--rebytes)")
    res["choice_note"] = CHOICE_NOTE
    res["best_at_50pct_heldout_le_1.05"] = choose(res)
    print(json.dumps(res["best_at_50pct_heldout_le_1.05"], indent=1))
    path.write_text(json.dumps(res, indent=1) + "\n")


def confirm(args):
    """Dense, oracle, int8 and int4 gate+up at 50% on a longer held-out text (same start)."""
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model, tokenizer, text = load(args.text)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    seq = 256
    held_start = int(ids.numel() * 0.9)
    held = ids[held_start: held_start + args.confirm // seq * seq].reshape(-1, seq)
    dense = perplexity(model, held)
    out = {"heldout_text": f"tokens {held_start}..{held_start + held.numel()}",
           "dense_ppl": dense, "ppl_ratio@0.5": {}}
    out["ppl_ratio@0.5"]["oracle"] = ppl_and_density(model, held, 0.5, "oracle")[0] / dense
    for bits, group in ((8, 64), (4, 32)):
        preds = sparse.quantize_predictors(model, None, bits=bits, score="gate_up", group=group,
                                           progress=False)
        out["ppl_ratio@0.5"][f"int{bits} gate+up (group {group})"] = ppl_and_density(
            model, held, 0.5, "predictor", preds)[0] / dense
        print(json.dumps(out), flush=True)
    out["seconds"] = time.perf_counter() - t_start
    path = pathlib.Path(args.out)
    res = json.loads(path.read_text())
    res[f"confirm_heldout_{held.numel()}"] = out
    path.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
