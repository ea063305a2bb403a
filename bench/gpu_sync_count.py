"""Host synchronisations per decode step of each drop-in and per call of each op
(bench/gpu_check.sh, stage `syncs`).

With `torch.cuda.set_sync_debug_mode("warn")` every synchronising CUDA call that goes through
torch (`.item()`, `.cpu()`, `.tolist()`, a blocking copy either way, `nonzero`, a stream or
device synchronise through c10) emits a warning; they are recorded with their Python call site.
Counted:
  * one decode step (after prefill and two warm-up steps; three steps are counted) of each
    drop-in of bench/gpu_graphs.py (LoRA mixed batch, SparseMLP, FastGenCache) and of its
    baseline (the same model without the drop-in), plus a steady-state GaLoreAdamW step;
    where the profiler works, also the CUDA runtime calls of one step (synchronising calls the
    warnings cannot see, raw `cudaStreamSynchronize` in C++ included, and kernel launches);
  * every call of every `fastllm.ops` op made by bench/sanitize_cases.py (its cases cover every
    kernel and are kept current by whoever changes an op); only syncs inside the op count, not
    the cases' own checks of the results.

    python bench/gpu_sync_count.py --out syncs.json            # GPU
    python bench/gpu_sync_count.py --dry-run --out syncs.json  # CPU: the same code, no counting

Exit 0 when everything ran and (on a GPU) no op call synchronised and no drop-in's decode step
synchronised more often than its baseline.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import inspect
import json
import pathlib
import sys
import time
import traceback
import warnings

import torch

BENCH = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import gpu_graphs  # noqa: E402

# Utilities of the index-error contract: reading the error word synchronises by design.
NOT_COUNTED = ("index_error_word", "raise_index_errors", "checked_indices")
SYNC_RUNTIME_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
                      "cudaMemcpy", "cudaMemcpy2D", "cudaMemset", "cuStreamSynchronize",
                      "cuCtxSynchronize", "cuMemcpyDtoH_v2", "cuMemcpyHtoD_v2")


class SyncRecorder:
    """Records every sync warning while active; `mark()` / `since(mark)` count a region."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.records: list = []
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        self.records = self._stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        if self.enabled:
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.enabled:
            torch.cuda.set_sync_debug_mode("default")
        self._stack.close()

    def mark(self) -> int:
        return len(self.records)

    def since(self, mark: int) -> list:
        return [w for w in self.records[mark:] if "synchroniz" in str(w.message)]


def _site(record) -> str:
    path = pathlib.Path(record.filename)
    parts = path.parts
    for anchor in ("fastllm", "transformers", "torch", "bench", "tests"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            return f"{'/'.join(parts[i:])}:{record.lineno}"
    return f"{path.name}:{record.lineno}"


def count(recorder: SyncRecorder, fn) -> tuple[int, collections.Counter]:
    mark = recorder.mark()
    fn()
    found = recorder.since(mark)
    return len(found), collections.Counter(_site(w) for w in found)


def runtime_calls(fn, device: str) -> dict | None:
    """CUDA runtime calls made by fn() (profiler, CUPTI): the synchronising ones, launches."""
    if device != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    calls = collections.Counter()
    for event in prof.events():
        if event.name.startswith(("cuda", "cu")):
            calls[event.name] += 1
    syncs = {k: v for k, v in calls.items() if k in SYNC_RUNTIME_CALLS or "Synchronize" in k}
    launches = sum(v for k, v in calls.items() if "LaunchKernel" in k or k == "cuLaunchKernelEx")
    return {"sync_calls": syncs, "launches": launches,
            "memcpy_async": calls.get("cudaMemcpyAsync", 0)}


def decode_counts(make_state, recorder, device: str, warmup: int, steps: int) -> dict:
    state = make_state()
    for _ in range(warmup):
        state.feed(state.run().argmax(-1, keepdim=True))
    per_step, sites = [], collections.Counter()
    for _ in range(steps):
        holder = {}
        n, where = count(recorder, lambda: holder.update(out=state.run()))
        state.feed(holder["out"].argmax(-1, keepdim=True))
        per_step.append(n)
        sites.update(where)
    result = {"syncs_each_step": per_step, "syncs_per_step": max(per_step) if per_step else 0,
              "sites": dict(sites.most_common(15))}
    try:
        calls = runtime_calls(lambda: state.feed(state.run().argmax(-1, keepdim=True)), device)
        if calls is not None:
            result["runtime_calls_per_step"] = calls
            result["kernel_launches_per_step"] = calls["launches"]
    except Exception as error:  # noqa: BLE001 - the profiler is a cross-check only
        result["runtime_calls_error"] = f"{type(error).__name__}: {error}"[:500]
    return result


def galore_counts(opts, recorder, steps: int) -> dict:
    from fastllm.optim import GaLoreAdamW, galore_param_groups
    torch.manual_seed(opts.seed)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.SiLU(),
                                torch.nn.Linear(512, 256)).to(opts.device)
    opt = GaLoreAdamW(galore_param_groups(model, rank=16, update_proj_gap=1000), lr=1e-3)
    x = torch.randn(8, 256, device=opts.device)

    def backward():
        opt.zero_grad()
        model(x).pow(2).mean().backward()

    backward()
    opt.step()  # the first step computes the projections (an SVD): not the steady state
    per_step, sites = [], collections.Counter()
    for _ in range(steps):
        backward()
        n, where = count(recorder, opt.step)
        per_step.append(n)
        sites.update(where)
    return {"syncs_each_step": per_step, "syncs_per_step": max(per_step),
            "sites": dict(sites.most_common(15))}


def op_counts(recorder, device: str) -> tuple[dict, dict, list]:
    """Syncs inside each call of each fastllm.ops op, over bench/sanitize_cases.py's cases."""
    import fastllm.ops as ops
    import sanitize_cases
    calls: dict[str, list[int]] = collections.defaultdict(list)
    sites: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    depth = [0]
    originals = {}

    def wrap(name, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if depth[0]:
                return fn(*args, **kwargs)
            depth[0] += 1
            mark = recorder.mark()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                found = recorder.since(mark)
                calls[name].append(len(found))
                sites[name].update(_site(w) for w in found)
        return counted

    for name in getattr(ops, "__all__", []):
        fn = getattr(ops, name, None)
        if callable(fn) and name not in NOT_COUNTED:
            originals[name] = fn
            setattr(ops, name, wrap(name, fn))
    errors = []
    try:
        cases = [fn for name, fn in inspect.getmembers(sanitize_cases, inspect.isfunction)
                 if name.endswith("_cases") and fn.__module__ == sanitize_cases.__name__]
        cases.sort(key=lambda fn: fn.__code__.co_firstlineno)
        for case in cases:
            try:
                case(device)
            except Exception as error:  # noqa: BLE001 - one case's failure hides no other
                errors.append(f"{case.__name__}: {type(error).__name__}: {error}"[:500])
    finally:
        for name, fn in originals.items():
            setattr(ops, name, fn)
    result = {name: {"calls": len(v), "max_syncs_per_call": max(v), "total_syncs": sum(v),
                     "sites": dict(sites[name].most_common(5))} for name, v in calls.items()}
    not_called = sorted(set(originals) - set(calls))
    return result, {"not_called": not_called}, errors


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="syncs.json")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny model: run every counted region, count nothing")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--only", default="",
                        help="comma-separated among lora,sparse,fastgen,galore,ops (default: "
                             "all; a dry run: lora,galore,ops, since gpu_graphs.py --dry-run "
                             "already builds and steps the other drop-ins)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the baselines (implied by --dry-run)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = args.device or ("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    # Sync counts do not depend on the model's size: the tiny one keeps the stage short.
    opts = gpu_graphs.Options(device=device, dtype=dtype, size="tiny", prompt_len=24,
                              max_new=args.warmup + 2 * args.steps + 8)
    if args.only:
        wanted = set(args.only.split(","))
    elif args.dry_run:
        wanted = {"lora", "galore", "ops"}
    else:
        wanted = {"lora", "sparse", "fastgen", "galore", "ops"}
    baselines = not (args.no_baseline or args.dry_run)
    counting = device == "cuda"
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"device": device, "dtype": str(dtype).replace("torch.", ""), "counting": counting,
              "torch": torch.__version__, "dropins": {}, "ops": {}}
    if device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    bad = []
    with SyncRecorder(counting) as recorder:
        for name in gpu_graphs.DROPINS:
            if name not in wanted:
                continue
            print(f"== {name}", flush=True)
            start = time.perf_counter()
            try:
                with contextlib.ExitStack() as stack:
                    make_state, batch = gpu_graphs.BUILDERS[name](opts, stack)
                    result = decode_counts(make_state, recorder, device, args.warmup, args.steps)
                base = decode_counts(gpu_graphs.build_baseline(opts, batch), recorder, device,
                                     args.warmup, args.steps) if baselines else None
                if base is not None:
                    result["baseline_syncs_per_step"] = base["syncs_per_step"]
                    result["baseline_sites"] = base["sites"]
                    if "kernel_launches_per_step" in base:
                        result["baseline_kernel_launches_per_step"] = \
                            base["kernel_launches_per_step"]
                if result["syncs_per_step"] > result.get("baseline_syncs_per_step", 0):
                    bad.append(f"{name}: {result['syncs_per_step']} syncs per decode step, "
                               f"baseline {result['baseline_syncs_per_step']}")
            except Exception as error:  # noqa: BLE001 - one drop-in's failure hides no other
                result = {"error": f"{type(error).__name__}: {error}"[:2000],
                          "traceback": traceback.format_exc()[-4000:]}
                bad.append(f"{name}: {result['error'][:200]}")
            result["seconds"] = round(time.perf_counter() - start, 2)
            report["dropins"][name] = result
            out.write_text(json.dumps(report, indent=1) + "\n")
            print(f"   {json.dumps({k: v for k, v in result.items() if k != 'traceback'})[:600]}",
                  flush=True)
        if "galore" in wanted:
            print("== galore", flush=True)
            try:
                result = galore_counts(opts, recorder, args.steps)
                if result["syncs_per_step"]:
                    bad.append(f"galore: {result['syncs_per_step']} syncs per optimizer step")
            except Exception as error:  # noqa: BLE001
                result = {"error": f"{type(error).__name__}: {error}"[:2000],
                          "traceback": traceback.format_exc()[-4000:]}
                bad.append(f"galore: {result['error'][:200]}")
            report["dropins"]["galore"] = result
            print(f"   {json.dumps({k: v for k, v in result.items() if k != 'traceback'})[:600]}",
                  flush=True)
        if "ops" in wanted:
            print("== ops (bench/sanitize_cases.py)", flush=True)
            try:
                report["ops"], extra, errors = op_counts(recorder, device)
                report.update(extra)
                report["case_errors"] = errors
                bad += [f"case {e[:200]}" for e in errors]
                bad += [f"op {n}: {r['max_syncs_per_call']} syncs in one call"
                        for n, r in report["ops"].items() if r["max_syncs_per_call"]]
            except Exception as error:  # noqa: BLE001
                report["ops_error"] = f"{type(error).__name__}: {error}"[:2000]
                bad.append(f"ops: {report['ops_error'][:200]}")
            for name, r in sorted(report["ops"].items()):
                print(f"   {name:<24} calls {r['calls']:>3}  max syncs/call "
                      f"{r['max_syncs_per_call']}  {r['sites'] if r['sites'] else ''}", flush=True)
    report["problems"] = bad
    out.write_text(json.dumps(report, indent=1) + "\n")
    for line in bad:
        print(f"PROBLEM {line}")
    if not counting:
        # The dry run counts nothing; it fails only when a region could not run.
        bad = [b for b in bad if "syncs" not in b]
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
