"""The batch break-even study's own logic at a tiny shape (its figures here mean nothing)."""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))

import sparse_batch_study  # noqa: E402


def test_study_times_both_batch_set_kinds_and_names_a_break_even():
    result = sparse_batch_study.study("cpu", True, shapes=[("tiny 64x128", 64, 128)],
                                      batches=[1, 3])
    assert len(result["rows"]) == 2 * 2  # two sparsities x two batches
    for row in result["rows"]:
        assert row["dense_ms"] > 0 and row["per_row_ms"] > 0 and row["union_ms"] > 0
        assert 0 < row["union_density"] <= 1
    assert set(result["break_even"]) == {"tiny 64x128 s=50%", "tiny 64x128 s=80%"}
    assert all(b in (0, 1, 3) for b in result["break_even"].values())
