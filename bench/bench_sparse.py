"""Deja Vu sparse MLP: speed of sparse_mlp against the dense MLP, end-to-end decode, and quality.

Speed: one MLP of SmolLM2-135M (576 -> 1536, SiLU-gated) and of Llama-7B (4096 -> 11008) at MLP
sparsity 50/80/90%, batch 1 and 4 (one shared set, and per-row sets), timed interleaved against
the dense MLP (three F.linear calls, torch's BLAS). "sparse+pred" includes the factored predictor
and the top-k; "sparse+int8 pred" the quantized predictor (int8 gate and up, group 64) and the
top-k; "sparse+int4 pred (default)" the default quantized predictor (packed int4 gate and up,
group 32) and the top-k; "sparse" is the kernel alone; all timed in the same interleave. The ideal speedup is
1 / (1 - sparsity) (the weight bytes read); GB/s counts the weight bytes the kernel reads.

Predictor scoring: the packed-int4 path of quantized_neuron_scores (gate+up, group 32, two codes
per byte) against the int8 path (group 64) on the same x, interleaved, at the same MLP shapes,
batch 1 and 4: the ratio is what halving the codes' bytes buys.

Decode: tokens/s of SmolLM2 greedy decoding with every MLP sparse at 50% (factored predictors,
and int8 predictors) against the dense model, same run.

Quality: SmolLM2 perplexity on held-out tiny-shakespeare against MLP sparsity 30-90% for the
oracle (each token's top |silu(gate) * up|), threshold (CATS-style |silu(gate)| per layer) and
predictor modes (factored and int8 predictors); predictors and thresholds are fitted on an earlier, disjoint part of the text.
Quality rows carry the wall time of the evaluation pass (masked compute) in the ms columns: they
are not speed results. Perplexities, recall and a plot go to sparse_quality.json / .png.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

import fastllm.ops as ops
import fastllm.sparse as sparse
from fastllm.nn import FactoredPredictor, QuantizedPredictor

from harness import (RESULTS_DIR, Progress, Record, Rotating, copy_bandwidth_gbs, git_commit,
                     machine_name, time_interleaved)

CAPABILITY = "sparse"
SHAPES = [("smollm2 576x1536", 576, 1536), ("llama7b 4096x11008", 4096, 11008)]


def _speed(device: str, quick: bool, progress: Progress, shapes=SHAPES) -> list[Record]:
    dtype = torch.float16 if device == "cuda" else torch.float32
    records = []
    ceiling = copy_bandwidth_gbs(device)
    for label, d, n in shapes:
        rank = sparse.default_rank("factored", d, n)  # the library default: <= 15% of the MLP
        torch.manual_seed(0)
        w_gate = torch.randn(n, d, device=device, dtype=dtype) / d ** 0.5
        w_up = torch.randn(n, d, device=device, dtype=dtype) / d ** 0.5
        w_down = torch.randn(d, n, device=device, dtype=dtype) / n ** 0.5
        w_down_t = w_down.t().contiguous()
        pred = FactoredPredictor(d, n, rank).to(device=device, dtype=dtype)
        int8_pred = QuantizedPredictor.from_weights(w_up, w_gate, group=64)
        # The default predictor (default_quantized_selection): int4 gate+up, group 32, packed.
        int4_pred = QuantizedPredictor.from_weights(w_up, w_gate, group=32, bits=4)
        # Batch 8 on the GPU (where the union of active neurons starts to cost); the CPU keeps
        # its earlier cases so its records stay comparable.
        batches = [(1, False), (4, False), (4, True)] + ([(8, False)] if device == "cuda" else [])
        for rows, per_row in batches:
            x = torch.randn(rows, d, device=device, dtype=dtype)
            for s in (0.5, 0.8, 0.9):
                keep = int(round((1 - s) * n))
                if per_row:
                    idx = torch.stack([torch.randperm(n, device=device)[:keep]
                                       for _ in range(rows)]).to(torch.int32)
                else:
                    idx = torch.randperm(n, device=device)[:keep].to(torch.int32)

                def dense():
                    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)

                def kernel():
                    return ops.sparse_mlp(x, w_up, w_down_t, idx, w_gate=w_gate)

                def with_predictor():
                    with torch.no_grad():
                        top = pred.magnitude(x).topk(keep, dim=-1, sorted=False).indices
                    sel = top if per_row else top[0]
                    return ops.sparse_mlp(x, w_up, w_down_t, sel, w_gate=w_gate)

                def quantized_predictor(p):
                    def run_it():
                        top = p.magnitude(x).topk(keep, dim=-1, sorted=False).indices
                        sel = top if per_row else top[0]
                        return ops.sparse_mlp(x, w_up, w_down_t, sel, w_gate=w_gate)
                    return run_it

                t = time_interleaved({"dense": dense, "kernel": kernel, "pred": with_predictor,
                                      "int8": quantized_predictor(int8_pred),
                                      "int4": quantized_predictor(int4_pred)},
                                     device, repeats=5 if quick else 15)
                weight_bytes = 3 * keep * d * w_up.element_size() * (rows if per_row else 1)
                gbs = weight_bytes / t["kernel"] / 1e9
                ideal = 1 / (1 - s)
                case = f"{label} B={rows}{' per-row' if per_row else ''} s={s:.0%}"
                records.append(Record(CAPABILITY, case, "sparse+pred", "dense MLP",
                                      t["pred"] * 1e3, t["dense"] * 1e3, {
                                          "kernel-only x": t["dense"] / t["kernel"],
                                          "ideal x": ideal,
                                          "of ideal": t["dense"] / t["pred"] / ideal,
                                          "GB/s": gbs, "% copy BW": 100 * gbs / ceiling}))
                # Quantized predictors' bytes: their codes and fp32 scales as the op reads them.
                for key, ours, p in (("int8", "sparse+int8 pred", int8_pred),
                                     ("int4", "sparse+int4 pred (default)", int4_pred)):
                    records.append(Record(CAPABILITY, case, ours, "dense MLP",
                                          t[key] * 1e3, t["dense"] * 1e3, {
                                              "ideal x": ideal,
                                              "of ideal": t["dense"] / t[key] / ideal,
                                              "bytes read / dense":
                                                  (p.weight_bytes(as_stored=True) + weight_bytes)
                                                  / (3 * n * d * w_up.element_size())}))
                progress.step(f"{case}: {t['dense'] / t['pred']:.2f}x with predictor, "
                              f"{t['dense'] / t['int8']:.2f}x with int8 predictor, "
                              f"{t['dense'] / t['int4']:.2f}x with int4 predictor, "
                              f"{t['dense'] / t['kernel']:.2f}x kernel only (ideal {ideal:.1f}x)")
    return records


def streamed(device: str, quick: bool, progress: Progress, layers: int = 30,
             shape=SHAPES[0]) -> list[Record]:
    """SmolLM2's MLP as decode meets it: one call per layer over `layers` layers of weights (the
    real model has 30), so no call finds its layer's weights in cache, against the dense MLP over
    the same layers, interleaved. One layer repeated (_speed) keeps SmolLM2's 10.6 MB MLP in a
    32 MB last-level cache, which flatters both sides and weighs the predictor's compute, not its
    bytes. The sparse side is the default selection: int4 gate+up scores, top-k, sparse_mlp."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    label, d, n = shape
    torch.manual_seed(0)
    stack = []
    for _ in range(layers):
        w_gate = torch.randn(n, d, device=device, dtype=dtype) / d ** 0.5
        w_up = torch.randn(n, d, device=device, dtype=dtype) / d ** 0.5
        w_down = torch.randn(d, n, device=device, dtype=dtype) / n ** 0.5
        stack.append((w_gate, w_up, w_down, w_down.t().contiguous(),
                      QuantizedPredictor.from_weights(w_up, w_gate, group=32, bits=4)))
    x = torch.randn(1, d, device=device, dtype=dtype)
    records = []
    for s in (0.5, 0.8, 0.9):
        keep = int(round((1 - s) * n))
        dense_ring, sparse_ring = Rotating(stack), Rotating(stack)

        def dense():
            w_gate, w_up, w_down, _, _ = dense_ring.next()
            return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)

        def with_int4_predictor():
            w_gate, w_up, _, w_down_t, p = sparse_ring.next()
            top = p.magnitude(x).topk(keep, dim=-1, sorted=False).indices[0]
            return ops.sparse_mlp(x, w_up, w_down_t, top, w_gate=w_gate)

        t = time_interleaved({"dense": dense, "int4": with_int4_predictor}, device,
                             repeats=5 if quick else 15)
        dense_bytes = 3 * n * d * stack[0][0].element_size()
        read = stack[0][4].weight_bytes(as_stored=True) + 3 * keep * d * stack[0][0].element_size()
        case = f"{label} B=1 s={s:.0%} streamed over {layers} layers"
        records.append(Record(CAPABILITY, case, "sparse+int4 pred (default)", "dense MLP",
                              t["int4"] * 1e3, t["dense"] * 1e3, {
                                  "bytes read / dense": read / dense_bytes,
                                  "bytes-model x": dense_bytes / read,
                                  "dense GB/s": dense_bytes / t["dense"] / 1e9,
                                  "sparse GB/s": read / t["int4"] / 1e9}))
        progress.step(f"{case}: {t['dense'] / t['int4']:.2f}x dense with the int4 predictor "
                      f"(bytes model {dense_bytes / read:.2f}x)")
    return records


def scoring(device: str, quick: bool, progress: Progress, shapes=SHAPES,
            batches=(1, 4)) -> list[Record]:
    """Packed-int4 scores against int8 scores (the op alone), interleaved in one run."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    records = []
    for label, d, n in shapes:
        torch.manual_seed(0)
        w_up = torch.randn(n, d, device=device) / d ** 0.5
        w_gate = torch.randn(n, d, device=device) / d ** 0.5
        preds = {bits: QuantizedPredictor.from_weights(w_up, w_gate, group=64 if bits == 8 else 32,
                                                       bits=bits) for bits in (8, 4)}
        for rows in batches:
            x = torch.randn(rows, d, device=device, dtype=dtype)
            t = time_interleaved({bits: (lambda p=p: p.magnitude(x)) for bits, p in preds.items()},
                                 device, repeats=5 if quick else 15)
            nbytes = {bits: p.weight_bytes(as_stored=True) for bits, p in preds.items()}
            records.append(Record(CAPABILITY, f"scores {label} B={rows}", "int4 packed scores",
                                  "int8 scores", t[4] * 1e3, t[8] * 1e3, {
                                      "bytes int4 / int8": nbytes[4] / nbytes[8],
                                      "GB/s int4": nbytes[4] / t[4] / 1e9,
                                      "GB/s int8": nbytes[8] / t[8] / 1e9}))
            progress.step(f"scores {label} B={rows}: int4 {t[8] / t[4]:.2f}x int8 "
                          f"(bytes {nbytes[4] / nbytes[8]:.2f})")
    return records


def _load_smollm2():
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tests"))
    from conftest import DATA_DIR, SMOLLM2_GGUF, smollm2_dir
    import transformers
    path = smollm2_dir()
    if path is None:
        return None
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
    text = (DATA_DIR / "tinyshakespeare_200k.txt").read_text()
    return model, tokenizer, text


def _perplexity(model, ids) -> float:
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=ids, use_cache=False).loss.item())


def _quality_and_decode(device: str, quick: bool, progress: Progress, out_dir) -> list[Record]:
    loaded = _load_smollm2()
    if loaded is None:
        print("   SmolLM2 not installed: quality and decode skipped", flush=True)
        return []
    model, tokenizer, text = loaded
    model.to(device)
    seq = 256
    # Calibration from the first 60% of the text, evaluation from the last 40%: disjoint.
    cut = int(len(text) * 0.6)
    calib = tokenizer(text[:cut], return_tensors="pt").input_ids[0]
    held = tokenizer(text[cut:], return_tensors="pt").input_ids[0]
    n_cal, n_eval = (16, 2) if quick else (64, 4)  # factored predictors: more tokens cost only time
    calib_ids = calib[: n_cal * seq].reshape(n_cal, seq).to(device)
    eval_ids = held[: n_eval * seq].reshape(n_eval, seq).to(device)

    t0 = time.perf_counter()
    # The library defaults: factored predictors of rank <= 15% of the MLP, fitted in closed form.
    preds = sparse.train_predictors(model, calib_ids, kind="factored", eval_sparsity=0.5,
                                    progress=True)
    train_s = time.perf_counter() - t0
    # The int8 predictors: no fit, the calibration tokens only set the logit offsets.
    int8_preds = sparse.train_predictors(model, calib_ids[:4], kind="quantized", bits=8,
                                         group=64, eval_sparsity=0.5, progress=False)
    # The default quantized predictors (default_quantized_selection: int4 gate+up, group 32).
    int4_preds = sparse.train_predictors(model, calib_ids[:4], kind="quantized",
                                         eval_sparsity=0.5, progress=False)
    predictor_sets = {"predictor": preds, "predictor int8": int8_preds,
                      "predictor int4": int4_preds}
    # Recall of each predictor's top-k against the oracle top-k on held-out text, per sparsity.
    recall = {name: {} for name in predictor_sets}
    for name, p in predictor_sets.items():
        for s in (0.3, 0.5, 0.7, 0.9):
            keep = int(round((1 - s) * p.identity["n_neurons"]))

            def hit_rate(i, view, x, keep=keep, p=p):
                with torch.no_grad():
                    top_pred = p.layers[i](x).topk(keep, dim=-1).indices
                    top_oracle = view.dense_hidden(x).abs().topk(keep, dim=-1).indices
                    mask = torch.zeros(x.shape[0], view.n_neurons, dtype=torch.bool,
                                       device=x.device)
                    return mask.scatter_(1, top_oracle, True).gather(1, top_pred).float().mean() \
                        .item()

            per_layer = sparse.collect_mlp_data(model, eval_ids, hit_rate)
            recall[name][s] = sum(sum(v) / len(v) for v in per_layer) / len(per_layer)

    records = []
    t0 = time.perf_counter()
    dense = _perplexity(model, eval_ids)
    dense_s = time.perf_counter() - t0
    results = {"dense_ppl": dense, "eval_tokens": eval_ids.numel(),
               "calibration_tokens": calib_ids.numel(), "predictor_rank": preds.rank,
               "predictor_train_s": train_s, "predictor_stats": preds.stats,
               "recall_vs_oracle": recall["predictor"],
               "recall_vs_oracle_int8": recall["predictor int8"],
               "recall_vs_oracle_int4": recall["predictor int4"], "modes": {}}
    magnitudes = sparse.gate_magnitudes(model, calib_ids)
    for name in ("oracle", "threshold", "predictor", "predictor int8", "predictor int4"):
        mode = name.split()[0]
        results["modes"][name] = {}
        for s in (0.3, 0.5, 0.7, 0.9):
            thresholds = sparse.thresholds_from_magnitudes(magnitudes, s)
            sparse.sparsify(model, s, mode=mode, predictors=predictor_sets.get(name),
                            thresholds=thresholds, dense_above=None, compute="masked")
            t0 = time.perf_counter()
            ppl = _perplexity(model, eval_ids)
            sec = time.perf_counter() - t0
            sparse.densify(model)
            results["modes"][name][s] = ppl
            metrics = {"ppl": ppl, "ppl / dense": ppl / dense}
            if name in recall:
                metrics["recall vs oracle"] = recall[name][s]
            records.append(Record(CAPABILITY, f"quality {name} s={s:.0%}", f"ppl {name}",
                                  "ppl dense", sec * 1e3, dense_s * 1e3, metrics))
            progress.step(f"{name} {s:.0%}: ppl x{ppl / dense:.3f}")

    # End-to-end greedy decode, sparse (each predictor kind, 50%) against dense, interleaved.
    prompt = held[:32].reshape(1, 32).to(device)
    new_tokens = 16 if quick else 32

    def generate():
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False)

    # Modules are built once; the timed calls only swap them in and out (no copies).
    installed = {}
    for name, p in predictor_sets.items():
        sparse.sparsify(model, 0.5, mode="predictor", predictors=p)  # prefill dense (default)
        installed[name] = sparse.densify(model)

    def dense_generate():
        sparse.densify(model)
        generate()

    def sparse_generate(name):
        def run_it():
            sparse._reinstall(model, installed[name])
            generate()
        return run_it

    t = time_interleaved({"dense": dense_generate,
                          **{name: sparse_generate(name) for name in installed}}, device,
                         repeats=3 if quick else 5, min_seconds_per_sample=0, warmup=1)
    sparse.densify(model)
    for name in installed:
        records.append(Record(CAPABILITY, f"smollm2 decode {new_tokens} tokens s=50% ({name})",
                              f"sparse ({name})", "dense", t[name] * 1e3, t["dense"] * 1e3,
                              {"tok/s sparse": new_tokens / t[name],
                               "tok/s dense": new_tokens / t["dense"]}))
        progress.step(f"decode {name}: {t['dense'] / t[name]:.2f}x")
    _save_quality(results, device, pathlib.Path(out_dir))
    return records


def _save_quality(results: dict, device: str, out_dir: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{machine_name(device)}-sparse_quality"
    results["commit"] = git_commit()
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, by_s in results["modes"].items():
        xs = sorted(by_s)
        ax.plot([100 * s for s in xs], [by_s[s] / results["dense_ppl"] for s in xs], "o-",
                label=mode)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("MLP sparsity (%)")
    ax.set_ylabel("perplexity / dense")
    ax.set_title(f"SmolLM2-135M, held-out tiny-shakespeare ({results['eval_tokens']} tokens)",
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    plt.close(fig)


def run(device: str, quick: bool = False, out_dir=RESULTS_DIR) -> list[Record]:
    progress = Progress(CAPABILITY, 2 * (4 if device == "cuda" else 3) * 3 + 3 + 2 * 2 + 20 + 3)
    threads = torch.get_num_threads()
    if device == "cpu":
        # The project's CPU machines are small and shared: one thread for both sides gives
        # comparable, repeatable timings (the kernels themselves use at::parallel_for).
        torch.set_num_threads(1)
    try:
        records = _speed(device, quick, progress)
        records += streamed(device, quick, progress)
        records += scoring(device, quick, progress)
    finally:
        torch.set_num_threads(threads)
    records += _quality_and_decode(device, quick, progress, out_dir)
    return records
