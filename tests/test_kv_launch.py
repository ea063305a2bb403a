"""The KV decode launch plans (pure host functions, checked here on the CPU) and static checks of
the compiled grouped decode kernel (no GPU needed): 16-byte cp.async copies, no stack or spills.
These guard the design until a GPU can time it."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from fastllm import _C
from test_lora_launch import needs_cuda_binary, resource_usage, sass_dump

SMS = 132  # an H100 / H200


@pytest.mark.parametrize("group", [1, 2, 4, 7, 8])
@pytest.mark.parametrize("d, elem", [(64, 2), (96, 2), (128, 2), (256, 2), (64, 4), (128, 4)])
def test_common_shapes_take_the_grouped_kernel(group, d, elem):
    grouped, tile, key_lanes, shared = _C.kv_plan_decode(group, d, elem)
    vec = 16 // elem
    assert grouped
    assert 8 <= tile <= 64 and 2 * tile * 2 * d * elem <= 2 * 16 * 1024  # two 16 KB buffers
    assert key_lanes >= d // vec and key_lanes & (key_lanes - 1) == 0 and key_lanes <= 32
    assert tile <= 8 * 4 * (32 // key_lanes)  # each lane's key words of a tile fit 8 registers
    assert shared <= 48 * 1024  # no opt-in to large shared memory needed
    assert group * (d // vec) <= 4 * 128  # at most 4 (head, chunk) accumulators per thread


@pytest.mark.parametrize("group, d, elem", [(4, 100, 2), (4, 7, 4), (4, 128, 8), (64, 256, 2),
                                            (8, 256, 4), (0, 64, 2), (129, 8, 2)])
def test_other_shapes_fall_back_to_the_per_head_kernel(group, d, elem):
    # head dims that are not whole 16-byte words, fp64, groups whose accumulators do not fit
    assert not _C.kv_plan_decode(group, d, elem)[0]


def test_head_dim_96_pads_its_key_lanes_to_a_power_of_two():
    assert _C.kv_plan_decode(4, 96, 2)[2] == 16  # 12 words of the key, 16 lanes


@pytest.mark.parametrize("caches", [1, 8, 64, 256, 2048])
@pytest.mark.parametrize("longest", [0, 1, 63, 64, 1000, 8192, 32768])
def test_splits_fill_two_waves_without_splits_shorter_than_64_entries(caches, longest):
    splits = _C.kv_plan_decode_splits(caches, longest, SMS)
    assert 1 <= splits <= 64
    assert splits == 1 or longest // splits >= 64
    # two waves of 4 resident blocks per SM, unless the cache is too short to split further
    assert caches * splits >= 8 * SMS or splits == 64 or splits == max(1, longest // 64)


def test_batch_1_with_1k_entries_splits_to_64_entries_and_batch_32_fills_two_waves():
    # 8 KV heads: 8 caches x 16 splits of 64 entries; 32 x 8 = 256 caches x 5 splits.
    assert _C.kv_plan_decode_splits(8, 1024, SMS) == 16
    assert _C.kv_plan_decode_splits(256, 8192, SMS) == 5


def _items_per_cache(work):
    return np.bincount(work[:, 0].numpy())


@pytest.mark.parametrize("bounds", [[1024] * 8, [8192] * 256, [0, 1, 5], [32768],
                                    [100, 8000, 3000, 64, 65, 12000] * 40])
def test_work_list_covers_every_cache_in_balanced_chunks(bounds):
    chunk, work = _C.kv_plan_decode_work(np.array(bounds, dtype=np.int64), SMS)
    work = torch.from_numpy(work)
    assert chunk >= 64 and chunk % 64 == 0
    counts = _items_per_cache(work)
    assert len(counts) == len(bounds) and (counts >= 1).all()
    for c, n in enumerate(bounds):
        firsts = work[work[:, 0] == c, 1]
        assert firsts.tolist() == [k * chunk for k in range(counts[c])]  # from 0, chunk apart
        assert counts[c] == max(1, -(-n // chunk))  # the last item reaches the bound
    # two waves of 4 blocks per SM (plus one item per cache), unless the chunk hit its 64 floor
    total = sum(bounds)
    assert chunk == 64 or len(work) >= min(8 * SMS, total // chunk)
    assert len(work) <= 8 * SMS + len(bounds)


def test_ragged_caches_get_items_by_their_own_length():
    # 32 sequences x 8 KV heads with FastGen-like ragged lengths: a 12k cache gets many items, a
    # 100-entry one a single item, and no item exceeds the chunk (even splits sized by the
    # longest cache would give every cache the same count).
    bounds = np.array([100, 12000, 3000, 800] * 64, dtype=np.int64)
    chunk, work = _C.kv_plan_decode_work(bounds, SMS)
    counts = _items_per_cache(torch.from_numpy(work))
    assert counts[0] == 1 and counts[1] == -(-12000 // chunk) > 8 * counts[0]
    assert 8 * SMS <= len(work) <= 8 * SMS + len(bounds)


def test_batch_1_with_1k_entries_gets_64_entry_items():
    chunk, work = _C.kv_plan_decode_work(np.full(8, 1024, dtype=np.int64), SMS)
    assert chunk == 64 and work.shape == (8 * 16, 2)


def _resource_usage() -> dict[str, str]:
    out = resource_usage()
    return dict(re.findall(r"Function (\S*decode_gqa_kernel\S*):\s*\n\s*(REG:.*)", out))


@needs_cuda_binary
def test_grouped_decode_kernel_has_no_spills_or_stack():
    usage = _resource_usage()
    assert len(usage) >= 3, "expected fp16, bf16 and fp32 grouped decode kernels"
    for name, line in usage.items():
        assert "STACK:0 " in line and "LOCAL:0" in line, f"{name}: {line}"


@needs_cuda_binary
def test_grouped_decode_kernel_streams_rows_with_16_byte_async_copies():
    out = sass_dump()
    found = 0
    for block in out.split("Function : ")[1:]:
        name = block.split("\n", 1)[0].strip()
        if "decode_gqa_kernel" in name:
            found += 1
            assert re.search(r"LDGSTS\.E\.BYPASS\.128", block), f"{name}: no 16-byte cp.async"
            assert "LDGDEPBAR" in block, f"{name}: copies never committed as a group"
    assert found >= 3


@needs_cuda_binary
def test_decode_step_kernels_have_no_spills_and_copy_rows_in_16_byte_words():
    # kv_decode_step's own kernels (the append of each cache's new row and the row move of an
    # eviction) around the decode and eviction launches: whole-block row copies.
    usage = dict(re.findall(r"Function (\S*decode_step_\w+_kernel\S*):\s*\n\s*(REG:.*)",
                            resource_usage()))
    assert len(usage) == 2, sorted(usage)
    for name, line in usage.items():
        assert "STACK:0 " in line and "LOCAL:0" in line, f"{name}: {line}"
    found = 0
    for block in sass_dump().split("Function : ")[1:]:
        name = block.split("\n", 1)[0].strip()
        if "decode_step_" in name:
            found += 1
            assert re.search(r"LDG\.E\.128", block) and re.search(r"STG\.E\.128", block), \
                f"{name}: rows not copied in 16-byte words"
    assert found == 2
