"""The sparse benchmark's predictor-scoring rows (packed int4 against int8, same run), exercised at
a tiny shape so a broken benchmark is found here rather than on a GPU (the figures mean nothing)."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))

import bench_sparse  # noqa: E402
from harness import Progress  # noqa: E402


def test_scoring_rows_compare_packed_int4_with_int8_in_one_run():
    records = bench_sparse.scoring("cpu", True, Progress("sparse", 2), shapes=[("tiny", 64, 40)],
                                   batches=(1, 3))
    assert [r.case for r in records] == ["scores tiny B=1", "scores tiny B=3"]
    for r in records:
        assert (r.ours, r.baseline) == ("int4 packed scores", "int8 scores")
        assert r.ours_ms > 0 and r.baseline_ms > 0
        # codes 1/2 + scales 4/32 per weight against 1 + 4/64
        assert r.metrics["bytes int4 / int8"] == pytest.approx((0.5 + 4 / 32) / (1 + 4 / 64))
        assert r.metrics["GB/s int4"] > 0 and r.metrics["GB/s int8"] > 0
