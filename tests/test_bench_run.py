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


def test_serving_targets_report_the_base_models_ceiling_over_peft():
    import bench_unified
    results = {"unified": {"5": {"req_per_s": 2.0, "peak_concurrency": 9},
                           "100": {"req_per_s": 1.5, "peak_concurrency": 8}},
               "split-50": {"100": {"req_per_s": 1.4, "peak_concurrency": 6}},
               "peft": {"100": {"req_per_s": 1.0}},
               "base": {"5": {"req_per_s": 2.5}}}
    got = bench_unified.targets(results, [5, 100], [50])
    assert got["unified_over_peft_req_s_at_100"] == pytest.approx(1.5)
    assert got["base_over_peft_req_s_at_100"] == pytest.approx(2.5)
    assert got["peak_concurrency_unified_vs_best_split_at_100"] == [8, 6]
    assert "base_over_peft_req_s_at_100" not in bench_unified.targets(
        {k: v for k, v in results.items() if k != "base"}, [5, 100], [50])


def _serving_pool(model, nbytes):
    """A pool laid out as bench_unified lays out the unified one."""
    import bench_unified
    from fastllm.memory import PagePool
    return PagePool.for_model(model, nbytes=nbytes, target_modules=bench_unified.TARGETS, rank=32)


def _serving_manager(model, pool, names):
    """An AdapterManager on ``pool`` holding bench_unified's adapters ``names``."""
    import bench_unified
    from fastllm.lora import AdapterManager
    manager = AdapterManager(model, target_modules=bench_unified.TARGETS, max_rank=64, pool=pool)
    for name in names:
        manager.load(name, *bench_unified.adapter_state(model, name))
    return manager


def test_serving_loop_rejects_only_what_an_empty_pool_cannot_hold(smollm2, shakespeare):
    """With nothing running, a request whose adapter and prompt fit the pool once the queued
    requests' adapters give way is served: the loop used to keep those adapters and reject it
    as never fitting (53 of 300 requests of one committed run)."""
    import copy

    import bench_unified
    import torch
    from fastllm.kv import FastGenCache

    model, tokenizer = smollm2
    model = copy.deepcopy(model)
    prompt = tokenizer(shakespeare[:2000], return_tensors="pt").input_ids[:, :16]

    def pool_of(nbytes):
        return _serving_pool(model, nbytes)

    def manager_on(pool):
        return _serving_manager(model, pool, ("ad1", "ad3"))  # ranks 16 and 64

    # Pages each part takes, measured on a roomy pool.
    probe = pool_of(256 << 20)
    manager = manager_on(probe)
    pages = {}
    for name in ("ad1", "ad3"):
        before = probe.used_pages
        with manager.batch([name]):
            pages[name] = probe.used_pages - before
    cache = FastGenCache(model, tokenizer, pool=probe)
    before = probe.used_pages
    with manager.batch(["ad1"]), torch.no_grad():
        cache.join(prompt)
        model(prompt[:, :1], attention_mask=cache.attention_mask(1),
              position_ids=cache.position_ids(1), cache=cache, use_cache=True)
    pages["kv"] = probe.used_pages - before + 8  # the decode steps' appends, with room
    cache.release()
    manager.close()

    # Room for the big adapter and one sequence's KV, not for the small adapter as well.
    pool = pool_of((pages["ad3"] + pages["kv"] + pages["ad1"] // 2) * probe.page_bytes)
    manager = manager_on(pool)
    try:
        trace = [bench_unified.Request(0, 0.0, prompt.clone(), "ad1", 2),
                 bench_unified.Request(1, 0.5, prompt.clone(), "ad3", 2),
                 bench_unified.Request(2, 0.5, prompt.clone(), "ad1", 2)]
        result = bench_unified.serve(model, tokenizer, trace, pool, manager, max_batch=4)
    finally:
        manager.close()
    assert result["rejected"] == 0 and result["requests"] == 3, result


def test_serving_loop_retries_a_failed_admission_only_after_a_sequence_finishes(smollm2,
                                                                                 shakespeare):
    """A prompt that found no room cannot fit before a running sequence finishes (the batch only
    grows until then); retrying at every decode step ran that prompt, and loaded its adapter,
    once per step."""
    import copy

    import bench_unified
    import torch
    from fastllm.kv import FastGenCache

    model, tokenizer = smollm2
    model = copy.deepcopy(model)
    prompt = tokenizer(shakespeare[:2000], return_tensors="pt").input_ids[:, :16]
    steps = 8

    def pool_of(nbytes):
        return _serving_pool(model, nbytes)

    def manager_on(pool):
        return _serving_manager(model, pool, ("ad4",))  # rank 8

    probe = pool_of(256 << 20)
    manager = manager_on(probe)
    with manager.batch(["ad4"]):
        adapter_pages = probe.used_pages
    cache = FastGenCache(model, tokenizer, pool=probe)
    with manager.batch(["ad4"]), torch.no_grad():
        cache.join(prompt)
        for _ in range(steps):
            model(prompt[:, :1], attention_mask=cache.attention_mask(1),
                  position_ids=cache.position_ids(1), cache=cache, use_cache=True)
    kv_pages = probe.used_pages - adapter_pages
    cache.release()
    manager.close()

    # The adapter and one sequence's KV with a few pages to spare: never two sequences at once.
    pool = pool_of((adapter_pages + kv_pages + 4) * probe.page_bytes)
    manager = manager_on(pool)
    try:
        trace = [bench_unified.Request(i, 0.0, prompt.clone(), "ad4", steps) for i in range(3)]
        result = bench_unified.serve(model, tokenizer, trace, pool, manager, max_batch=4)
    finally:
        manager.close()
    assert result["requests"] == 3 and result["rejected"] == 0, result
    assert result["peak_concurrency"] == 1, result
    # One failed try per request that had to wait for a finish (the old loop: one per step).
    assert result["failed_admissions"] <= 2, result
