"""Paged multi-adapter LoRA: kernels, end to end on SmolLM2 next to PEFT, and adapter loading.

1. Kernels on Llama-7B shapes (4096 -> 4096, 4096 -> 11008), decode (one token per sequence):
   lora_shrink and lora_expand against (a) PEFT's strategy, a loop over the batch's distinct
   adapters (gather the sub-batch, matmul, scatter), and (b) a gathered batched matmul (each
   token's adapter weights gathered into a [tokens, r, hidden] tensor, then bmm). Achieved GB/s
   counts the adapter rows read plus activations, against the measured copy bandwidth.
2. End to end on SmolLM2-135M (the real model, fp32): time over the base model for a mixed batch
   of 1, 8, 32 and 128 distinct adapters of ranks 8-64 on all seven projections, for a
   32-token prefill and for one decode token, fastllm and PEFT's `adapter_names` in the same run.
3. Registering 1000 adapters in host memory and loading each into the pool for the first time.

CPU runs are scaled down (the kernel grid's batch sizes and adapter counts, fewer repeats for
batches of 32 and more, 1000 adapters of rank 8 on q/v only); the case names say what ran.
"""

from __future__ import annotations

import copy
import time

import torch

import fastllm.ops as ops
from harness import Progress, Record, copy_bandwidth_gbs, time_interleaved

CAPABILITY = "lora"
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


def _kernel_records(device, quick, progress_total_hint):
    on_gpu = device == "cuda"
    dtype = torch.float16 if on_gpu else torch.float32
    ceiling = copy_bandwidth_gbs(device)
    if on_gpu:
        grid = [(b, n) for b in (1, 16, 64, 256) for n in (1, 8, b)] + [(256, 1000)]
        rank_sets = {"r8": [8], "r16": [16], "r64": [64], "mixed 8-64": [8, 16, 32, 64]}
    else:
        grid = [(1, 1), (16, 1), (16, 16), (64, 8), (64, 64), (64, 1000)]
        rank_sets = {"r8": [8], "r16": [16], "r64": [64], "mixed 8-64": [8, 16, 32, 64]}
    shapes = [(4096, 4096), (4096, 11008)]
    cases = []
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
        p = _kernel_problem(tokens, adapters, ranks, in_f, out_f, dtype, device)
        ids = p["ids"]
        distinct = ids.unique()
        groups = [(int(a), (ids == a).nonzero().flatten()) for a in distinct.tolist()]
        h = ops.lora_shrink(p["x"], p["pool"], p["a_rows"], p["ranks"], ids, 0)

        def ours_shrink():
            return torch.ops.fastllm.lora_shrink.default(p["x"], p["pool"], p["a_rows"], p["ranks"], ids, 0)

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

        label = f"{in_f}->{out_f} b{tokens} {adapters}ad {rank_name}"
        repeats = 7 if quick else 15
        for op_name, ours, peft_fn, bmm_fn, width in [
            ("shrink", ours_shrink, peft_shrink, bmm_shrink, in_f),
            ("expand", ours_expand, peft_expand, bmm_expand, out_f),
        ]:
            t = time_interleaved({"ours": ours, "peft": peft_fn, "bmm": bmm_fn}, device,
                                 repeats=repeats, min_seconds_per_sample=1e-3)
            # Bytes that must come from memory: each distinct adapter's rows once, activations
            # once (y read and written by expand).
            moved = sum(p["ranks_list"][a] for a, _ in groups) * width * element
            moved += tokens * (in_f if op_name == "shrink" else 2 * out_f) * element
            gbs = moved / t["ours"] / 1e9
            for base_name in ("peft", "bmm"):
                records.append(Record(
                    CAPABILITY, f"{op_name} {label}", f"lora_{op_name}",
                    "peft loop" if base_name == "peft" else "gathered bmm",
                    t["ours"] * 1e3, t[base_name] * 1e3,
                    {"GB/s": gbs, "% of copy BW": 100 * gbs / ceiling}))
        progress.step(f"kernels {label}: shrink {records[-4].speedup:.2f}x peft, "
                      f"{records[-3].speedup:.2f}x bmm; expand {records[-2].speedup:.2f}x peft, "
                      f"{records[-1].speedup:.2f}x bmm")
    return records, progress


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
            model(input_ids, past_key_values=cache, use_cache=True)

            def decode(fn):
                def run():
                    fn(next_ids, past_key_values=cache, use_cache=True)
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


def run(device: str, quick: bool = False) -> list[Record]:
    """FASTLLM_LORA_BENCH=kernels[,loading][,e2e] runs only those parts (default: all three), e.g.
    the full kernel grid without the long end-to-end runs."""
    import os
    parts = set(os.environ.get("FASTLLM_LORA_BENCH", "kernels,loading,e2e").split(","))
    records, progress = _kernel_records(device, quick, progress_total_hint=8) \
        if "kernels" in parts else ([], Progress(CAPABILITY, 9))
    if "loading" in parts:
        records += _loading_records(device, progress)
    if "e2e" in parts:
        records += _end_to_end_records(device, quick, progress)
    return records
