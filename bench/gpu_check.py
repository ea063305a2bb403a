"""The logic of bench/gpu_check.sh: everything a GPU machine should check, in priority order, each
stage under its own time limit, in under 8 minutes from a fresh machine.

    bash bench/gpu_check.sh [OUT_DIR]            # on a GPU machine
    bash bench/gpu_check.sh --dry-run [OUT_DIR]  # anywhere: every stage in a mode that needs no GPU

Stages (planned seconds; their sum, 450 s, stays under the 465 s budget):
  env        20  the machine: GPU, capability, torch, nvcc, compute-sanitizer (decides the mode)
  build     190  pip install for this GPU's arch only (TORCH_CUDA_ARCH_LIST from its capability,
                 FASTLLM_CUDA=ON, CMAKE_BUILD_PARALLEL_LEVEL = cores), after a check of the build
                 dependencies that says what is missing
  tests      70  the CUDA tests only (CI runs the CPU ones): device-parametrised cases on cuda and
                 tests skipped or marked as CUDA-only (this file is the pytest plugin that selects)
  memcheck   35  compute-sanitizer memcheck over bench/sanitize_cases.py
  racecheck  30  compute-sanitizer racecheck over the same cases
  graphs     40  bench/gpu_graphs.py: CUDA-graph capture + replay of each drop-in's decode step
  syncs      30  bench/gpu_sync_count.py: host syncs per decode step and per op call
  bench      35  bench/run.py --quick
A stage that finishes early hands its unused seconds to the next ones; a stage whose limit is set
with --limit gets exactly that. Every stage runs under `timeout`, and the check goes on past a
stage that fails or times out. Stages after the build are skipped only when fastllm does not
import at all.

Output (OUT_DIR = $OUT when set, else the argument, else bench/results/gpu-check): at most 8
files, here 3: gpu-check-logs.tar.gz (every log and JSON result), summary.json and summary.txt
(stage, pass/fail/timeout/skipped, seconds, headline figures). They are rewritten after every
stage, so a run cut short still leaves what it had.

--dry-run (or a machine where torch sees no GPU) runs the same driver with each stage's command
replaced by one that needs no GPU: the build dependency check run and the pip command echoed,
pytest --collect-only with the CUDA selection, the sanitizer commands echoed, gpu_graphs.py and
gpu_sync_count.py --dry-run (their model-building code, and every sanitize_cases.py case, on the
CPU), run.py's flags checked. tests/test_gpu_check.py runs it (about 45 s on 2 busy cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
DEFAULT_OUT = BENCH / "results" / "gpu-check"
ARCHIVE = "gpu-check-logs.tar.gz"
MAX_OUT_FILES = 8
BUDGET_S = 465  # 7 min 45 s: the check must end within 8 minutes of starting on a fresh machine
STATUSES = ("pass", "fail", "timeout", "skipped")


@dataclasses.dataclass
class Stage:
    name: str
    planned_s: int
    what: str


STAGES = [
    Stage("env", 20, "machine, GPU, torch, nvcc, compute-sanitizer"),
    Stage("build", 190, "pip install for this GPU's arch (FASTLLM_CUDA=ON)"),
    Stage("tests", 70, "CUDA tests only"),
    Stage("memcheck", 35, "compute-sanitizer memcheck over bench/sanitize_cases.py"),
    Stage("racecheck", 30, "compute-sanitizer racecheck over bench/sanitize_cases.py"),
    Stage("graphs", 40, "CUDA-graph capture + replay of each drop-in's decode step"),
    Stage("syncs", 30, "host syncs per decode step and per op call"),
    Stage("bench", 35, "bench/run.py --quick"),
]
STAGE_NAMES = [s.name for s in STAGES]
assert sum(s.planned_s for s in STAGES) < BUDGET_S <= 480


# ---- the pytest plugin: which tests are the CUDA tests -------------------------------------------
# `pytest -p gpu_check` (with bench/ on PYTHONPATH) keeps only the tests that exercise the GPU. The
# CPU ones are CI's; rerunning them would spend GPU minutes on what CI already covers.

GPU_WORDS = ("cuda", "gpu")
# Cheap tests that check the CUDA build itself (build_info, every op registered for CUDA).
ALWAYS = ("test_build.py::test_build_info_describes_this_build",
          "test_build.py::test_cuda_kernels_are_built_whenever_a_cuda_compiler_is_present",
          "test_build.py::test_every_python_op_is_registered_with_the_right_kernels")
NEVER = ("test_gpu_check.py",)  # the dry run of this script: CPU-only, and it would recurse


def _is_cuda_value(value) -> bool:
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    return type(value).__name__ == "device" and getattr(value, "type", None) == "cuda"


def needs_gpu(item) -> bool:
    """True for a test that runs on the GPU: a parameter equal to "cuda" (the `device` fixture of
    tests/conftest.py), a `cuda`/`gpu` marker, or a skip/skipif marker whose reason or condition
    text mentions CUDA or a GPU (tests that run only where a GPU is present)."""
    nodeid = item.nodeid
    if any(part in nodeid for part in NEVER):
        return False
    if any(nodeid.endswith(tail) for tail in ALWAYS):
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(_is_cuda_value(v) for v in callspec.params.values()):
        return True
    for mark in item.iter_markers():
        if mark.name in GPU_WORDS:
            return True
        if mark.name in ("skip", "skipif"):
            text = " ".join([str(mark.kwargs.get("reason", ""))]
                            + [a for a in mark.args if isinstance(a, str)]).lower()
            if any(word in text for word in GPU_WORDS):
                return True
    return False


def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if needs_gpu(item)]
    dropped = [item for item in items if not needs_gpu(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


# ---- small helpers -------------------------------------------------------------------------------

def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _tail(path: pathlib.Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _marker_json(text: str, marker: str):
    """The JSON after the last line starting with `marker `."""
    found = None
    for line in text.splitlines():
        if line.startswith(marker + " "):
            try:
                found = json.loads(line[len(marker) + 1:])
            except ValueError:
                pass
    return found


def find_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    candidates = [pathlib.Path("/usr/local/cuda/bin/compute-sanitizer"),
                  pathlib.Path("/usr/local/cuda/compute-sanitizer/compute-sanitizer")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = pathlib.Path(os.path.realpath(nvcc)).parents[1]
        candidates += [root / "bin" / "compute-sanitizer",
                       root / "compute-sanitizer" / "compute-sanitizer"]
    candidates += sorted(pathlib.Path("/usr/local").glob("cuda*/bin/compute-sanitizer"))
    candidates += sorted(pathlib.Path("/opt/nvidia").glob("*/compute-sanitizer"))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


# ---- helper modes (run as stage commands) --------------------------------------------------------

def probe_env(path: str) -> int:
    """Write what the machine has to `path` (JSON) and print it: stage `env`."""
    info = {"python": sys.version.split()[0], "executable": sys.executable,
            "cores": os.cpu_count(), "gpu": False}
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["gpu"] = bool(torch.cuda.is_available())
        if info["gpu"]:
            props = torch.cuda.get_device_properties(0)
            info.update(gpu_name=props.name, capability=f"{props.major}.{props.minor}",
                        sm_count=props.multi_processor_count,
                        memory_gib=round(props.total_memory / 2 ** 30, 1),
                        device_count=torch.cuda.device_count())
    except Exception as error:  # noqa: BLE001 - a machine without torch still gets a report
        info["torch_error"] = repr(error)
    for module in ("transformers", "pytest", "xdist", "pytest_timeout", "scikit_build_core",
                   "pybind11", "matplotlib", "fastllm"):
        import importlib.util
        info[f"has_{module}"] = importlib.util.find_spec(module) is not None
    for tool, args in (("nvcc", ["--version"]), ("nvidia-smi", ["-L"]), ("cmake", ["--version"]),
                       ("ninja", ["--version"])):
        exe = shutil.which(tool)
        out = ""
        if exe:
            try:
                out = subprocess.run([exe, *args], capture_output=True, text=True,
                                     timeout=20).stdout.strip()
            except (OSError, subprocess.SubprocessError) as error:
                out = repr(error)
        release = re.search(r"release (\d+\.\d+)", out) if tool == "nvcc" else None
        info[tool] = release.group(1) if release else (out.splitlines()[-1] if out else None)
    sanitizer = find_sanitizer()
    info["compute_sanitizer"] = sanitizer
    if sanitizer:
        try:
            out = subprocess.run([sanitizer, "--version"], capture_output=True, text=True,
                                 timeout=20).stdout.strip()
            info["compute_sanitizer_version"] = out.splitlines()[-1] if out else None
        except (OSError, subprocess.SubprocessError) as error:
            info["compute_sanitizer_version"] = repr(error)
    pathlib.Path(path).write_text(json.dumps(info, indent=1) + "\n")
    for key, value in info.items():
        print(f"{key}: {value}")
    return 0


def _version_tuple(text: str) -> tuple:
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(g or 0) for g in match.groups()) if match else ()


def preflight_build(require_cuda: bool) -> int:
    """Check what `pip install --no-build-isolation .` needs before spending minutes on it, and
    say what is missing (the GPU machine cannot install from a registry: carry wheels)."""
    import importlib.util
    missing, facts = [], {}
    for module, need in (("scikit_build_core", "0.10"), ("pybind11", "2.12")):
        if importlib.util.find_spec(module) is None:
            missing.append(f"python package {module.replace('_', '-')}>={need}")
            continue
        try:
            from importlib.metadata import version
            facts[module] = version(module.replace("_", "-"))
            if _version_tuple(facts[module]) < _version_tuple(need):
                missing.append(f"{module.replace('_', '-')}>={need} (found {facts[module]})")
        except Exception:  # noqa: BLE001 - a version we cannot read is not a blocker
            pass
    for tool, need in (("cmake", "3.26"), ("ninja", "1.10")):
        # As scikit-build-core looks: the pip package's binary first, then PATH; any new enough.
        found = []
        for exe in (_tool_from_package(tool), shutil.which(tool)):
            if not exe:
                continue
            try:
                out = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                     timeout=20).stdout
            except (OSError, subprocess.SubprocessError):
                out = ""
            found.append((exe, _version_tuple(out), out.strip().splitlines()[0] if out else "?"))
        good = [f for f in found if f[1] >= _version_tuple(need)]
        if good:
            facts[tool] = f"{good[0][2]} ({good[0][0]})"
        elif found:
            missing.append(f"{tool}>={need} (found {', '.join(f[2] for f in found)}; the pip "
                           f"package {tool} provides one)")
        else:
            missing.append(f"{tool}>={need} (pip package {tool}, or on PATH)")
    torch_version = _torch_version_file()
    if torch_version is None:
        missing.append("torch (not installed for this python)")
    else:
        facts["torch"], facts["torch_cuda"] = torch_version
        if _version_tuple(facts["torch"]) < (2, 6):
            missing.append(f"torch>=2.6 (found {facts['torch']})")
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc")
    cuda_missing = []
    if nvcc is None:
        cuda_missing.append("nvcc (put the CUDA toolkit's bin on PATH or set CUDACXX)")
    else:
        try:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        release = re.search(r"release (\d+)\.(\d+)", out)
        facts["nvcc"] = f"{release.group(1)}.{release.group(2)}" if release else "?"
        torch_cuda = facts.get("torch_cuda")
        if release and torch_cuda and release.group(1) != torch_cuda.split(".")[0]:
            cuda_missing.append(f"nvcc {facts['nvcc']} does not match torch's CUDA {torch_cuda} "
                                "(major versions must agree)")
    if torch_version is not None and not facts.get("torch_cuda"):
        cuda_missing.append(f"a CUDA build of torch (found {facts.get('torch')}, CPU-only)")
    if require_cuda:
        missing += cuda_missing
    report = {"ok": not missing, "missing": missing, "cuda_missing": cuda_missing, **facts}
    for line in missing:
        print(f"build needs: {line}")
    for line in cuda_missing if not require_cuda else []:
        print(f"a CUDA build would need: {line}")
    print("PREFLIGHT " + json.dumps(report))
    return 0 if not missing else 1


def _torch_version_file():
    """(version, CUDA version or None) from torch/version.py, without importing torch (seconds
    on a busy machine)."""
    import importlib.util
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    scope: dict = {}
    try:
        path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "version.py"
        exec(compile(path.read_text(), str(path), "exec"), scope)  # noqa: S102 - torch's own file
    except (OSError, SyntaxError, StopIteration, ImportError):
        return None
    return str(scope.get("__version__")), scope.get("cuda")


def _tool_from_package(tool: str) -> str | None:
    """The binary the pip package `cmake` / `ninja` ships, if that package is installed."""
    try:
        module = __import__(tool)
    except ImportError:
        return None
    folder = getattr(module, "CMAKE_BIN_DIR", None) or getattr(module, "BIN_DIR", None)
    path = pathlib.Path(folder) / tool if folder else None
    return str(path) if path is not None and path.is_file() else None


def check_import() -> tuple[bool, str]:
    try:
        out = subprocess.run([sys.executable, "-c",
                              "import json, fastllm; print(json.dumps(fastllm.build_info()))"],
                             capture_output=True, text=True, timeout=60, cwd=tempfile.gettempdir())
    except (OSError, subprocess.SubprocessError) as error:
        return False, repr(error)
    if out.returncode == 0:
        return True, out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    lines = (out.stderr or out.stdout).strip().splitlines()
    return False, lines[-1] if lines else f"exit {out.returncode}"


# ---- stage commands ------------------------------------------------------------------------------

@dataclasses.dataclass
class Context:
    py: str
    logs: pathlib.Path
    dry: bool
    env: dict
    bench_only: str
    workers: int


def _q(path) -> str:
    return shlex.quote(str(path))


def sanitizer_command(ctx: Context, tool: str) -> str:
    cases = f"{_q(ctx.py)} bench/sanitize_cases.py"
    sanitizer = ctx.env.get("compute_sanitizer") or "compute-sanitizer"
    options = ["--tool", tool, "--error-exitcode", "1", "--print-limit", "50"]
    if not ctx.dry:
        try:
            helptext = subprocess.run([sanitizer, "--help"], capture_output=True, text=True,
                                      timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            helptext = ""
        # Check fastllm's kernels only (all live in namespace fastllm): torch's and cuBLAS's
        # kernels then run uninstrumented, which keeps the stage inside its limit.
        if "--kernel-name" in helptext:
            options += ["--kernel-name", "kns=fastllm"]
        if "--report-api-errors" in helptext:
            options += ["--report-api-errors", "no"]
    line = f"{_q(sanitizer)} {' '.join(options)} {cases} --device cuda"
    if tool == "memcheck":
        # Without the caching allocator every tensor is its own allocation, so an access past a
        # tensor's end is seen by memcheck instead of landing in a neighbouring cached block.
        line = "PYTORCH_NO_CUDA_MEMORY_CACHING=1 " + line
    if ctx.dry:
        # The cases themselves run on the CPU in the syncs stage's dry run (gpu_sync_count.py
        # calls every *_cases function of sanitize_cases.py), so here the command is only shown.
        return f"echo 'would run: {line}'"
    if not ctx.env.get("compute_sanitizer"):
        return "echo 'compute-sanitizer not found (looked on PATH and beside nvcc)'; exit 3"
    return line


def stage_command(name: str, ctx: Context) -> str:
    py = _q(ctx.py)
    logs = ctx.logs
    if name == "env":
        return f"{py} bench/gpu_check.py --probe-env {_q(logs / 'env.json')}"
    if name == "build":
        arch = ctx.env.get("capability") or "9.0"
        cores = ctx.env.get("cores") or os.cpu_count() or 1
        install = (f"TORCH_CUDA_ARCH_LIST={arch} FASTLLM_CUDA=ON "
                   f"CMAKE_BUILD_PARALLEL_LEVEL={cores} {py} -m pip install --no-build-isolation "
                   f"--no-deps --no-index --disable-pip-version-check -v .")
        if ctx.dry:
            return (f"{py} bench/gpu_check.py --preflight-build --no-cuda-required && "
                    f"echo 'would run: {install}'")
        info = ("import fastllm, json, sys; i = fastllm.build_info(); "
                "print('BUILD_INFO ' + json.dumps(i)); sys.exit(0 if i['cuda'] else 3)")
        return (f"{py} bench/gpu_check.py --preflight-build && {install} && "
                f"cd /tmp && {py} -c {_q(info)} && {py} -m fastllm")
    if name == "tests":
        # bench/ on the path makes this file importable as the plugin `gpu_check`.
        base = (f"PYTHONPATH={_q(BENCH)}${{PYTHONPATH:+:$PYTHONPATH}} {py} -m pytest tests "
                f"-p gpu_check -p no:cacheprovider -q")
        if ctx.dry:
            return f"{base} --collect-only"
        extra = f" --junitxml={_q(logs / 'tests.xml')} -rfE --durations=15"
        if ctx.env.get("has_pytest_timeout"):
            extra += " --timeout=60"
        if ctx.env.get("has_xdist") and ctx.workers > 1:
            extra += f" -n {ctx.workers}"
        return base + extra
    if name in ("memcheck", "racecheck"):
        return sanitizer_command(ctx, name)
    if name == "graphs":
        return (f"{py} bench/gpu_graphs.py --out {_q(logs / 'graphs.json')}"
                + (" --dry-run" if ctx.dry else ""))
    if name == "syncs":
        return (f"{py} bench/gpu_sync_count.py --out {_q(logs / 'syncs.json')}"
                + (" --dry-run" if ctx.dry else ""))
    if name == "bench":
        only = f" --only {_q(ctx.bench_only)}" if ctx.bench_only else ""
        line = f"{py} bench/run.py --quick --out {_q(logs / 'bench')}{only}"
        if ctx.dry:
            # run.py's flags, read from its source (its --help would import torch for nothing)
            return ("grep -q -- '\"--quick\"' bench/run.py && grep -q -- '\"--out\"' bench/run.py "
                    f"&& echo 'would run: {line}'")
        return line
    raise ValueError(f"unknown stage {name!r}")


# ---- headline figures from each stage's output ---------------------------------------------------

def _sanitizer_headline(text: str) -> dict:
    out = {}
    errors = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    if errors:
        out["errors"] = int(errors[-1])
    hazards = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, "
                         r"(\d+) warnings?\)", text)
    if hazards:
        shown, errs, warns = (int(v) for v in hazards[-1])
        out.update(hazards=shown, race_errors=errs, race_warnings=warns)
    kinds = re.findall(r"=+ (Invalid [^\n]*?|Race reported [^\n]*?|Error: [^\n]*?)(?: at |$)",
                       text, re.M)
    if kinds:
        out["first_reports"] = sorted(set(kinds))[:5]
    return out


def _tests_headline(text: str, xml: pathlib.Path) -> dict:
    out = {}
    try:
        root = ET.parse(xml).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        for key in ("tests", "failures", "errors", "skipped"):
            out[key] = sum(int(s.get(key, 0)) for s in suites)
        out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
        failed = []
        for case in root.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
        if failed:
            out["failed_tests"] = failed[:15]
    except (OSError, ET.ParseError):
        pass
    if "tests" not in out:
        selected = re.findall(r"(\d+)/(\d+) tests? collected", text)
        if selected:
            out["selected"], out["collected"] = int(selected[-1][0]), int(selected[-1][1])
        else:
            match = re.findall(r"(\d+) tests? collected", text)
            if match:
                out["selected"] = out["collected"] = int(match[-1])
        for word in ("passed", "failed", "skipped", "error", "deselected"):
            found = re.findall(rf"(\d+) {word}", text)
            if found:
                out[word] = int(found[-1])
    return out


def _graphs_headline(data) -> dict:
    out = {}
    for name, r in (data or {}).get("dropins", {}).items():
        keep = {k: r.get(k) for k in ("ok", "captured", "replay_equal", "steps_equal",
                                      "max_abs_diff", "eager_ms", "graph_ms", "speedup")
                if r.get(k) is not None}
        if r.get("error"):
            keep["error"] = str(r["error"])[:200]
        base = r.get("baseline") or {}
        if base:
            keep["baseline"] = {k: base.get(k) for k in ("captured", "replay_equal", "eager_ms",
                                                         "graph_ms") if base.get(k) is not None}
        out[name] = keep
    return out


def _syncs_headline(data) -> dict:
    if not data:
        return {}
    out = {"per_step": {}, "ops_with_syncs": {}}
    for name, r in data.get("dropins", {}).items():
        if "syncs_per_step" in r:
            out["per_step"][name] = {"syncs": r.get("syncs_per_step"),
                                     "baseline": r.get("baseline_syncs_per_step"),
                                     "launches": r.get("kernel_launches_per_step")}
        elif r.get("error"):
            out["per_step"][name] = {"error": str(r["error"])[:200]}
    for op, r in data.get("ops", {}).items():
        if r.get("max_syncs_per_call"):
            out["ops_with_syncs"][op] = r["max_syncs_per_call"]
    out["ops_counted"] = len(data.get("ops", {}))
    if data.get("case_errors"):
        out["case_errors"] = data["case_errors"]
    return out


def _bench_headline(logs: pathlib.Path, text: str) -> dict:
    records = 0
    for path in (logs / "bench").glob("*.json"):
        data = _read_json(path)
        if isinstance(data, list):
            records += len(data)
    done = re.findall(r"^== (\w+) ", text, re.M)
    return {"records": records, "capabilities_started": done}


def headline(name: str, ctx: Context, log: pathlib.Path) -> dict:
    text = log.read_text(errors="replace") if log.exists() else ""
    if name == "env":
        env = _read_json(ctx.logs / "env.json") or {}
        return {k: env.get(k) for k in ("gpu_name", "capability", "sm_count", "torch",
                                        "torch_cuda", "nvcc", "compute_sanitizer_version",
                                        "cores", "python") if env.get(k) is not None}
    if name == "build":
        out = {}
        pre = _marker_json(text, "PREFLIGHT")
        if pre:
            out["missing"] = pre.get("missing")
            if pre.get("cuda_missing"):
                out["cuda_missing"] = pre["cuda_missing"]
        info = _marker_json(text, "BUILD_INFO")
        if info:
            out["build_info"] = info
        out["arch"] = ctx.env.get("capability") or ("9.0 (dry run)" if ctx.dry else None)
        return out
    if name == "tests":
        return _tests_headline(text, ctx.logs / "tests.xml")
    if name in ("memcheck", "racecheck"):
        return _sanitizer_headline(text)
    if name == "graphs":
        return _graphs_headline(_read_json(ctx.logs / "graphs.json"))
    if name == "syncs":
        return _syncs_headline(_read_json(ctx.logs / "syncs.json"))
    if name == "bench":
        return _bench_headline(ctx.logs, text)
    return {}


# ---- the run -------------------------------------------------------------------------------------

def plan_limit(planned: int, carry: float, fixed: bool, elapsed: float, budget: float,
               reserve: float) -> int:
    """Seconds a stage may run: its planned seconds plus what earlier stages left unused (unless
    its limit was set explicitly), never so many that the stages after it lose their planned
    seconds (`reserve`) or the run its budget."""
    limit = planned if fixed else planned + max(0.0, carry)
    limit = min(limit, budget - elapsed - reserve)
    return max(1, int(limit))


def run_stage(cmd: str, log: pathlib.Path, limit: int, env: dict) -> tuple[int, float]:
    start = time.monotonic()
    with log.open("w") as handle:
        handle.write(f"$ {cmd}\n# limit {limit} s, started {_now()}\n")
        handle.flush()
        # `timeout` signals the command's whole process group (pytest workers, sanitizer
        # children), then kills it 5 s later if it is still there.
        proc = subprocess.run(["timeout", "-k", "5", str(limit), "bash", "-c", cmd],
                              stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                              stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - start
    with log.open("a") as handle:
        handle.write(f"\n# exit {proc.returncode} after {seconds:.1f} s\n")
    return proc.returncode, seconds


def format_summary(summary: dict) -> str:
    lines = [f"fastllm GPU check ({summary['mode']}): {summary.get('gpu') or 'no GPU'}, "
             f"commit {summary.get('commit') or 'unknown'}, {summary['started']}",
             f"{'stage':<10} {'status':<8} {'seconds':>7} {'limit':>5}  headline"]
    for s in summary["stages"]:
        head = json.dumps(s.get("headline") or {}, separators=(",", ":"))
        if s.get("note"):
            head = f"{s['note']}  {head}"
        if len(head) > 400:
            head = head[:397] + "..."
        seconds = f"{s['seconds']:.1f}" if s.get("seconds") is not None else "-"
        limit = str(s.get("limit_s") or "-")
        lines.append(f"{s['name']:<10} {s['status']:<8} {seconds:>7} {limit:>5}  {head}")
    lines.append(f"total {summary['total_s']:.1f} s of a {summary['budget_s']} s budget; "
                 f"files: {', '.join(summary['files'])}")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: pathlib.Path, logs: pathlib.Path, summary: dict) -> None:
    """summary.json, summary.txt and the archive of logs/ (with both summaries), each written
    beside its final name and renamed, so a reader never sees half a file."""
    summary["files"] = [ARCHIVE, "summary.json", "summary.txt"]
    text = format_summary(summary)
    blob = json.dumps(summary, indent=1) + "\n"
    (logs / "summary.json").write_text(blob)
    (logs / "summary.txt").write_text(text)
    scratch = logs.parent / (logs.name + ".tar.gz.tmp")
    with tarfile.open(scratch, "w:gz") as tar:
        tar.add(logs, arcname="gpu-check")
    shutil.move(str(scratch), str(out_dir / (ARCHIVE + ".tmp")))
    os.replace(out_dir / (ARCHIVE + ".tmp"), out_dir / ARCHIVE)
    for name, content in (("summary.json", blob), ("summary.txt", text)):
        tmp = out_dir / (name + ".tmp")
        tmp.write_text(content)
        os.replace(tmp, out_dir / name)


def output_dir(environ, argument: str | None) -> pathlib.Path:
    """$OUT when set (the GPU machine's tool sets it), else the argument, else the default."""
    return pathlib.Path(environ.get("OUT") or argument or DEFAULT_OUT)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="bench/gpu_check.sh", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", help="output folder ($OUT wins when set)")
    parser.add_argument("--out", dest="out_flag", help="same as the positional argument")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every stage in a mode that needs no GPU")
    parser.add_argument("--stages", default="",
                        help="comma-separated stages to run (env always runs); others are "
                             "reported as skipped")
    parser.add_argument("--limit", action="append", default=[], metavar="STAGE=SECONDS",
                        help="set one stage's time limit exactly (repeatable)")
    parser.add_argument("--budget", type=float, default=BUDGET_S,
                        help=f"seconds for the whole check (default {BUDGET_S})")
    # The GPU kernels' capabilities first: the stage's time limit may stop it part-way, and
    # bench/run.py saves each capability's records when it ends.
    parser.add_argument("--bench-only", default=os.environ.get("GPU_CHECK_BENCH_ONLY",
                                                               "lora,kv,sparse,memory,galore"),
                        help="capabilities for bench/run.py --only, in run order (default: all, "
                             "the GPU kernels' first)")
    parser.add_argument("--workers", type=int, default=4,
                        help="pytest-xdist workers for the CUDA tests where xdist is installed")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the scratch folder of logs (the archive holds them all)")
    parser.add_argument("--stall", default="",
                        help="(dry run only, for the tests of this script) replace this stage's "
                             "command by a long sleep")
    # helper modes, used as stage commands
    parser.add_argument("--probe-env", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--preflight-build", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-cuda-required", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.probe_env:
        return probe_env(args.probe_env)
    if args.preflight_build:
        return preflight_build(require_cuda=not args.no_cuda_required)

    fixed = {}
    for item in args.limit:
        name, _, seconds = item.partition("=")
        if name not in STAGE_NAMES or not seconds.replace(".", "", 1).isdigit():
            raise SystemExit(f"gpu_check: --limit wants STAGE=SECONDS with a stage among "
                             f"{STAGE_NAMES}, got {item!r}")
        fixed[name] = float(seconds)
    selected = set(STAGE_NAMES) if not args.stages else (
        {s.strip() for s in args.stages.split(",") if s.strip()} | {"env"})
    unknown = selected - set(STAGE_NAMES)
    if unknown:
        raise SystemExit(f"gpu_check: unknown stage(s) {sorted(unknown)}; stages: {STAGE_NAMES}")
    if args.stall and (args.stall not in STAGE_NAMES or not args.dry_run):
        raise SystemExit("gpu_check: --stall takes a stage name and needs --dry-run")

    out_dir = output_dir(os.environ, args.out or args.out_flag)
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = pathlib.Path(tempfile.mkdtemp(prefix="gpu-check-")) / "logs"
    logs.mkdir()
    t0 = time.monotonic()
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", TOKENIZERS_PARALLELISM="false")
    toolkit_bin = pathlib.Path("/usr/local/cuda/bin")
    if shutil.which("nvcc") is None and (toolkit_bin / "nvcc").exists():
        # The toolkit is installed but not on PATH: CMake, the preflight and the sanitizer
        # lookup all find it there.
        env["PATH"] = f"{env.get('PATH', '')}:{toolkit_bin}"
        os.environ["PATH"] = env["PATH"]
    ctx = Context(py=sys.executable, logs=logs, dry=args.dry_run, env={},
                  bench_only=args.bench_only, workers=args.workers)
    summary = {"mode": "dry-run" if args.dry_run else "gpu", "started": _now(),
               "commit": commit + ("-dirty" if dirty and commit else ""), "gpu": None,
               "budget_s": args.budget, "planned_s": {s.name: s.planned_s for s in STAGES},
               "out_dir": str(out_dir), "stages": [], "total_s": 0.0,
               "fastllm_import": "not checked (dry run)"}
    print(f"gpu_check: {summary['mode']}, results to {out_dir} (logs in {ARCHIVE})", flush=True)

    carry = 0.0
    fastllm_ok = None
    for index, stage in enumerate(STAGES):
        record = {"name": stage.name, "what": stage.what, "status": "skipped", "seconds": None,
                  "limit_s": None, "planned_s": fixed.get(stage.name, stage.planned_s),
                  "rc": None, "log": f"gpu-check/{stage.name}.log", "headline": {}}
        summary["stages"].append(record)
        if stage.name not in selected:
            record["note"] = "not selected (--stages)"
        elif stage.name not in ("env", "build") and fastllm_ok is False:
            record["note"] = f"fastllm does not import: {summary.get('fastllm_import')}"
        else:
            reserve = sum(fixed.get(s.name, s.planned_s) for s in STAGES[index + 1:]
                          if s.name in selected)
            planned = fixed.get(stage.name, stage.planned_s)
            limit = plan_limit(planned, carry, stage.name in fixed, time.monotonic() - t0,
                               args.budget, reserve)
            cmd = stage_command(stage.name, ctx)
            if args.stall == stage.name:
                cmd = "echo 'stalling on purpose (--stall)'; sleep 600"
            log = logs / f"{stage.name}.log"
            print(f"[{stage.name}] start, limit {limit} s: {cmd[:160]}", flush=True)
            rc, seconds = run_stage(cmd, log, limit, env)
            timed_out = rc in (124, 137) and seconds >= limit - 1
            status = "timeout" if timed_out else ("pass" if rc == 0 else "fail")
            if stage.name == "tests" and ctx.dry and rc == 5:
                status = "pass"  # collect-only found nothing to select here: not an error
            record.update(status=status, seconds=round(seconds, 1), limit_s=limit, rc=rc)
            if stage.name in fixed:
                record["note"] = f"limit set to {fixed[stage.name]:g} s"
            carry += planned - seconds if stage.name not in fixed else 0.0
            if stage.name == "env":
                ctx.env = _read_json(logs / "env.json") or {}
                summary["gpu"] = ctx.env.get("gpu_name")
                if not args.dry_run and not ctx.env.get("gpu"):
                    ctx.dry = True
                    summary["mode"] = "dry-run"
                    summary["dry_run_reason"] = "torch sees no GPU on this machine"
                    print("gpu_check: torch sees no GPU: running the dry run instead", flush=True)
            try:
                record["headline"] = headline(stage.name, ctx, log)
            except Exception as error:  # noqa: BLE001 - a parser bug must not stop the check
                record["headline"] = {"headline_error": repr(error)}
            print(f"[{stage.name}] {status} in {seconds:.1f} s "
                  f"{json.dumps(record['headline'], separators=(',', ':'))[:300]}", flush=True)
            if status != "pass":
                print(f"[{stage.name}] last lines of {log.name}:\n{_tail(log)}", flush=True)
        if stage.name == "build" and not ctx.dry:
            # Every later stage imports fastllm: when it does not import, they are skipped (in a
            # dry run nothing was installed, and the stages themselves show what fails).
            ok, detail = check_import()
            fastllm_ok = ok
            summary["fastllm_import"] = "ok" if ok else detail
            if ok and detail:
                summary["build_info"] = _read_json_text(detail)
        summary["total_s"] = round(time.monotonic() - t0, 1)
        write_outputs(out_dir, logs, summary)

    summary["total_s"] = round(time.monotonic() - t0, 1)
    write_outputs(out_dir, logs, summary)
    if not args.keep_logs:
        shutil.rmtree(logs.parent, ignore_errors=True)
    print()
    print(format_summary(summary), end="")
    failed = [s["name"] for s in summary["stages"] if s["status"] in ("fail", "timeout")]
    return 1 if failed else 0


def _read_json_text(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


if __name__ == "__main__":
    sys.exit(main())
