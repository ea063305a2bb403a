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


def test_speed_rows_time_every_predictor_against_dense_in_one_run():
    records = bench_sparse._speed("cpu", True, Progress("sparse", 9), shapes=[("tiny", 64, 64)])
    kinds = {r.ours for r in records}
    assert kinds == {"sparse+pred", "sparse+int8 pred", "sparse+int4 pred (default)"}
    default = [r for r in records if r.ours == "sparse+int4 pred (default)"]
    assert len(default) == 9  # batch 1, 4 shared, 4 per-row x 50 / 80 / 90%
    int8 = {r.case: r for r in records if r.ours == "sparse+int8 pred"}
    for r in default:
        assert r.ours_ms > 0 and r.baseline_ms > 0 and r.baseline == "dense MLP"
        # the same kept rows, with half the predictor's code bytes
        assert 0 < r.metrics["bytes read / dense"] < int8[r.case].metrics["bytes read / dense"]


def test_streamed_rows_cycle_every_layer_against_dense_over_the_same_layers():
    records = bench_sparse.streamed("cpu", True, Progress("sparse", 3), layers=3,
                                    shape=("tiny", 64, 64))
    assert [r.case for r in records] == [f"tiny B=1 s={s} streamed over 3 layers"
                                         for s in ("50%", "80%", "90%")]
    predictor_share = (2 * 64 * 64 * (0.5 + 4 / 32)) / (3 * 64 * 64 * 4)  # int4 gate+up, fp32
    for r, s in zip(records, (0.5, 0.8, 0.9)):
        assert (r.ours, r.baseline) == ("sparse+int4 pred (default)", "dense MLP")
        assert r.ours_ms > 0 and r.baseline_ms > 0
        keep = round((1 - s) * 64)  # 32, 13, 6 of the 64 neurons
        assert r.metrics["bytes read / dense"] == pytest.approx(predictor_share + keep / 64)
        assert r.metrics["bytes-model x"] == pytest.approx(1 / r.metrics["bytes read / dense"])
