"""The KV benchmark's GPU decode grid, exercised at a tiny shape on the CPU so its first GPU run
is not spent on a bug in the benchmark itself (the figures here mean nothing)."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))

pytest.importorskip("transformers")  # bench_kv loads the model helpers
import bench_kv  # noqa: E402
from harness import Progress  # noqa: E402

import fastllm.ops as ops  # noqa: E402
from fastllm._reference import dense_masked_decode_reference  # noqa: E402


def test_ragged_case_holds_the_kept_entries_of_the_full_cache():
    q, full, kv_rows, table, lens, page_rows = bench_kv.ragged_case(2, 2, 3, 16, 40, 0.4,
                                                                     torch.float32, "cpu")
    keep = torch.zeros(2, 2, 40, dtype=torch.bool)
    # the ragged decode over the kept rows equals dense attention with the others masked
    out, _, _ = ops.kv_ragged_decode(q, kv_rows, table, lens, page_rows, 0.25, 1)
    for c, n in enumerate(lens.tolist()):
        rows = kv_rows[table[c].long().repeat_interleave(page_rows) * page_rows
                       + torch.arange(page_rows).repeat(table.shape[1])][:n]
        for row in rows:
            match = (full[c // 2, c % 2] == row).all(-1).nonzero()
            assert match.numel() == 1
            keep[c // 2, c % 2, match[0, 0]] = True
    want = dense_masked_decode_reference(q, full[..., :16], full[..., 16:], keep, 0.25)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_gpu_decode_grid_runs_and_records_its_figures():
    cases = [(1, 2, 4, 16, 64, 0.4, torch.float32), (2, 2, 2, 8, 33, 1.0, torch.float32),
             (2, 2, 2, 8, 90, "mixed", torch.float32)]
    records = bench_kv.gpu_decode_grid("cpu", True, Progress("kv", len(cases)), 10.0, cases)
    assert [r.baseline for r in records[:3]] == ["SDPA (full cache)"] * 3
    assert "even splits" in records[3].baseline and len(records) == 4
    for record in records[:3]:
        assert record.metrics["GB/s"] > 0 and record.metrics["% of copy BW"] > 0
        assert record.metrics["work items"] >= 2


def test_mixed_caches_keep_different_shares():
    _, _, _, _, lens, _ = bench_kv.ragged_case(4, 4, 1, 8, 400, "mixed", torch.float32, "cpu")
    assert int(lens.max()) > 4 * int(lens.min())


def test_profiling_vs_sdpa_runs_and_records_its_ratio():
    records = bench_kv.profiling_vs_sdpa("cpu", True, Progress("kv", 1), [(4, 2, 16, 40)])
    assert len(records) == 1 and records[0].baseline == "SDPA causal prefill"
    assert records[0].metrics["profiling / SDPA"] > 0
