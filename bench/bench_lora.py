"""Paged multi-adapter LoRA: kernels, end to end on SmolLM2 next to PEFT, and adapter loading.

1. Kernels on Llama-7B shapes (4096 -> 4096, 4096 -> 11008), decode (one token per sequence):
   lora_shrink and lora_expand against (a) PEFT's strategy, a loop over the batch's distinct
   adapters (gather the sub-batch, matmul, scatter), and (b) a gathered batched matmul (each
   token's adapter weights gathered into a [tokens, r, hidden] tensor, then bmm). Achieved GB/s
   counts the adapter rows read plus activations, against the measured copy bandwidth.
   On CUDA each candidate rotates over enough input sets to overflow L2 (harness.Rotating), so
   GB/s is HBM traffic; timing is by CUDA events (harness.time_interleaved).
1b. Prefill kernels (GPU only) on 4096 -> 4096 at rank 16 and mixed 8-64: SGMV with the plan's
   chunks of up to 64 tokens against the same tensor-core kernels on the plan's 8-token tiles,
   BGMV and the PEFT loop, for one long prompt up to many prompts on many adapters.
2. End to end on SmolLM2-135M (the real model, fp32): time over the base model for a mixed batch
   of 1, 8, 32 and 128 distinct adapters of ranks 8-64 on all seven projections, for a
   32-token prefill and for one decode token, fastllm and PEFT's `adapter_names` in the same run.
2b. Decode overhead on a Llama-8B-shaped stack with random weights (hidden 4096, intermediate
   14336, 32 query / 8 KV heads; 2 of the 32 layers in quick mode, 8 otherwise; a 1k vocabulary):
   one decode step of 128 sequences over 1, 8, 32 and 128 adapters of ranks 8-64 on all seven
   projections through AdapterManager.batch, against the unwrapped base model, eager and (CUDA)
   replayed from a CUDA graph captured inside the batch. On CPU a tiny model of the same ratios.
3. Registering 1000 adapters in host memory and loading each into the pool for the first time.

CPU runs are scaled down (the kernel grid's batch sizes and adapter counts, fewer repeats for
batches of 32 and more, 1000 adapters of rank 8 on q/v only); the case names say what ran. The
quick GPU mode fits bench/gpu_check.sh's bench stage: see `run`.
"""

from __future__ import annotations

import copy
import time

import torch

import fastllm.ops as ops
from fastllm._ops.lora import PATH_SGMV, sm_count
from harness import (Progress, Record, Rotating, copy_bandwidth_gbs,
                     sets_to_defeat_cache, time_interleaved)

CAPABILITY = "lora"
# What went wrong in this run, each a line: bench/run.py saves the records that did come back,
# prints these and exits non-zero (a part that raised would otherwise lose every record).
FAILURES: list[str] = []
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- 1. kernels ----------------------------------------------------------------------------------

def _kernel_problem(tokens, adapters, rank_choice, in_features, out_features, dtype, device):
    """`adapters` resident adapters (distinct rows in one pool), `tokens` decode tokens spread over
    min(tokens, adapters) of them."""
    ranks_list = [rank_choice[i % len(rank_choice)] for i in range(adapters)]
    max_rank = max(ranks_list)
    a_rows = torch.zeros(1, adapters, max_rank, dtype=torch.int64)
    b_rows = torch.zeros(1, adapters, max_rank, dtype=torch.int64)
    pos = 0
    for a, r in enumerate(ranks_list):
        a_rows[0, a, :r] = pos + torch.arange(r) * in_features
        pos += r * in_features
        b_rows[0, a, :r] = pos + torch.arange(r) * out_features
        pos += r * out_features
    pool = (torch.randn(pos, device=device) * 0.02).to(dtype)
    ranks = torch.tensor([ranks_list], dtype=torch.int32, device=device)
    scalings = torch.full((1, adapters), 2.0, device=device)
    used = torch.randperm(adapters)[:min(tokens, adapters)]
    ids = used[torch.arange(tokens) % used.numel()].to(device)
    x = torch.randn(tokens, in_features, device=device).to(dtype)
    y = torch.randn(tokens, out_features, device=device).to(dtype)
    # Dense per-adapter copies (what PEFT holds), and stacked/padded ones for the bmm baseline.
    a_dense = [pool[a_rows[0, a, :r].to(device).unsqueeze(1) + torch.arange(in_features, device=device)]
               for a, r in enumerate(ranks_list)]
    b_dense = [pool[b_rows[0, a, :r].to(device).unsqueeze(1) + torch.arange(out_features, device=device)].T.contiguous()
               for a, r in enumerate(ranks_list)]
    a_stack = torch.zeros(adapters, max_rank, in_features, dtype=dtype, device=device)
    b_stack = torch.zeros(adapters, max_rank, out_features, dtype=dtype, device=device)
    for a, r in enumerate(ranks_list):
        a_stack[a, :r] = a_dense[a]
        b_stack[a, :r] = b_dense[a].T
    return dict(pool=pool, a_rows=a_rows.to(device), b_rows=b_rows.to(device), ranks=ranks,
                scalings=scalings, ids=ids, x=x, y=y, a_dense=a_dense, b_dense=b_dense,
                a_stack=a_stack, b_stack=b_stack, ranks_list=ranks_list, max_rank=max_rank)


class _Deadline:
    """Where the GPU quick run must end. bench/gpu_check.sh gives `run.py --quick` about 35 s on
    a GPU, and a run cut off by its timeout saves nothing (records are written after `run`
    returns), so cases that would start past the deadline are skipped, each named in the log."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds
        self.skipped: list[str] = []

    def passed(self, what: str) -> bool:
        if self.end is None or time.monotonic() < self.end:
            return False
        self.skipped.append(what)
        print(f"  (skipped, past the quick GPU run's time budget: {what})", flush=True)
        return True


def _input_sets(moved_bytes: int, device: str) -> int:
    """Problems rotated per candidate. On CUDA enough that the rotation is twice the L2, so the
    bytes a kernel reads come from HBM (H200: 50 MB of L2 would hold every adapter row of a
    64-adapter rank-16 decode batch, and GB/s would then exceed the copy ceiling). On CPU one, as
    in the committed CPU records, whose figures these stay comparable with."""
    if device != "cuda":
        return 1
    return sets_to_defeat_cache(moved_bytes, device, cap=1024)


def _rotating(fns):
    """One callable that runs the next of `fns` each call."""
    ring = Rotating(fns)
    return lambda: ring.next()()


def _kernel_records(device, quick, progress_total_hint, deadline=None, cases=None):
    """`cases` (in, out, tokens, adapters, rank name, ranks) replaces the grid (tests use tiny
    ones)."""
    deadline = deadline or _Deadline(None)
    on_gpu = device == "cuda"
    dtype = torch.float16 if on_gpu else torch.float32
    ceiling = copy_bandwidth_gbs(device)
    if on_gpu and quick:
        # The decode target (64 tokens on 64 distinct rank-16 adapters) and batch 1 first,
        # so they are measured whatever the deadline leaves.
        grid = [(64, 64), (1, 1), (16, 16), (64, 8), (256, 256), (256, 1000)]
        rank_sets = {"r16": [16], "mixed 8-64": [8, 16, 32, 64]}
    elif on_gpu:
        grid = [(b, n) for b in (1, 16, 64, 256) for n in (1, 8, b)] + [(256, 1000)]
        rank_sets = {"r8": [8], "r16": [16], "r64": [64], "mixed 8-64": [8, 16, 32, 64]}
    else:
        grid = [(1, 1), (16, 1), (16, 16), (64, 8), (64, 64), (64, 1000)]
        rank_sets = {"r8": [8], "r16": [16], "r64": [64], "mixed 8-64": [8, 16, 32, 64]}
    shapes = [(4096, 4096), (4096, 11008)] if cases is None else []
    cases = list(cases or [])
    for in_f, out_f in shapes:
        for tokens, adapters in dict.fromkeys(grid):
            for rank_name, ranks in rank_sets.items():
                # keep the CPU run's pool under ~0.6 GB
                if not on_gpu and adapters * max(ranks) * (in_f + out_f) * 4 > 600e6:
                    continue
                if quick and rank_name not in ("r16", "mixed 8-64"):
                    continue
                cases.append((in_f, out_f, tokens, adapters, rank_name, ranks))
    records = []
    progress = Progress(CAPABILITY, len(cases) + progress_total_hint)
    element = torch.empty((), dtype=dtype).element_size()
    for in_f, out_f, tokens, adapters, rank_name, ranks in cases:
        label = f"{in_f}->{out_f} b{tokens} {adapters}ad {rank_name}"
        if deadline.passed(f"kernels {label}"):
            continue
        used = min(tokens, adapters)
        mean_rank = sum(ranks[i % len(ranks)] for i in range(adapters)) / adapters
        estimate = int(used * mean_rank * (in_f + out_f) * element
                       + tokens * (in_f + 2 * out_f) * element)
        sets = [_kernel_problem(tokens, adapters, ranks, in_f, out_f, dtype, device)
                for _ in range(_input_sets(estimate, device))]
        fns = {name: [] for name in ("ours_shrink", "peft_shrink", "bmm_shrink",
                                     "ours_expand", "peft_expand", "bmm_expand")}
        for p in sets:
            for name, fn in _kernel_candidates(p, tokens, out_f, dtype, device).items():
                fns[name].append(fn)
        # Sets differ in which adapters their tokens use (so, with mixed ranks, in rows read):
        # the bytes counted are the sets' mean.
        rows_read = sum(sum(q["ranks_list"][a] for a, _ in q["groups"]) for q in sets) / len(sets)
        repeats = 7 if quick else 15
        for op_name, width in [("shrink", in_f), ("expand", out_f)]:
            t = time_interleaved({kind: _rotating(fns[f"{kind}_{op_name}"])
                                  for kind in ("ours", "peft", "bmm")}, device,
                                 repeats=repeats, min_seconds_per_sample=1e-3)
            # Bytes that must come from memory: each distinct adapter's rows once, activations
            # once (y read and written by expand).
            moved = rows_read * width * element
            moved += tokens * (in_f if op_name == "shrink" else 2 * out_f) * element
            gbs = moved / t["ours"] / 1e9
            for base_name in ("peft", "bmm"):
                records.append(Record(
                    CAPABILITY, f"{op_name} {label}", f"lora_{op_name}",
                    "peft loop" if base_name == "peft" else "gathered bmm",
                    t["ours"] * 1e3, t[base_name] * 1e3,
                    {"GB/s": gbs, "% of copy BW": 100 * gbs / ceiling,
                     "input sets": len(sets)}))
        del sets, fns
        progress.step(f"kernels {label}: shrink {records[-4].speedup:.2f}x peft, "
                      f"{records[-3].speedup:.2f}x bmm; expand {records[-2].speedup:.2f}x peft, "
                      f"{records[-1].speedup:.2f}x bmm")
    return records, progress


def _kernel_candidates(p, tokens, out_f, dtype, device):
    """Our two ops and both baselines on one problem (one input set)."""
    ids = p["ids"]
    distinct = ids.unique()
    groups = [(int(a), (ids == a).nonzero().flatten()) for a in distinct.tolist()]
    p["groups"] = groups
    h = ops.lora_shrink(p["x"], p["pool"], p["a_rows"], p["ranks"], ids, 0)

    def ours_shrink():
        return torch.ops.fastllm.lora_shrink.default(p["x"], p["pool"], p["a_rows"], p["ranks"],
                                                     ids, 0)

    def peft_shrink():
        out = torch.zeros(1, tokens, p["max_rank"], device=device)
        for a, idx in groups:
            r = p["ranks_list"][a]
            out[0, idx, :r] = (p["x"][idx] @ p["a_dense"][a].T).float()
        return out

    def bmm_shrink():
        return torch.bmm(p["a_stack"][ids], p["x"].unsqueeze(2)).squeeze(2)

    def ours_expand():
        torch.ops.fastllm.lora_expand.default(p["y"], h, p["pool"], p["b_rows"], p["ranks"],
                                              p["scalings"], ids, [out_f], 0)

    def peft_expand():
        for a, idx in groups:
            r = p["ranks_list"][a]
            p["y"][idx] += (h[0, idx, :r].to(dtype) @ p["b_dense"][a].T) * 2.0

    def bmm_expand():
        p["y"].add_(torch.bmm(h[0].to(dtype).unsqueeze(1), p["b_stack"][ids]).squeeze(1), alpha=2.0)

    return dict(ours_shrink=ours_shrink, peft_shrink=peft_shrink, bmm_shrink=bmm_shrink,
                ours_expand=ours_expand, peft_expand=peft_expand, bmm_expand=bmm_expand)


# ---- 1b. prefill kernels (GPU) -------------------------------------------------------------------

# (tokens, adapters): one long prompt, a few prompts on a few adapters, many on many.
PREFILL_GRID = [(512, 1), (2048, 4), (4096, 32), (512, 64)]


def _prefill_candidates(p, dtype, device):
    """SGMV on one prefill problem four ways: ours (tensor-core kernels on the plan's chunks of
    up to 64 tokens), the same kernels on the plan's 8-token tiles (what they consumed before
    chunks), BGMV (one token per work item), and the PEFT loop (a dense matmul per adapter)."""
    ids = p["ids"]
    adapters = p["a_rows"].shape[1]
    order, tiles = ops.lora_sgmv_plan(ids.cpu(), adapters)
    chunks = ops.lora_sgmv_chunks(tiles, sms=sm_count(torch.device(device)))
    calls = {"ours": (PATH_SGMV, order, tiles, chunks), "tiles": (PATH_SGMV, order, tiles),
             "bgmv": (1,)}
    calls = {name: (c[0], *(t.to(device) for t in c[1:])) for name, c in calls.items()}
    h = ops.lora_shrink(p["x"], p["pool"], p["a_rows"], p["ranks"], ids, *calls["ours"])
    out_f = p["y"].shape[1]
    fns = {}
    for name, call in calls.items():
        fns[f"{name}_shrink"] = lambda call=call: torch.ops.fastllm.lora_shrink.default(
            p["x"], p["pool"], p["a_rows"], p["ranks"], ids, *call)
        fns[f"{name}_expand"] = lambda call=call: torch.ops.fastllm.lora_expand.default(
            p["y"], h, p["pool"], p["b_rows"], p["ranks"], p["scalings"], ids, [out_f], *call)
    peft = _kernel_candidates(p, ids.numel(), out_f, dtype, device)
    fns["peft_shrink"], fns["peft_expand"] = peft["peft_shrink"], peft["peft_expand"]
    return fns, chunks.shape[0]


def _prefill_records(device, quick, progress, deadline=None, cases=None):
    """Prefill SGMV on 4096 -> 4096 at rank 16 and mixed 8-64, fp16 on a GPU: ours against the
    8-token tiles, BGMV and the PEFT loop, GB/s against the copy ceiling. `cases` (in, out,
    tokens, adapters, rank name, ranks) replaces the grid (tests use tiny ones, on the CPU,
    where the chunks are checked and unused)."""
    deadline = deadline or _Deadline(None)
    on_gpu = device == "cuda"
    dtype = torch.float16 if on_gpu else torch.float32
    ceiling = copy_bandwidth_gbs(device)
    if cases is None:
        rank_sets = {"r16": [16], "mixed 8-64": [8, 16, 32, 64]}
        grid = PREFILL_GRID[:2] if quick else PREFILL_GRID
        cases = [(4096, 4096, t, n, name, ranks) for t, n in grid
                 for name, ranks in rank_sets.items()]
    element = torch.empty((), dtype=dtype).element_size()
    records = []
    for in_f, out_f, tokens, adapters, rank_name, ranks in cases:
        label = f"prefill {in_f}->{out_f} t{tokens} {adapters}ad {rank_name}"
        if deadline.passed(label):
            continue
        mean_rank = sum(ranks[i % len(ranks)] for i in range(adapters)) / adapters
        used = min(tokens, adapters)
        estimate = int(used * mean_rank * (in_f + out_f) * element
                       + tokens * (in_f + 2 * out_f) * element)
        sets = [_kernel_problem(tokens, adapters, ranks, in_f, out_f, dtype, device)
                for _ in range(_input_sets(estimate, device))]
        fns: dict[str, list] = {}
        chunk_count = 0
        for p in sets:
            found, chunk_count = _prefill_candidates(p, dtype, device)
            for name, fn in found.items():
                fns.setdefault(name, []).append(fn)
        rows_read = sum(sum(q["ranks_list"][a] for a, _ in q["groups"]) for q in sets) / len(sets)
        for op_name, width in [("shrink", in_f), ("expand", out_f)]:
            kinds = ("ours", "tiles", "bgmv", "peft")
            t = time_interleaved({k: _rotating(fns[f"{k}_{op_name}"]) for k in kinds}, device,
                                 repeats=7 if quick else 15, min_seconds_per_sample=1e-3)
            moved = rows_read * width * element
            moved += tokens * (in_f if op_name == "shrink" else 2 * out_f) * element
            gbs = moved / t["ours"] / 1e9
            for base, base_name in [("tiles", "8-token tiles"), ("bgmv", "bgmv"),
                                    ("peft", "peft loop")]:
                records.append(Record(
                    CAPABILITY, f"{op_name} {label}", f"lora_{op_name} sgmv chunks",
                    base_name, t["ours"] * 1e3, t[base] * 1e3,
                    {"GB/s": gbs, "% of copy BW": 100 * gbs / ceiling, "chunks": chunk_count,
                     "input sets": len(sets)}))
        del sets, fns
        if progress is not None:
            progress.step(f"{label}: shrink {records[-6].speedup:.2f}x tiles, "
                          f"expand {records[-3].speedup:.2f}x tiles")
    return records


# ---- 2. end to end -------------------------------------------------------------------------------

def _smollm2():
    import os
    import sys
    import pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "tests"))
    from conftest import SMOLLM2_GGUF, smollm2_dir
    import transformers
    path = smollm2_dir()
    if path is None:
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF,
                                                              dtype=torch.float32)
    return model.eval()


def _add_peft_adapters(peft_model, configs) -> None:
    """Adapters a1.. of `configs` added to a PEFT model. `add_adapter` rescans every module of the
    model against every existing adapter (quadratic: 128 adapters took over 10 minutes on the CPU
    machine), so where PEFT's LoraLayer.update_layer takes the config (peft >= 0.18) this makes
    the same per-layer call itself; otherwise it falls back to `add_adapter`."""
    import inspect
    from peft.tuners.lora import LoraLayer

    layers = [(name.rsplit(".", 1)[-1], m) for name, m in peft_model.named_modules()
              if isinstance(m, LoraLayer)]
    fast = "config" in inspect.signature(LoraLayer.update_layer).parameters
    for i, config in enumerate(configs[1:], start=1):
        if not fast:
            peft_model.add_adapter(f"a{i}", config)
            continue
        peft_model.peft_config[f"a{i}"] = config
        for target, layer in layers:
            layer.update_layer(f"a{i}", config.r, config.lora_alpha, config, target_name=target)


def _peft_state_dict(peft_model, adapter: str) -> dict:
    """What `peft.get_peft_model_state_dict(peft_model, adapter_name=adapter)` returns for these
    plain LoRA adapters, read from the layers directly (that function walks the whole state dict,
    every adapter's tensors included, once per call)."""
    from peft.tuners.lora import LoraLayer

    state = {}
    for name, layer in peft_model.named_modules():
        if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
            state[f"{name}.lora_A.weight"] = layer.lora_A[adapter].weight
            state[f"{name}.lora_B.weight"] = layer.lora_B[adapter].weight
    return state


def _end_to_end_records(device, quick, progress, counts=(1, 8, 32, 128)):
    import peft
    from fastllm.lora import AdapterManager
    from transformers import DynamicCache

    from fastllm.kv import cache_keyword

    model = _smollm2()
    if model is None:
        print("  (SmolLM2 not installed: skipping end-to-end cases)")
        return []
    model = model.to(device)
    on_gpu = device == "cuda"
    ranks = [8, 16, 32, 64]
    max_adapters = max(counts)
    torch.manual_seed(0)
    configs = [peft.LoraConfig(r=ranks[i % 4], lora_alpha=2 * ranks[i % 4],
                               target_modules=LLAMA_TARGETS, lora_dropout=0.0)
               for i in range(max_adapters)]
    peft_model = peft.get_peft_model(copy.deepcopy(model), configs[0], adapter_name="a0")
    _add_peft_adapters(peft_model, configs)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.02)
    peft_model.eval()
    ours = copy.deepcopy(model)
    # A pool holding every adapter of the largest batch (the default, 10% of free memory, may not
    # on a small machine); the first batches find them resident, as a warm server would.
    elements_per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules()
                    if n.rsplit(".", 1)[-1] in LLAMA_TARGETS and isinstance(m, torch.nn.Linear))
    page = 1 << 16
    num_pages = sum(-(-ranks[i % 4] * elements_per_rank // page) + 2 * 7 * 30 for i in range(max_adapters))
    manager = AdapterManager(ours, max_rank=64, num_pages=num_pages, page_size=page)
    for i in range(max_adapters):
        state = _peft_state_dict(peft_model, f"a{i}")
        manager.load(f"a{i}", state, {"r": ranks[i % 4], "lora_alpha": 2 * ranks[i % 4]})
    records = []
    prompt_len = 32
    for count in counts:
        batch = max(count, 8 if not on_gpu else 16)
        names = [f"a{i % count}" for i in range(batch)]
        input_ids = torch.randint(100, 10000, (batch, prompt_len), device=device)
        next_ids = torch.randint(100, 10000, (batch, 1), device=device)
        with torch.no_grad():
            cache = DynamicCache()
            key = cache_keyword(model)
            model(input_ids, **{key: cache}, use_cache=True)

            def decode(fn):
                def run():
                    fn(next_ids, **{key: cache}, use_cache=True)
                    cache.crop(-1)  # drop the token just appended
                return run

            # A serving loop sets the batch's adapters once and runs many forwards (every decode
            # step of a generate call) under it, so the batch is entered outside the timed calls;
            # its set-up cost is reported on its own ("batch setup ms").
            begin = time.perf_counter()
            for _ in range(5):
                with manager.batch(names):
                    pass
            setup_ms = (time.perf_counter() - begin) / 5 * 1e3
            batch_context = manager.batch(names)
            batch_context.__enter__()

            def ours_fn(ids, **kw):
                return ours(ids, **kw)

            def base_fn(ids, **kw):
                return model(ids, **kw)  # the unwrapped original: the same weights

            def peft_fn(ids, **kw):
                return peft_model(ids, adapter_names=names, **kw)

            for phase, make in [
                (f"prefill {prompt_len} tok", lambda fn: (lambda: fn(input_ids, use_cache=False))),
                ("decode 1 tok", decode),
            ]:
                # Batches of 32+ take seconds per forward on a CPU: fewer repeats there.
                repeats = (5 if quick else 15) if on_gpu or count <= 8 else (3 if quick else 7)
                t = time_interleaved({"base": make(base_fn),
                                      "ours": make(ours_fn), "peft": make(peft_fn)}, device,
                                     repeats=repeats, min_seconds_per_sample=0.05,
                                     warmup=1 if count > 8 and not on_gpu else 2)
                ours_over = 100 * (t["ours"] / t["base"] - 1)
                peft_over = 100 * (t["peft"] / t["base"] - 1)
                records.append(Record(
                    CAPABILITY, f"smollm2 {phase} batch {batch}, {count} adapters r8-64 x7 proj",
                    "fastllm AdapterManager", "peft adapter_names", t["ours"] * 1e3,
                    t["peft"] * 1e3, {"base ms": t["base"] * 1e3, "fastllm overhead %": ours_over,
                                      "peft overhead %": peft_over, "batch setup ms": setup_ms}))
                progress.step(f"e2e {phase} {count} adapters: base {t['base'] * 1e3:.1f} ms, "
                              f"fastllm +{ours_over:.1f}%, peft +{peft_over:.1f}%")
            batch_context.__exit__(None, None, None)
    manager.close()
    return records


# ---- 2b. decode overhead on a Llama-8B-shaped stack, eager and CUDA-graph-captured -------------

# Llama-3-8B's layer shapes. The vocabulary is cut to 1024: with a few of the 32 layers, a full
# 128k-entry lm_head (not a LoRA target) would be most of the base step and hide the overhead; in
# the whole model it is about 7% of the weights read per step, so the overhead measured here is
# a slight overestimate of the full model's.
LLAMA_8B_SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=1024)
# The same head ratio (32:8) and MLP ratio (3.5) at a size the CPU runs in the test suite.
LLAMA_8B_TINY = dict(hidden_size=64, intermediate_size=224, num_attention_heads=4,
                     num_key_value_heads=1, head_dim=16, vocab_size=128)


class _FixedDecodeStep:
    """One decode step of `model` at a fixed position of a StaticCache: every call repeats the
    same work (it rewrites the same cache slot), so it can be timed in a loop and a graph of it
    replayed any number of times."""

    def __init__(self, model, cache, ids, positions):
        from gpu_graphs import _accepts

        from fastllm.kv import cache_keyword
        self.model, self.ids, self.cache = model, ids, cache
        self.start = int(positions[0])  # read once, here, not in the timed step
        self.kw = {cache_keyword(model): cache, "use_cache": True,
                   "position_ids": positions.view(1, -1)}
        # transformers < 5.2x wants cache_position (else it derives it from the cache: a sync)
        if _accepts(model.model.forward, "cache_position"):
            self.kw["cache_position"] = positions

    def __call__(self):
        # Later transformers keep a device counter of written positions per layer and write at
        # it; putting it back (a device fill, captured with the step) makes every call write
        # the same slot instead of running past the cache's end.
        for layer in getattr(self.cache, "layers", ()):
            counter = getattr(layer, "cumulative_length", None)
            if isinstance(counter, torch.Tensor):
                counter.fill_(self.start)
        with torch.no_grad():
            return self.model(self.ids, **self.kw).logits


def _capture(step):
    """A CUDA graph of `step` after warm-up on a side stream (what torch.cuda.graph asks for:
    lazy initialisation and the caching allocator settle outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def _llama8b_decode_records(device, quick, progress=None, deadline=None,
                            counts=(1, 8, 32, 128)):
    """Time over the base model of one decode step of a batch of `batch` sequences spread over
    1..128 adapters of ranks 8/16/32/64 on all seven projections, through AdapterManager.batch,
    eagerly and (CUDA) replayed from a CUDA graph captured inside that batch. The base model is an
    unwrapped copy with the same weights, stepping on the same cache at the same position."""
    import copy

    import transformers
    from fastllm.lora import AdapterManager
    from transformers import StaticCache

    deadline = deadline or _Deadline(None)
    on_gpu = device == "cuda"
    dtype = torch.float16 if on_gpu else torch.float32
    layers = (2 if quick else 8) if on_gpu else 2
    shape = LLAMA_8B_SHAPE if on_gpu else LLAMA_8B_TINY
    context = 512 if on_gpu else 16
    batch = max(128, max(counts))
    label = (f"llama-8b-shaped {layers}/32 layers, vocab 1k, ctx {context}, fp16" if on_gpu else
             f"tiny llama-8b-ratio h64 i224 4q/1kv heads, {layers} layers, ctx {context}, fp32")
    ranks = [8, 16, 32, 64]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**shape, num_hidden_layers=layers,
                                      max_position_embeddings=context + 8)
    with torch.device(device):
        # Built on the device: initialising 0.4 G parameters on the host takes seconds.
        base = transformers.LlamaForCausalLM(config).eval().to(dtype)
    ours = copy.deepcopy(base)
    # One random adapter per rank, loaded under every name of that rank: the store copies each
    # into its own rows of the pool, so the kernels read distinct memory per adapter.
    targets = [(n, m) for n, m in base.named_modules()
               if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LLAMA_TARGETS]
    states = {}
    for r in ranks:
        states[r] = {}
        for name, module in targets:
            # In the model's dtype already: registering then only copies (a conversion per
            # adapter would cost seconds of the quick GPU run's budget).
            states[r][f"base_model.model.{name}.lora_A.weight"] = (torch.randn(
                r, module.in_features) * module.in_features ** -0.5).to(dtype)
            states[r][f"base_model.model.{name}.lora_B.weight"] = (torch.randn(
                module.out_features, r) * 0.02).to(dtype)
    elements_per_rank = sum(m.in_features + m.out_features for _, m in targets)
    page = 1 << 16
    max_adapters = max(counts)
    num_pages = sum(-(-ranks[i % 4] * elements_per_rank // page) + 2 * len(targets)
                    for i in range(max_adapters))
    manager = AdapterManager(ours, max_rank=max(ranks), num_pages=num_pages, page_size=page)
    for i in range(max_adapters):
        r = ranks[i % 4]
        manager.load(f"a{i}", states[r], {"r": r, "lora_alpha": 2 * r})
    del states

    cache = StaticCache(config=config, max_cache_len=context + 1)
    prompt = torch.randint(0, shape["vocab_size"], (batch, context), device=device)
    step_ids = torch.randint(0, shape["vocab_size"], (batch, 1), device=device)
    position = torch.full((1,), context, dtype=torch.long, device=device)
    with torch.no_grad():
        # The base model fills the shared cache; which model wrote the prompt's keys changes no
        # cost of the step.
        _FixedDecodeStep(base, cache, prompt, torch.arange(context, device=device))()
    base_step = _FixedDecodeStep(base, cache, step_ids, position)
    ours_step = _FixedDecodeStep(ours, cache, step_ids, position)
    def fail(what, error):
        FAILURES.append(f"llama-8b decode: {what}: {type(error).__name__}: {error}"[:500])
        print(f"  {FAILURES[-1]}", flush=True)

    base_graph = None
    if on_gpu:
        try:
            base_graph = _capture(base_step)[0]
        except Exception as error:  # noqa: BLE001 - the eager figures are still worth having
            fail("capturing the base model's step", error)
    repeats = 10 if quick else 25
    records = []
    for count in counts:
        case = f"{label}: decode batch {batch}, {count} adapters r8-64 x7 proj"
        if deadline.passed(case):
            continue
        names = [f"a{i % count}" for i in range(batch)]
        begin = time.perf_counter()
        for _ in range(3):
            with manager.batch(names):
                pass
        setup_ms = (time.perf_counter() - begin) / 3 * 1e3
        with manager.batch(names):
            eager_out = ours_step().clone()  # builds the decode shape's token map and plan
            candidates = {"base eager": base_step, "ours eager": ours_step}
            graph_diff = ours_graph = graph_out = None
            if base_graph is not None:
                try:
                    ours_graph, graph_out = _capture(ours_step)
                    ours_graph.replay()
                    graph_diff = float((graph_out.float() - eager_out.float()).abs().max())
                    candidates.update({"base graph": base_graph.replay,
                                       "ours graph": ours_graph.replay})
                except Exception as error:  # noqa: BLE001 - reported, eager still timed
                    fail(f"capturing the step with {count} adapters", error)
                # Same kernels on the same inputs: equal up to the order of atomic additions
                # (split-K shrink). More means the graph replays something else than eager runs.
                scale = max(1.0, float(eager_out.float().abs().max()))
                if graph_diff is not None and graph_diff > 1e-2 * scale:
                    fail(f"{count} adapters", RuntimeError(
                        f"graph replay differs from eager by {graph_diff:.3g}"))
            t = time_interleaved(candidates, device, repeats=repeats)
            del ours_graph, graph_out
        modes = ("eager", "graph") if "ours graph" in t else ("eager",)
        for mode in modes:
            over = 100 * (t[f"ours {mode}"] / t[f"base {mode}"] - 1)
            metrics = {"overhead %": over, "batch setup ms": setup_ms}
            if mode == "graph":
                metrics["graph vs eager max abs diff"] = graph_diff
                metrics["graph speedup over eager"] = t["ours eager"] / t["ours graph"]
            records.append(Record(
                CAPABILITY, f"{case}, {'cuda graph' if mode == 'graph' else 'eager'}",
                "fastllm AdapterManager", "base model", t[f"ours {mode}"] * 1e3,
                t[f"base {mode}"] * 1e3, metrics))
        line = ", ".join(f"{m} base {t[f'base {m}'] * 1e3:.3f} ms "
                         f"{100 * (t[f'ours {m}'] / t[f'base {m}'] - 1):+.1f}%"
                         for m in modes)
        if progress is not None:
            progress.step(f"llama-8b decode {count} adapters: {line}")
    manager.close()
    return records


# ---- 3. registration and first load --------------------------------------------------------------

def _loading_records(device, progress):
    from fastllm.lora.store import AdapterStore, ModuleSpec, ModuleWeights
    from fastllm.memory import PagePool

    count, rank = 1000, 8
    hidden, kv = 576, 192  # SmolLM2's q_proj (576 -> 576) and v_proj (576 -> 192), 30 layers
    specs = []
    for layer in range(30):
        specs.append(ModuleSpec(f"model.layers.{layer}.self_attn.q_proj", hidden, hidden))
        specs.append(ModuleSpec(f"model.layers.{layer}.self_attn.v_proj", hidden, kv))
    weights = [{s.name: ModuleWeights(torch.randn(rank, s.in_features) * 0.02,
                                      torch.randn(s.out_features, rank) * 0.02, 2.0)
                for s in specs} for _ in range(4)]
    page = 1 << 16
    per_adapter = sum(rank * (s.in_features + s.out_features) for s in specs)
    pages_per = -(-per_adapter // page) + 1
    pool = PagePool(pages_per * 100, page, torch.float32, device)  # room for 100 of the 1000
    store = AdapterStore(pool, specs, max_rank=64)
    begin = time.perf_counter()
    for i in range(count):
        store.register(f"ad{i}", weights[i % 4])
    register_s = time.perf_counter() - begin
    host_bytes = store.stats()["host_bytes"]
    # baseline: the bare copy of the same bytes (torch.cat of each adapter's tensors)
    begin = time.perf_counter()
    for i in range(count):
        torch.cat([t.reshape(-1) for w in weights[i % 4].values() for t in (w.a, w.b)])
    copy_s = time.perf_counter() - begin
    begin = time.perf_counter()
    for i in range(count):
        store.acquire([f"ad{i}"])
        store.release()
    if device == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - begin
    moved = store.stats()["bytes_moved"]
    # Baseline: copy each adapter's own host buffer (as cold in cache as ours) into the pool's
    # memory, one copy per adapter with nothing else around it.
    sources = [store.host[f"ad{i}"].buffer.view(-1) for i in range(count)]
    dest = torch.empty(sources[0].numel(), device=device)
    begin = time.perf_counter()
    for src in sources:
        dest.copy_(src, non_blocking=True)
    if device == "cuda":
        torch.cuda.synchronize()
    raw_s = time.perf_counter() - begin
    stats = store.stats()
    records = [
        Record(CAPABILITY, f"register {count} adapters (r{rank} q/v x30 layers, "
               f"{host_bytes / count / 1e6:.2f} MB each)", "AdapterStore.register",
               "torch.cat of the same tensors", register_s * 1e3, copy_s * 1e3,
               {"ms per adapter": register_s * 1e3 / count}),
        Record(CAPABILITY, f"first load of {count} adapters into a pool holding 100 (LRU evicts)",
               "AdapterStore.acquire", "bare copy of each adapter's buffer", load_s * 1e3, raw_s * 1e3,
               {"ms per adapter": load_s * 1e3 / count, "GB/s": moved / load_s / 1e9,
                "evictions": stats["evictions"]}),
    ]
    progress.step(f"register {register_s * 1e3 / count:.3f} ms/adapter, first load "
                  f"{load_s * 1e3 / count:.3f} ms/adapter")
    return records


# Seconds `run` may take in the quick GPU mode: bench/gpu_check.sh's bench stage gives run.py
# about 35 s, of which process start (run.py imports every bench_*.py), CUDA initialisation, the
# two ceilings and writing the results and the plot take an estimated 8-10. The parts themselves
# are estimated at ~17 s on an H200 (not yet measured on a GPU): kernels ~8 (building ~1750
# rotated input sets, ~24 cases), decode8b ~4-5, loading ~4; this deadline leaves margin.
GPU_QUICK_SECONDS = 20


def run(device: str, quick: bool = False) -> list[Record]:
    """FASTLLM_LORA_BENCH=kernels[,decode8b][,prefill][,loading][,e2e] runs only those parts
    (default: all five; prefill only on a GPU, the CPU having no tensor-core path), e.g. the full
    kernel grid without the long end-to-end runs.

    The quick GPU mode (bench/gpu_check.sh) runs the kernels, the Llama-8B-shaped decode overhead
    and the loading figures under a deadline, and leaves out the SmolLM2 comparison with PEFT:
    PEFT's 128 adapters take longer to build than the whole stage has, and its 128-adapter forward
    is ~100k kernel launches."""
    import os
    import traceback
    parts = set(os.environ.get("FASTLLM_LORA_BENCH",
                               "kernels,decode8b,prefill,loading,e2e").split(","))
    gpu_quick = quick and device == "cuda"
    deadline = _Deadline(GPU_QUICK_SECONDS if gpu_quick else None)
    FAILURES.clear()
    hint = 4 * ("decode8b" in parts) + ("loading" in parts) + 8 * ("e2e" in parts and not gpu_quick)
    hint += (4 if quick else 2 * len(PREFILL_GRID)) * ("prefill" in parts and device == "cuda")
    records, progress = [], Progress(CAPABILITY, hint)

    def part(name, fn):
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 - the other parts still run and are saved
            FAILURES.append(f"{name}: {type(error).__name__}: {error}"[:500])
            traceback.print_exc()
            return []

    if "kernels" in parts:
        found = part("kernels", lambda: _kernel_records(device, quick, hint, deadline))
        if found:
            records, progress = found
    if "decode8b" in parts and not deadline.passed("llama-8b-shaped decode overhead"):
        records += part("decode8b", lambda: _llama8b_decode_records(device, quick, progress,
                                                                    deadline))
    if "prefill" in parts and device == "cuda" and not deadline.passed("prefill kernels"):
        records += part("prefill", lambda: _prefill_records(device, quick, progress, deadline))
    if "loading" in parts and not deadline.passed("registration and first load"):
        records += part("loading", lambda: _loading_records(device, progress))
    if "e2e" in parts and not gpu_quick:
        records += part("e2e", lambda: _end_to_end_records(device, quick, progress))
    if deadline.skipped:
        print(f"  quick GPU run: {len(deadline.skipped)} case(s) skipped past its "
              f"{GPU_QUICK_SECONDS} s budget", flush=True)
    return records
