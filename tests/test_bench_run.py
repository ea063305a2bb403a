"""bench/run.py imports every bench/bench_*.py and calls its CAPABILITY's run(): a script there
without them breaks every benchmark run, the GPU check's included (it did once)."""

from __future__ import annotations

import importlib
import inspect
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

SCRIPTS = sorted(p.stem for p in BENCH.glob("bench_*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_bench_script_is_a_capability_run_py_can_call(name):
    module = importlib.import_module(name)
    assert isinstance(module.CAPABILITY, str) and module.CAPABILITY
    params = inspect.signature(module.run).parameters
    assert list(params)[:2] == ["device", "quick"]


def test_capabilities_are_distinct():
    names = [importlib.import_module(name).CAPABILITY for name in SCRIPTS]
    assert len(names) == len(set(names))


def test_serving_results_become_records_against_the_best_split_and_peft():
    import bench_unified
    run = {"req_per_s": 2.0, "peak_concurrency": 9, "loadavg_before": [0.5, 0.4, 0.3]}
    results = {"unified": {"5": run, "100": dict(run, req_per_s=1.0)},
               "split-25": {"5": {"req_per_s": 1.0, "peak_concurrency": 4}},
               "split-50": {"5": {"req_per_s": 1.6, "peak_concurrency": 6}},
               "peft": {"5": {"req_per_s": 0.5}}}
    records = bench_unified.serving_records(results)
    by = {(r.case, r.baseline): r for r in records}
    assert set(by) == {("5 adapters", "best fixed split (split-50)"), ("5 adapters", "PEFT")}
    assert by["5 adapters", "best fixed split (split-50)"].speedup == pytest.approx(2.0 / 1.6)
    assert by["5 adapters", "PEFT"].speedup == pytest.approx(4.0)
    assert by["5 adapters", "best fixed split (split-50)"].metrics["peak concurrency, split"] == 6
