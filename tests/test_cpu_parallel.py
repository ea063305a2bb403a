"""The CPU kernels' defence against descheduled threads (csrc/common/cpu_parallel.h): what one
parallel call's timings decide. The kernels that use it are tested against their references in
their own files, at one and at several threads."""

import pytest

from fastllm import _C

FIRST, MAX, FLOOR = _C.cpu_first_serial_stretch, _C.cpu_max_serial_stretch, _C.cpu_wait_floor_ns


def test_a_wait_shorter_than_the_work_keeps_the_threads():
    assert _C.cpu_backoff_after(10 * FLOOR, 9 * FLOOR, 256) == (0, FIRST)


def test_a_short_wait_is_a_waking_thread_not_contention():
    # Tiny work: a wait above the work but under the floor is a thread leaving its spin.
    assert _C.cpu_backoff_after(1_000, FLOOR, FIRST) == (0, FIRST)


def test_a_late_thread_sends_the_next_calls_to_the_caller_and_doubles_the_stretch():
    # 100 us of work, then a 3 ms wait: a thread that lost its time slice.
    assert _C.cpu_backoff_after(100_000, 3_000_000, FIRST) == (FIRST, 2 * FIRST)
    assert _C.cpu_backoff_after(100_000, 3_000_000, 2 * FIRST) == (2 * FIRST, 4 * FIRST)


def test_the_stretch_is_capped():
    assert _C.cpu_backoff_after(0, 10 * FLOOR, MAX) == (MAX, MAX)


@pytest.mark.parametrize("work_ns,wait_ns", [(2 * FLOOR, 2 * FLOOR + 1), (0, FLOOR + 1)])
def test_just_past_both_bounds_counts_as_late(work_ns, wait_ns):
    assert _C.cpu_backoff_after(work_ns, wait_ns, FIRST)[0] == FIRST
