"""GaLore: fused update step against the unfused torch step, SVD refresh full against randomized,
optimizer-state bytes against AdamW, and peak memory of a SmolLM2 fine-tuning step.

* step: one non-refresh GaLore-Adam update of a projected weight (projector fixed), ours =
  ``fastllm.ops.galore_adam_step`` / ``galore_adam8bit_step``, baseline = the same math in plain
  torch (``fastllm._reference.galore_adam_step_reference``, i.e. galore-torch's sequence of ops).
  GB/s counts the minimum traffic of the full matrices: gradient read, weight read and written.
* svd: projector refresh, ours = the seeded randomized range finder (``svd="randomized"``),
  baseline = ``torch.linalg.svd`` (galore-torch's); ``energy`` is the fraction of the full SVD's
  captured gradient norm that the randomized projector captures.
* state: optimizer-state bytes counted exactly (every tensor in ``optimizer.state``) on the seven
  matrices of a Llama block at rank d/4, timed as whole optimizer steps against torch's AdamW.
* galore-torch: the same seven Llama-block matrices, whole non-refresh optimizer steps of
  fastllm's GaLoreAdamW against galore-torch 1.0's GaLoreAdamW (an optional dependency: the
  record is left out when ``galore_torch`` is not importable), same gradients, same hyper-
  parameters; ``python bench/bench_galore.py --vs-galore-torch`` runs only this comparison, many
  interleaved repeats, and writes ``results/<machine>-galore-vs-galore-torch.json`` with the
  load average before and after.
* smollm2: the real SmolLM2-135M-Instruct, one full fine-tuning step (batch 1 x 256 tokens of
  Shakespeare), each configuration in a fresh process; peak = the kernel's resident-set high-water
  mark (VmHWM, reset after the first step, so it covers steady-state steps 1-2), in MB, of the
  whole process (model, activations, gradients, optimizer state, Python).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import torch

import fastllm.ops as ops
from fastllm._reference import GaLoreAdamWReference
from fastllm._reference.galore import (galore_adam8bit_step_reference, galore_adam_step_reference,
                                       projection_sides)
from fastllm.optim import GaLoreAdamW, GaLoreAdamW8bit
from fastllm.optim.galore import _randomized_svd

from harness import Progress, Record, Rotating, time_interleaved

CAPABILITY = "galore"
HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, scale=0.25, step=10)
REPO = pathlib.Path(__file__).resolve().parent.parent


def _mb(nbytes: float) -> float:
    return nbytes / 2**20


# ---- fused step against the unfused torch step ----------------------------------------------

def _step_cases(device: str, quick: bool):
    if device == "cuda":
        shapes = [(4096, 4096, 128), (4096, 11008, 128), (11008, 4096, 128)]
        dtypes = [torch.float32, torch.bfloat16]
    else:
        shapes = [(1024, 2816, 256), (2816, 1024, 256)] + ([] if quick else [(2048, 5504, 128)])
        dtypes = [torch.float32, torch.bfloat16]
    for m, n, rank in shapes:
        for dtype in dtypes:
            for eight_bit in (False, True):
                yield m, n, rank, dtype, eight_bit


def _step_record(device, m, n, rank, dtype, eight_bit, quick) -> Record:
    param = torch.randn(m, n, device=device).to(dtype)
    grads = Rotating([torch.randn(m, n, device=device).to(dtype) for _ in range(2 if quick else 3)])
    u, _, vh = torch.linalg.svd(torch.randn(m, n, device=device), full_matrices=False)
    use_left, use_right = projection_sides((m, n), "std")
    left = u[:, :rank].contiguous() if use_left else None
    right = vh[:rank].contiguous() if use_right else None
    low = (rank, n) if use_left else (m, rank)
    numel = low[0] * low[1]
    blocks = -(-numel // 256)

    def fresh_state():
        if eight_bit:
            return [torch.zeros(numel, dtype=torch.int8, device=device),
                    torch.zeros(blocks, device=device),
                    torch.zeros(numel, dtype=torch.uint8, device=device),
                    torch.zeros(blocks, device=device)]
        return [torch.zeros(low, device=device), torch.zeros(low, device=device)]

    ours_state, base_state = fresh_state(), fresh_state()
    ours_param, base_param = param.clone(), param.clone()
    op = ops.galore_adam8bit_step if eight_bit else ops.galore_adam_step
    ref = galore_adam8bit_step_reference if eight_bit else galore_adam_step_reference

    def ours():
        op(ours_param, grads.next(), left, right, *ours_state, **HYPER)

    def base():
        ref(base_param, grads.next(), left, right, *base_state, grad_is_projected=False, **HYPER)

    t = time_interleaved({"ours": ours, "base": base}, device, repeats=5 if quick else 15,
                         warmup=2)
    element = param.element_size()
    moved = 3 * m * n * element  # G read, W read, W written: the least any step must move
    name = "galore_adam8bit_step" if eight_bit else "galore_adam_step"
    case = f"step {m}x{n} r{rank} {str(dtype).removeprefix('torch.')}"
    return Record(CAPABILITY, case, name, "torch reference", t["ours"] * 1e3, t["base"] * 1e3,
                  {"GB/s": moved / t["ours"] / 1e9})


# ---- SVD refresh: full against randomized --------------------------------------------------------

def _svd_record(device, m, n, rank, quick) -> Record:
    # A gradient-like matrix: decaying spectrum plus noise.
    k = min(m, n)
    spectrum = torch.logspace(0, -3, k, device=device)
    a = torch.linalg.qr(torch.randn(m, k, device=device)).Q
    b = torch.linalg.qr(torch.randn(n, k, device=device)).Q
    grad = (a * spectrum) @ b.t()
    generator = torch.Generator(device=device).manual_seed(0)

    def ours():
        return _randomized_svd(grad, rank, 8, 2, generator)

    def base():
        return torch.linalg.svd(grad, full_matrices=False)

    # A full SVD of a large matrix takes seconds on a CPU: few repeats, one call per sample.
    t = time_interleaved({"ours": ours, "base": base}, device, repeats=3 if quick else 5,
                         warmup=1, min_seconds_per_sample=0)
    u_r, _ = ours()
    u_f = base()[0][:, :rank]
    energy = float((u_r.t() @ grad).norm() / (u_f.t() @ grad).norm())
    return Record(CAPABILITY, f"svd refresh {m}x{n} r{rank}", "randomized svd",
                  "torch.linalg.svd", t["ours"] * 1e3, t["base"] * 1e3, {"energy": energy})


# ---- optimizer-state bytes and whole-optimizer step time -----------------------------------------

def _llama_block(device, d=1024, ffn=2816):
    shapes = [(d, d)] * 4 + [(ffn, d)] * 2 + [(d, ffn)]
    return [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]


def _state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items()
               if isinstance(v, torch.Tensor) and k != "low_shape")


def _state_records(device, quick) -> list[Record]:
    rank = 256  # d / 4
    variants = {
        "galore-torch equivalent": lambda ps: GaLoreAdamWReference(
            [{"params": ps, "rank": rank, "update_proj_gap": 200, "scale": 0.25}], lr=1e-3),
        "GaLoreAdamW": lambda ps: GaLoreAdamW(
            [{"params": ps, "rank": rank, "update_proj_gap": 200, "scale": 0.25}], lr=1e-3),
        "GaLoreAdamW bf16 projector": lambda ps: GaLoreAdamW(
            [{"params": ps, "rank": rank, "update_proj_gap": 200, "scale": 0.25,
              "proj_dtype": "bfloat16"}], lr=1e-3),
        "GaLoreAdamW8bit": lambda ps: GaLoreAdamW8bit(
            [{"params": ps, "rank": rank, "update_proj_gap": 200, "scale": 0.25}], lr=1e-3),
    }
    grads = [torch.randn_like(p) for p in _llama_block(device)]

    def prepared(make):
        params = _llama_block(device)
        opt = make(params)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()  # step 0 refreshes the projectors; timing covers the steps in between
        return opt

    adamw = prepared(lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    adamw_bytes = _state_bytes(adamw)
    records = []
    for name, make in variants.items():
        opt = prepared(make)
        nbytes = _state_bytes(opt)
        t = time_interleaved({"ours": opt.step, "base": adamw.step}, device,
                             repeats=3 if quick else 9, warmup=1)
        records.append(Record(CAPABILITY, f"llama block r{rank}=d/4 state", name, "AdamW",
                              t["ours"] * 1e3, t["base"] * 1e3,
                              {"state MB": _mb(nbytes), "AdamW state MB": _mb(adamw_bytes),
                               "% of AdamW state": 100 * nbytes / adamw_bytes}))
    return records


# ---- whole optimizer step against galore-torch ---------------------------------------------------

def load_galore_torch_adamw():
    """galore-torch's GaLoreAdamW class, or None when galore-torch is not installed.

    galore-torch's package ``__init__`` also imports its 8-bit optimizer, which needs
    bitsandbytes; when that import fails, only its ``adamw`` module (and the projector it
    imports) is loaded, under a package object that skips the ``__init__``."""
    import importlib
    import importlib.util
    import types
    try:
        package = importlib.import_module("galore_torch")
        if hasattr(package, "GaLoreAdamW"):
            return package.GaLoreAdamW
        return importlib.import_module("galore_torch.adamw").AdamW  # loaded below before
    except ModuleNotFoundError as error:
        if error.name == "galore_torch":
            return None
        spec = importlib.util.find_spec("galore_torch")
        if spec is None or spec.submodule_search_locations is None:
            return None
        package = types.ModuleType("galore_torch")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["galore_torch"] = package
        return importlib.import_module("galore_torch.adamw").AdamW


def galore_torch_comparison(device, repeats: int, rank: int = 256, weight_decay: float = 0.01,
                            with_components: bool = False):
    """Median seconds of one non-refresh step over the seven Llama-block matrices, fastllm's
    GaLoreAdamW and galore-torch's, interleaved; None without galore-torch. With
    ``with_components``, also (interleaved with them) the pass fastllm's step made before it
    checked the projected gradient instead: ``isfinite(G).all()`` over the seven full
    gradients."""
    import warnings
    GaloreTorchAdamW = load_galore_torch_adamw()
    if GaloreTorchAdamW is None:
        return None
    torch.manual_seed(0)
    grads = [torch.randn_like(p) for p in _llama_block(device)]
    group = dict(rank=rank, update_proj_gap=10**6, scale=0.25, proj_type="std")

    def prepared(make):
        torch.manual_seed(1)
        params = _llama_block(device)
        opt = make([{"params": params, **group}])
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()  # step 0 refreshes the projectors; timing covers the steps in between
        return opt

    ours = prepared(lambda g: GaLoreAdamW(g, lr=1e-3, weight_decay=weight_decay))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # its deprecation notice
        theirs = prepared(lambda g: GaloreTorchAdamW(g, lr=1e-3, weight_decay=weight_decay,
                                                     no_deprecation_warning=True))
    candidates = {"ours": ours.step, "base": theirs.step}
    if with_components:
        def full_finite_check():
            for g in grads:
                bool(torch.isfinite(g).all())
        candidates["full_finite_check"] = full_finite_check
    return time_interleaved(candidates, device, repeats=repeats, warmup=2,
                            min_seconds_per_sample=0)


def _galore_torch_records(device, quick) -> list[Record]:
    t = galore_torch_comparison(device, repeats=5 if quick else 15)
    if t is None:
        return []
    return [Record(CAPABILITY, "llama block r256 non-refresh step", "GaLoreAdamW",
                   "galore-torch GaLoreAdamW", t["ours"] * 1e3, t["base"] * 1e3,
                   {"loadavg_1m": os.getloadavg()[0]})]


def _vs_galore_torch_main(repeats: int) -> None:
    """Runs the galore-torch comparison alone and writes its JSON (with the load average)."""
    import datetime
    from harness import RESULTS_DIR, git_commit, machine_name
    device = "cpu"
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    load_before = os.getloadavg()
    rounds = []
    for _ in range(3):  # three rounds of interleaved repeats; the result is their median
        t = galore_torch_comparison(device, repeats=repeats, with_components=True)
        if t is None:
            raise SystemExit("galore-torch is not installed (pip install galore-torch --no-deps)")
        rounds.append({"ours_ms": t["ours"] * 1e3, "galore_torch_ms": t["base"] * 1e3,
                       "speedup": t["base"] / t["ours"],
                       "full_finite_check_ms": t["full_finite_check"] * 1e3,
                       "loadavg_1m": os.getloadavg()[0]})
    load_after = os.getloadavg()
    import statistics
    speedups = sorted(r["speedup"] for r in rounds)
    out = {
        "case": "seven Llama-block matrices (4x 1024x1024, 2x 2816x1024, 1024x2816), rank 256, "
                "proj_type std, non-refresh GaLoreAdamW step, fp32, weight_decay 0.01",
        "ours": "fastllm.optim.GaLoreAdamW", "baseline": "galore_torch GaLoreAdamW 1.0",
        "machine": machine_name(device), "torch": torch.__version__, "commit": git_commit(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_before": load_before, "loadavg_after": load_after,
        "repeats_per_round": repeats, "rounds": rounds,
        "median_ours_ms": statistics.median(r["ours_ms"] for r in rounds),
        "median_galore_torch_ms": statistics.median(r["galore_torch_ms"] for r in rounds),
        "median_speedup": statistics.median(speedups),
        "median_full_finite_check_ms": statistics.median(r["full_finite_check_ms"]
                                                         for r in rounds),
        "note": "full_finite_check_ms: the isfinite(G).all() pass over the seven m x n "
                "gradients that the step made before this commit (it now checks the projected "
                "gradient); timed interleaved with the two steps",
    }
    path = RESULTS_DIR / f"{machine_name(device)}-galore-vs-galore-torch.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


# ---- SmolLM2 fine-tuning step: peak memory -------------------------------------------------------

SMOLLM2_MODES = ["adamw", "galore", "galore-layerwise", "galore-linear"]


def _vm_kb(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _smollm2_child(mode: str) -> dict:
    """Runs in a fresh process: load SmolLM2, 3 training steps, report memory and step time."""
    import ctypes
    import time

    sys.path.insert(0, str(REPO / "tests"))
    import conftest  # the tests' loading recipe for the real model
    import transformers

    from fastllm.nn import to_galore_linear
    from fastllm.optim import galore_param_groups

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = conftest.smollm2_dir()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, gguf_file=conftest.SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, gguf_file=conftest.SMOLLM2_GGUF)
    model.train()
    text = (REPO / "tests" / "data" / "tinyshakespeare_200k.txt").read_text()[:4000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :256]
    rank = model.config.hidden_size // 4
    groups = lambda: galore_param_groups(model, rank=rank, update_proj_gap=200)  # noqa: E731
    if mode == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    elif mode == "galore":
        opt = GaLoreAdamW(groups(), lr=1e-5)
    elif mode == "galore-layerwise":
        opt = GaLoreAdamW(groups(), lr=1e-5, layerwise=True)
    else:
        to_galore_linear(model)
        opt = GaLoreAdamW(groups(), lr=1e-5)

    def train_step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    loaded_kb = _vm_kb("VmRSS")
    train_step()  # step 0: projector refresh (full gradients, SVD)
    libc.malloc_trim(0)
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    begin = time.perf_counter()
    for _ in range(2):
        train_step()
    seconds = (time.perf_counter() - begin) / 2
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    return {"mode": mode, "loaded_mb": loaded_kb / 1024, "peak_mb": _vm_kb("VmHWM") / 1024,
            "state_mb": _mb(state), "step_ms": seconds * 1e3,
            "params_mb": _mb(sum(p.numel() * p.element_size() for p in model.parameters()))}


def _smollm2_records(device) -> list[Record]:
    sys.path.insert(0, str(REPO / "tests"))
    import conftest
    if device != "cpu" or conftest.smollm2_dir() is None:
        return []  # measured on CPU only (VmHWM); the model package must be installed
    results = {}
    for mode in SMOLLM2_MODES:
        out = subprocess.run([sys.executable, __file__, "--smollm2-child", mode],
                             capture_output=True, text=True, cwd=REPO, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["adamw"]
    records = []
    for mode in SMOLLM2_MODES:
        r = results[mode]
        records.append(Record(CAPABILITY, "smollm2-135m finetune step 1x256", mode, "adamw",
                              r["step_ms"], base["step_ms"],
                              {"peak MB": r["peak_mb"], "peak - loaded MB":
                               r["peak_mb"] - r["loaded_mb"], "state MB": r["state_mb"],
                               "% of AdamW state": 100 * r["state_mb"] / base["state_mb"]}))
    return records


def run(device: str, quick: bool = False) -> list[Record]:
    step_cases = list(_step_cases(device, quick))
    svd_cases = ([(4096, 11008, 128), (4096, 4096, 128)] if device == "cuda"
                 else [(1024, 2816, 256)] + ([] if quick else [(2048, 5504, 128)]))
    progress = Progress(CAPABILITY, len(step_cases) + len(svd_cases) + 2)
    records = []
    for m, n, rank, dtype, eight_bit in step_cases:
        record = _step_record(device, m, n, rank, dtype, eight_bit, quick)
        records.append(record)
        progress.step(f"{record.ours} {record.case}: {record.speedup:.2f}x")
    for m, n, rank in svd_cases:
        record = _svd_record(device, m, n, rank, quick)
        records.append(record)
        progress.step(f"{record.case}: {record.speedup:.2f}x")
    records.extend(_state_records(device, quick))
    progress.step("optimizer state")
    galore_torch = _galore_torch_records(device, quick)
    if not galore_torch:
        progress.note("galore-torch not installed: its baseline is left out")
    records.extend(galore_torch)
    records.extend(_smollm2_records(device))
    progress.step("smollm2 peak memory")
    return records


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--smollm2-child":
        print(json.dumps(_smollm2_child(sys.argv[2])))
    elif len(sys.argv) >= 2 and sys.argv[1] == "--vs-galore-torch":
        _vs_galore_torch_main(int(sys.argv[2]) if len(sys.argv) > 2 else 15)
