"""bench/gpu_check.sh without a GPU: its dry run end to end (every stage listed with a status, a
stage that overruns its limit reported as a timeout while the check goes on, at most 8 files out),
and the pieces a GPU run depends on that can be checked here: which tests count as CUDA tests,
the time plan, the commands a GPU run would execute, the parsers of their output, the sync
counter. The first GPU minutes should never be spent on a bug of the script itself."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tarfile
import time
import warnings
from types import SimpleNamespace

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402


# ---- the dry run, end to end ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run in a temp folder, with racecheck (an echo in a dry run) replaced by a sleep
    that overruns a 2 s limit."""
    out = tmp_path_factory.mktemp("gpu-check-out")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    start = time.monotonic()
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run",
                           "--limit", "racecheck=2", "--stall", "racecheck"],
                          capture_output=True, text=True, env=env, timeout=400)
    seconds = time.monotonic() - start
    summary_path = out / "summary.json"
    assert summary_path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    return SimpleNamespace(proc=proc, out=out, summary=summary, seconds=seconds,
                           stages={s["name"]: s for s in summary["stages"]})


def test_dry_run_lists_every_stage_in_order_with_a_status(dry_run):
    summary = dry_run.summary
    assert summary["mode"] == "dry-run"
    assert [s["name"] for s in summary["stages"]] == gpu_check.STAGE_NAMES
    for stage in summary["stages"]:
        assert stage["status"] in gpu_check.STATUSES, stage
        if stage["status"] != "skipped":
            assert stage["limit_s"] >= 1
            assert stage["seconds"] <= stage["limit_s"] + 10, stage
    assert summary["total_s"] <= summary["budget_s"]
    text = (dry_run.out / "summary.txt").read_text()
    for name in gpu_check.STAGE_NAMES:
        assert f"\n{name} " in text


def test_dry_run_stages_that_need_no_gpu_pass(dry_run):
    stages = dry_run.stages
    assert stages["env"]["status"] == "pass"
    assert stages["build"]["status"] == "pass", stages["build"]  # preflight + the echoed install
    assert stages["build"]["headline"]["missing"] == []
    for name in ("tests", "memcheck", "graphs", "syncs", "bench"):
        assert stages[name]["status"] == "pass", (stages[name], dry_run.proc.stdout[-4000:])
    # The CUDA selection ran as a pytest plugin: here only the build checks and the tests
    # skipped without CUDA are selected, a small part of the suite.
    tests = stages["tests"]["headline"]
    assert 3 <= tests["selected"] < tests["collected"]
    graphs = stages["graphs"]["headline"]
    for name in ("lora", "sparse", "fastgen"):
        assert graphs[name]["ok"] and graphs[name]["replay_equal"], graphs
        assert graphs[name]["eager_ms"] > 0
    syncs = stages["syncs"]["headline"]
    assert set(syncs["per_step"]) == {"lora", "galore"}  # the dry run's share (see its --only)
    assert syncs["ops_counted"] >= 10


def test_overrunning_stage_is_a_timeout_and_the_check_goes_on(dry_run):
    racecheck = dry_run.stages["racecheck"]
    assert racecheck["status"] == "timeout"
    assert racecheck["limit_s"] == 2 and racecheck["seconds"] < 12
    assert "limit set to 2 s" in racecheck["note"]
    after = gpu_check.STAGE_NAMES[gpu_check.STAGE_NAMES.index("racecheck") + 1:]
    assert all(dry_run.stages[name]["status"] == "pass" for name in after)
    assert dry_run.proc.returncode == 1  # a timeout is a failure of the check
    assert "[racecheck] timeout" in dry_run.proc.stdout


def test_dry_run_writes_an_archive_and_a_summary_only(dry_run):
    files = sorted(p.name for p in dry_run.out.iterdir())
    assert len(files) <= gpu_check.MAX_OUT_FILES
    assert files == sorted(dry_run.summary["files"]) == sorted(
        [gpu_check.ARCHIVE, "summary.json", "summary.txt"])
    assert all((dry_run.out / f).is_file() for f in files)
    with tarfile.open(dry_run.out / gpu_check.ARCHIVE) as tar:
        names = set(tar.getnames())
        ran = [s["name"] for s in dry_run.summary["stages"] if s["seconds"] is not None]
        for name in ran:
            assert f"gpu-check/{name}.log" in names
        assert "gpu-check/summary.json" in names and "gpu-check/env.json" in names
        archived = json.loads(tar.extractfile("gpu-check/summary.json").read())
    assert [s["status"] for s in archived["stages"]] == [
        s["status"] for s in dry_run.summary["stages"]]


def test_without_a_gpu_the_check_runs_dry_and_only_the_selected_stages(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check would not run dry")
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"),
                           "--stages", "racecheck", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    summary = json.loads((tmp_path / "summary.json").read_text())  # the argument, without $OUT
    assert summary["mode"] == "dry-run" and "no GPU" in summary["dry_run_reason"]
    status = {s["name"]: s["status"] for s in summary["stages"]}
    assert status["env"] == "pass" and status["racecheck"] == "pass", proc.stdout[-3000:]
    assert {n for n, s in status.items() if s == "skipped"} == set(gpu_check.STAGE_NAMES) - {
        "env", "racecheck"}
    assert proc.returncode == 0


# ---- which tests are the CUDA tests --------------------------------------------------------------

class FakeMark:
    def __init__(self, name, *args, **kwargs):
        self.name, self.args, self.kwargs = name, args, kwargs


class FakeItem:
    def __init__(self, nodeid, params=None, marks=()):
        self.nodeid = nodeid
        if params is not None:
            self.callspec = SimpleNamespace(params=params)
        self._marks = list(marks)

    def iter_markers(self):
        return iter(self._marks)


def test_cuda_tests_are_told_apart_from_cpu_ones():
    import torch
    needs = gpu_check.needs_gpu
    assert needs(FakeItem("tests/test_lora_ops.py::test_shrink[cuda-float16]",
                          {"device": "cuda", "dtype": torch.float16}))
    assert needs(FakeItem("tests/test_x.py::test_y[dev1]", {"dev": torch.device("cuda", 0)}))
    assert not needs(FakeItem("tests/test_lora_ops.py::test_shrink[cpu-float16]",
                              {"device": "cpu", "dtype": torch.float16}))
    assert needs(FakeItem("tests/test_g.py::test_capture",
                          marks=[FakeMark("skipif", False, reason="needs a CUDA device")]))
    assert needs(FakeItem("tests/test_g.py::test_graph",
                          marks=[FakeMark("skipif", "not torch.cuda.is_available()")]))
    assert needs(FakeItem("tests/test_g.py::test_marked", marks=[FakeMark("gpu")]))
    assert not needs(FakeItem("tests/test_build.py::test_cmake_rejects_unknown_mode",
                              marks=[FakeMark("skipif", False, reason="nvcc is in a system dir")]))
    assert needs(FakeItem("tests/test_build.py::test_build_info_describes_this_build"))
    assert not needs(FakeItem("tests/test_gpu_check.py::test_gpu_x", {"device": "cuda"}))


# ---- the time plan -------------------------------------------------------------------------------

def test_the_planned_stages_fit_in_eight_minutes():
    planned = sum(s.planned_s for s in gpu_check.STAGES)
    assert planned < gpu_check.BUDGET_S <= 8 * 60
    assert gpu_check.STAGE_NAMES == ["env", "build", "tests", "memcheck", "racecheck", "graphs",
                                     "syncs", "bench"]


def test_stage_limits_take_unused_time_but_never_the_later_stages_share():
    plan = gpu_check.plan_limit
    assert plan(70, 0, False, elapsed=200, budget=465, reserve=180) == 70
    assert plan(70, 100, False, elapsed=100, budget=465, reserve=180) == 170
    assert plan(70, 100, True, elapsed=100, budget=465, reserve=180) == 70  # --limit: exact
    assert plan(70, 300, False, elapsed=100, budget=465, reserve=180) == 185  # budget bound
    assert plan(70, 0, False, elapsed=460, budget=465, reserve=180) == 1


def test_output_folder_is_out_then_the_argument_then_the_default():
    assert gpu_check.output_dir({"OUT": "/x"}, "/y") == pathlib.Path("/x")
    assert gpu_check.output_dir({}, "/y") == pathlib.Path("/y")
    assert gpu_check.output_dir({"OUT": ""}, None) == gpu_check.DEFAULT_OUT


# ---- what a GPU run would execute ----------------------------------------------------------------

def test_gpu_mode_commands(tmp_path):
    sanitizer = tmp_path / "compute-sanitizer"
    sanitizer.write_text("#!/bin/sh\necho '--kernel-name --report-api-errors --tool'\n")
    sanitizer.chmod(0o755)
    env = {"gpu": True, "capability": "9.0", "cores": 16, "compute_sanitizer": str(sanitizer),
           "has_pytest_timeout": True, "has_xdist": True}
    ctx = gpu_check.Context(py="/opt/py", logs=tmp_path, dry=False, env=env, bench_only="",
                            workers=4)
    build = gpu_check.stage_command("build", ctx)
    for part in ("--preflight-build &&", "TORCH_CUDA_ARCH_LIST=9.0", "FASTLLM_CUDA=ON",
                 "CMAKE_BUILD_PARALLEL_LEVEL=16", "pip install --no-build-isolation --no-deps",
                 "BUILD_INFO", "-m fastllm"):
        assert part in build, (part, build)
    assert "--no-cuda-required" not in build
    tests = gpu_check.stage_command("tests", ctx)
    for part in ("-m pytest tests -p gpu_check", f"PYTHONPATH={REPO / 'bench'}", "--junitxml=",
                 "--timeout=60", "-n 4"):
        assert part in tests, (part, tests)
    assert "--collect-only" not in tests
    memcheck = gpu_check.stage_command("memcheck", ctx)
    for part in ("PYTORCH_NO_CUDA_MEMORY_CACHING=1", str(sanitizer), "--tool memcheck",
                 "--error-exitcode 1", "--kernel-name kns=fastllm", "--report-api-errors no",
                 "bench/sanitize_cases.py --device cuda"):
        assert part in memcheck, (part, memcheck)
    assert "--tool racecheck" in gpu_check.stage_command("racecheck", ctx)
    assert "--dry-run" not in gpu_check.stage_command("graphs", ctx)
    assert "--dry-run" not in gpu_check.stage_command("syncs", ctx)
    assert gpu_check.stage_command("bench", ctx).endswith(
        f"bench/run.py --quick --out {tmp_path / 'bench'}")
    for name in gpu_check.STAGE_NAMES:  # every command a GPU run executes is valid bash
        cmd = gpu_check.stage_command(name, ctx)
        check = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert check.returncode == 0, (name, cmd, check.stderr)
    ctx.env = dict(env, compute_sanitizer=None)
    assert "not found" in gpu_check.stage_command("memcheck", ctx)


# ---- parsers of the stages' output ---------------------------------------------------------------

def test_sanitizer_summaries_are_read():
    memcheck = ("========= Invalid __global__ read of size 4 bytes\n"
                "=========     at fastllm::pool::move_rows_kernel+0x1c0\n"
                "========= ERROR SUMMARY: 3 errors\n")
    head = gpu_check._sanitizer_headline(memcheck)
    assert head["errors"] == 3
    assert head["first_reports"] == ["Invalid __global__ read of size 4 bytes"]
    race = "========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n"
    assert gpu_check._sanitizer_headline(race) == {"hazards": 2, "race_errors": 1,
                                                   "race_warnings": 1}
    assert gpu_check._sanitizer_headline("========= ERROR SUMMARY: 0 errors") == {"errors": 0}


def test_test_counts_are_read_from_junit_or_the_pytest_line(tmp_path):
    xml = tmp_path / "tests.xml"
    xml.write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2">'
                   '<testcase classname="tests.test_a" name="test_x[cuda]"><failure/></testcase>'
                   '</testsuite></testsuites>')
    head = gpu_check._tests_headline("", xml)
    assert head == {"tests": 5, "failures": 1, "errors": 0, "skipped": 2, "passed": 2,
                    "failed_tests": ["tests.test_a::test_x[cuda]"]}
    head = gpu_check._tests_headline("12/900 tests collected (888 deselected) in 3s",
                                     tmp_path / "none.xml")
    assert head["selected"] == 12 and head["collected"] == 900 and head["deselected"] == 888


# ---- the sync counter ----------------------------------------------------------------------------

def test_sync_counter_counts_sync_warnings_and_their_call_sites():
    import gpu_sync_count

    def step():
        warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("something else")
        warnings.warn("called a synchronizing CUDA operation")

    with gpu_sync_count.SyncRecorder(enabled=False) as recorder:
        n, sites = gpu_sync_count.count(recorder, step)
        again, _ = gpu_sync_count.count(recorder, lambda: None)
    assert n == 2 and again == 0
    assert list(sites) and all(site.startswith("tests/test_gpu_check.py:") for site in sites)
