"""Measurement helpers shared by every bench_<capability>.py.

Rules the helpers enforce: a timing is only reported as a ratio against a baseline timed in the same
run, interleaved (A B A B ...) so drift and thermal changes hit both alike, as the median of many
repeats after warm-up. On CUDA, time with events over rotating input sets (so L2 does not hold the
data) and report achieved bandwidth or FLOP/s against ceilings measured here, now.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

RESULTS_DIR = pathlib.Path(__file__).parent / "results"


# ---- where and what -----------------------------------------------------------------------------

def machine_name(device: str) -> str:
    """A stable file-name-safe label: the GPU model on CUDA, else the CPU model and core count."""
    if device == "cuda":
        label = torch.cuda.get_device_name()
    else:
        label = platform.processor() or platform.machine()
        try:
            for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    label = line.split(":", 1)[1]
                    break
        except OSError:
            pass
        label = f"cpu {label} {os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=pathlib.Path(__file__).parent, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True,
                               cwd=pathlib.Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def default_device() -> str:
    import fastllm
    return "cuda" if fastllm.build_info()["cuda"] and torch.cuda.is_available() else "cpu"


# ---- timing --------------------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_once(fn: Callable[[], object], device: str, inner: int) -> float:
    """Seconds per call, averaged over `inner` back-to-back calls."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    begin = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - begin) / inner


def time_interleaved(candidates: dict[str, Callable[[], object]], device: str,
                     repeats: int = 25, min_seconds_per_sample: float = 2e-3,
                     warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each candidate, sampled in alternation.

    Each sample runs a candidate enough times back to back to last about `min_seconds_per_sample`
    (calibrated once per candidate), so timer resolution and launch jitter stay small.
    """
    inner = {}
    for name, fn in candidates.items():
        for _ in range(warmup):
            fn()
        _sync(device)
        n = 1
        while _time_once(fn, device, n) * n < min_seconds_per_sample and n < 1 << 16:
            n *= 2
        inner[name] = n
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            samples[name].append(_time_once(fn, device, inner[name]))
    return {name: statistics.median(values) for name, values in samples.items()}


class Rotating:
    """Cycles through several input sets, so repeated calls do not find their data in cache."""

    def __init__(self, input_sets: list):
        self.input_sets = input_sets
        self.index = 0

    def next(self):
        item = self.input_sets[self.index]
        self.index = (self.index + 1) % len(self.input_sets)
        return item


def sets_to_defeat_cache(bytes_per_set: int, device: str, cap: int = 64) -> int:
    """How many input sets make the rotation larger than the last-level cache (2x margin)."""
    if device == "cuda":
        cache = torch.cuda.get_device_properties(0).L2_cache_size
    else:
        cache = 64 * 2**20  # larger than the LLC of the CPUs we run on
    return max(2, min(cap, -(-2 * cache // max(1, bytes_per_set))))


# ---- ceilings ------------------------------------------------------------------------------------

_ceiling_cache: dict[tuple, float] = {}


def copy_bandwidth_gbs(device: str) -> float:
    """Achieved GB/s (bytes read + written) of a large contiguous device-to-device copy."""
    key = ("copy", device)
    if key not in _ceiling_cache:
        nbytes = (1 << 30) if device == "cuda" else (256 << 20)
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        seconds = time_interleaved({"copy": lambda: dst.copy_(src)}, device, repeats=10)["copy"]
        _ceiling_cache[key] = 2 * nbytes / seconds / 1e9
    return _ceiling_cache[key]


def matmul_tflops(device: str, dtype: torch.dtype = torch.float16) -> float:
    """Achieved TFLOP/s of a large square matmul (the practical compute ceiling)."""
    key = ("matmul", device, dtype)
    if key not in _ceiling_cache:
        n = 8192 if device == "cuda" else 1024
        dtype = dtype if device == "cuda" else torch.float32
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        seconds = time_interleaved({"mm": lambda: a @ b}, device, repeats=10)["mm"]
        _ceiling_cache[key] = 2 * n**3 / seconds / 1e12
    return _ceiling_cache[key]


# ---- results -------------------------------------------------------------------------------------

@dataclass
class Record:
    """One comparison: our op against its baseline on one case."""
    capability: str
    case: str
    ours: str
    baseline: str
    ours_ms: float
    baseline_ms: float
    metrics: dict = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.ours_ms


class Progress:
    """One line per finished case, so a long run shows where it is."""

    def __init__(self, capability: str, total: int):
        self.capability, self.total, self.done = capability, total, 0

    def step(self, label: str) -> None:
        self.done += 1
        print(f"  [{self.capability} {self.done}/{self.total}] {label}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """A line that is not a finished case (a skipped or failed baseline)."""
        print(f"  [{self.capability}] {text}", file=sys.stderr, flush=True)


def save_results(records: list[Record], device: str, out_dir: pathlib.Path = RESULTS_DIR) -> pathlib.Path:
    """Append records, each stamped with machine, torch, commit and date, to results/<machine>.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_name(device)
    path = out_dir / f"{machine}.json"
    existing = json.loads(path.read_text()) if path.exists() else []
    stamp = {
        "machine": machine,
        "device": device,
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_GBps": copy_bandwidth_gbs(device),
        "matmul_TFLOPs": matmul_tflops(device),
    }
    for record in records:
        existing.append({**stamp, **asdict(record), "speedup": record.speedup})
    path.write_text(json.dumps(existing, indent=1) + "\n")
    return path


def plot_speedups(records: list[Record], capability: str, device: str,
                  out_dir: pathlib.Path = RESULTS_DIR, commit: str | None = None) -> pathlib.Path:
    """A horizontal bar per case from parity (1.0) to its speedup over the baseline, on a log
    scale: ratios span 0.1x to 100x+, and a linear axis hides everything near parity."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    # "quality ..." records carry perplexity in their metrics; their times are evaluation times,
    # not speed results, so they get no bar.
    rows = [r for r in records if r.capability == capability and not r.case.startswith("quality")]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.5))
    labels = [f"{r.case}  ({r.ours} vs {r.baseline})" for r in rows]
    speedups = [r.speedup for r in rows]
    ax.barh(range(len(rows)), [s - 1 for s in speedups], left=1,
            color=["tab:green" if s >= 1 else "tab:red" for s in speedups])
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over baseline (same run, median of interleaved repeats)")
    ax.set_title(f"fastllm {capability} on {machine_name(device)} (commit {commit or git_commit()})",
                 fontsize=9)
    fig.tight_layout()
    path = out_dir / f"{machine_name(device)}-{capability}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(records: list[Record]) -> str:
    metric_keys = sorted({k for r in records for k in r.metrics})
    header = ["capability", "case", "ours", "baseline", "ours ms", "base ms", "speedup", *metric_keys]
    body = []
    for r in records:
        body.append([r.capability, r.case, r.ours, r.baseline, f"{r.ours_ms:.4f}",
                     f"{r.baseline_ms:.4f}", f"{r.speedup:.2f}x",
                     *[_fmt(r.metrics.get(k)) for k in metric_keys]])
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
