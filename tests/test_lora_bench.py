"""bench/bench_lora.py's code paths on the CPU, so the GPU minutes are not what finds their bugs:
the three kernel candidates compute the same thing, the input-set rotation, the quick GPU run's
deadline, and the Llama-8B-shaped decode-overhead case at its tiny CPU shape."""

from __future__ import annotations

import math
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))

import bench_lora  # noqa: E402

transformers = pytest.importorskip("transformers")


def test_the_kernel_candidates_agree():
    # ours, the PEFT loop and the gathered bmm are timed against each other: they must compute
    # the same h and the same update of y.
    p = bench_lora._kernel_problem(6, 3, [2, 4, 3], 16, 24, torch.float32, "cpu")
    fns = bench_lora._kernel_candidates(p, 6, 24, torch.float32, "cpu")
    ours = fns["ours_shrink"]()
    torch.testing.assert_close(fns["peft_shrink"](), ours)
    torch.testing.assert_close(fns["bmm_shrink"]().unsqueeze(0), ours)
    deltas = {}
    for kind in ("ours", "peft", "bmm"):
        before = p["y"].clone()
        fns[f"{kind}_expand"]()
        deltas[kind] = p["y"] - before
    assert deltas["ours"].abs().max() > 0
    torch.testing.assert_close(deltas["peft"], deltas["ours"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(deltas["bmm"], deltas["ours"], rtol=1e-5, atol=1e-6)


def test_kernel_records_report_ratios_and_bandwidth():
    cases = [(64, 96, 4, 2, "r4", [4]), (64, 96, 8, 8, "mixed", [2, 8])]
    records, _ = bench_lora._kernel_records("cpu", True, 0, cases=cases)
    assert [(r.case.split()[0], r.baseline) for r in records] == [
        (op, base) for _ in cases for op in ("shrink", "expand")
        for base in ("peft loop", "gathered bmm")]
    for r in records:
        assert r.ours_ms > 0 and r.baseline_ms > 0 and r.metrics["input sets"] == 1
        assert 0 < r.metrics["GB/s"] and r.metrics["% of copy BW"] > 0


def test_the_prefill_candidates_agree():
    # 40 tokens on 2 adapters: chunks of 16 + 4 tokens each (the rule's smallest, for so few
    # tokens); every candidate computes one h and one update of y.
    p = bench_lora._kernel_problem(40, 2, [4, 6], 16, 24, torch.float32, "cpu")
    fns, chunks = bench_lora._prefill_candidates(p, torch.float32, "cpu")
    assert chunks == 4
    ours = fns["ours_shrink"]()
    for kind in ("tiles", "bgmv", "peft"):
        torch.testing.assert_close(fns[f"{kind}_shrink"](), ours, rtol=1e-5, atol=1e-6)
    deltas = {}
    for kind in ("ours", "tiles", "bgmv", "peft"):
        before = p["y"].clone()
        fns[f"{kind}_expand"]()
        deltas[kind] = p["y"] - before
    assert deltas["ours"].abs().max() > 0
    for kind in ("tiles", "bgmv", "peft"):
        torch.testing.assert_close(deltas[kind], deltas["ours"], rtol=1e-5, atol=1e-6)


def test_prefill_records_report_ratios_and_bandwidth():
    cases = [(64, 96, 40, 2, "r4", [4]), (64, 96, 24, 3, "mixed", [2, 8])]
    records = bench_lora._prefill_records("cpu", True, None, cases=cases)
    assert [(r.case.split()[0], r.baseline) for r in records] == [
        (op, base) for _ in cases for op in ("shrink", "expand")
        for base in ("8-token tiles", "bgmv", "peft loop")]
    for r in records:
        assert r.ours_ms > 0 and r.baseline_ms > 0 and r.metrics["chunks"] >= 1
        assert 0 < r.metrics["GB/s"] and r.metrics["% of copy BW"] > 0


def test_rotation_cycles_every_set_and_the_cpu_uses_one():
    calls = []
    fn = bench_lora._rotating([lambda i=i: calls.append(i) for i in range(3)])
    for _ in range(7):
        fn()
    assert calls == [0, 1, 2, 0, 1, 2, 0]
    assert bench_lora._input_sets(1 << 10, "cpu") == 1


def test_deadline_skips_and_names_what_it_skipped(capsys):
    assert not bench_lora._Deadline(None).passed("anything")
    late = bench_lora._Deadline(-1.0)
    assert late.passed("kernels 4096->4096 b64 64ad r16")
    assert late.skipped == ["kernels 4096->4096 b64 64ad r16"]
    assert "skipped" in capsys.readouterr().out


def test_llama8b_decode_overhead_runs_at_its_cpu_shape():
    records = bench_lora._llama8b_decode_records("cpu", quick=True, counts=(1, 8, 128))
    assert [r.case.split(": ")[1] for r in records] == [
        f"decode batch 128, {n} adapters r8-64 x7 proj, eager" for n in (1, 8, 128)]
    for r in records:
        assert r.case.startswith("tiny llama-8b-ratio")  # the name says the shape is not 8B's
        assert r.baseline == "base model" and r.ours_ms > 0 and r.baseline_ms > 0
        assert math.isclose(r.metrics["overhead %"], 100 * (r.ours_ms / r.baseline_ms - 1))
        assert r.metrics["batch setup ms"] > 0
