"""The CUDA kernels' launch plans and the tensor-core SGMV chunks (pure host functions, checked here
on the CPU), and static checks of the compiled LoRA kernels (no GPU needed): no spills or stack,
16-byte global loads in the decode shrink and expand, tensor-core MMA and 16-byte cp.async
staging (double-buffered in the shrink) in the prefill kernels. These guard the design until a
GPU can time it."""

from __future__ import annotations

import functools
import pathlib
import re
import shutil
import subprocess

import pytest
import torch

import fastllm
import fastllm.ops as ops
from fastllm import _C

SMS = 132  # an H100 / H200
VEC = {"fp16": 8, "fp32": 4, "fp64": 2}


@pytest.mark.parametrize("tokens", [1, 2, 7, 64, 512])
@pytest.mark.parametrize("slices", [1, 3])
@pytest.mark.parametrize("hidden", [8, 136, 4096, 8192, 14336])
@pytest.mark.parametrize("max_rank", [1, 16, 256])
@pytest.mark.parametrize("vec", [8, 4])
def test_shrink_plan_covers_k_and_fills_the_gpu_when_it_can(tokens, slices, hidden, max_rank, vec):
    splits, chunk, row_groups = _C.lora_plan_shrink(tokens, slices, hidden, max_rank, SMS, vec)
    step = 32 * vec  # one 16-byte load per lane
    assert chunk % step == 0 and chunk <= _C.lora_max_shrink_chunk
    assert splits * chunk >= hidden > (splits - 1) * chunk  # every column, no empty split
    assert row_groups * 4 >= max_rank > (row_groups - 1) * 4
    assert splits * row_groups <= 65535  # grid.y
    blocks = tokens * slices * splits * row_groups
    # Either two waves of blocks, or K is already cut into single warp steps (nothing left to split).
    assert blocks >= 2 * SMS or chunk == step or splits == -(-hidden // step)


def test_batch_1_decode_splits_k_to_single_warp_steps():
    # One token, hidden 4096, rank 16, fp16: 16 K splits x 4 row groups = 64 blocks of 4 warps,
    # each lane one 16-byte load: all the independent work a 128 KB read has.
    assert _C.lora_plan_shrink(1, 1, 4096, 16, SMS, 8) == (16, 256, 4)


def test_64_decode_tokens_get_two_waves():
    splits, chunk, row_groups = _C.lora_plan_shrink(64, 1, 4096, 16, SMS, 8)
    assert 64 * splits * row_groups >= 2 * SMS and splits == 2


@pytest.mark.parametrize("tokens", [1, 8, 64, 512])
@pytest.mark.parametrize("widest, vec", [(8, 8), (1024, 8), (1025, 8), (4096, 8), (14336, 4)])
def test_expand_tiles_cover_the_widest_slice_with_smaller_blocks_for_few_tokens(tokens, widest,
                                                                                vec):
    threads, tiles = _C.lora_plan_expand(tokens, 1, widest, vec, SMS)
    assert threads in (32, 64, 128)
    assert tiles * threads * vec >= widest > (tiles - 1) * threads * vec
    if threads > 32:  # blocks only shrink while the launch is under two waves
        assert tokens * tiles >= 2 * SMS


def test_batch_1_expand_uses_single_warp_blocks():
    # hidden 4096, fp16: 16 blocks of one warp (256 columns each) instead of 4 of 128 threads
    assert _C.lora_plan_expand(1, 1, 4096, 8, SMS) == (32, 16)


@pytest.mark.parametrize("max_rank", [1, 16, 31, 32, 33, 256, 4096])
@pytest.mark.parametrize("widest", [1, 8, 127, 128, 129, 4096, 14336])
def test_tensor_core_sgmv_grid_covers_every_rank_row_and_output_column(max_rank, widest):
    rank_groups, column_blocks = _C.lora_plan_sgmv_mma(max_rank, widest)
    ranks, columns = _C.lora_mma_ranks, _C.lora_mma_columns
    assert rank_groups * ranks >= max_rank > (rank_groups - 1) * ranks
    assert column_blocks * columns >= widest > (column_blocks - 1) * columns
    assert rank_groups <= 65535 and column_blocks <= 65535  # grid.y


def test_prefill_of_512_tokens_on_one_adapter_fills_the_gpu_on_tensor_cores():
    # 64 tiles of 8 tokens, which the chunk rule merges into 32 chunks of 16 (larger chunks would
    # leave the shrink under two waves); q/k/v expand (4096 + 1024 + 1024 columns, widest 4096)
    # at rank 16.
    ids = torch.zeros(512, dtype=torch.int64)
    _, tiles = ops.lora_sgmv_plan(ids, 1)
    assert tiles.shape[0] == 512 // _C.lora_tile
    assert _C.lora_gpu_prefers_sgmv(512, tiles.shape[0], SMS, True)
    chunks = ops.lora_sgmv_chunks(tiles, sms=SMS)
    assert chunks.shape[0] == 32
    rank_groups, column_blocks = _C.lora_plan_sgmv_mma(16, 4096)
    assert chunks.shape[0] * column_blocks * 3 >= 2 * SMS
    # the shrink splits K (hidden 4096 = 16 split steps) to reach 4 blocks per SM: 96 -> 576
    k_splits = _C.lora_plan_sgmv_mma_k_splits(chunks.shape[0], rank_groups, 3, 4096, SMS)
    assert k_splits == 6 and chunks.shape[0] * rank_groups * k_splits * 3 >= 4 * SMS


def test_decode_of_64_tokens_on_one_adapter_takes_the_chunked_tensor_core_path():
    # 64 sequences sharing one rank-16 adapter (hidden 4096, q/k/v): BGMV would read the adapter
    # 64 times; the chunked SGMV reads it once per chunk of 16 (4 times) and still spreads the
    # shrink over more than a wave of SMs by splitting K, the expand over two.
    ids = torch.zeros(64, dtype=torch.int64)
    _, tiles = ops.lora_sgmv_plan(ids, 1)
    assert _C.lora_gpu_prefers_sgmv(64, tiles.shape[0], SMS, True)
    assert not _C.lora_gpu_prefers_sgmv(64, tiles.shape[0], SMS, False)  # fp32: CUDA cores
    chunks = ops.lora_sgmv_chunks(tiles, sms=SMS)
    assert chunks[:, 1].sub(chunks[:, 0]).tolist() == [16, 16, 16, 16]
    rank_groups, column_blocks = _C.lora_plan_sgmv_mma(16, 4096)
    k_splits = _C.lora_plan_sgmv_mma_k_splits(chunks.shape[0], rank_groups, 3, 4096, SMS)
    assert chunks.shape[0] * rank_groups * k_splits * 3 > SMS
    assert chunks.shape[0] * column_blocks * 3 >= 2 * SMS


@pytest.mark.parametrize("chunks", [1, 8, 64, 4096])
@pytest.mark.parametrize("rank_groups", [1, 8, 128])
@pytest.mark.parametrize("hidden", [8, 256, 257, 4096, 14336])
def test_shrink_k_splits_never_leave_a_split_without_its_columns_of_k(chunks, rank_groups, hidden):
    k_splits = _C.lora_plan_sgmv_mma_k_splits(chunks, rank_groups, 1, hidden, SMS)
    steps = -(-hidden // _C.lora_mma_split_k)
    assert 1 <= k_splits <= min(16, steps) and rank_groups * k_splits <= 65535
    assert chunks * rank_groups * k_splits >= 4 * SMS or k_splits == min(16, steps)
    # A split is whole pipeline stages, so a stage never straddles two splits.
    assert _C.lora_mma_split_k % _C.lora_mma_stage_k == 0


# ---- SGMV chunks for the tensor-core kernels (host functions) ------------------------------------

def _tiles(counts):
    """The plan's tiles for a batch where adapter a has counts[a] tokens (shuffled)."""
    ids = torch.cat([torch.full((n,), a, dtype=torch.int64) for a, n in enumerate(counts)])
    ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(0))]
    order, tiles = ops.lora_sgmv_plan(ids, len(counts))
    return ids, order, tiles


def _check_chunks(ids, order, chunks, rows):
    """Each chunk is 1..rows tokens of one adapter, consecutive in order; together they cover
    order exactly once, in order."""
    position = 0
    for first, end, adapter in chunks.tolist():
        assert first == position and 0 < end - first <= rows
        assert all(int(ids[t]) == adapter for t in order[first:end].tolist())
        position = end
    assert position == order.numel()


@pytest.mark.parametrize("rows", [16, 32, 64])
def test_64_tokens_on_one_adapter_make_chunks_of_the_chosen_size(rows):
    ids, order, tiles = _tiles([64])
    chunks = ops.lora_sgmv_chunks(tiles, rows)
    assert chunks.dtype == torch.int32 and chunks.shape == (64 // rows, 3)
    assert (chunks[:, 1] - chunks[:, 0]).tolist() == [rows] * (64 // rows)
    _check_chunks(ids, order, chunks, rows)


@pytest.mark.parametrize("rows", [8, 16, 32, 64])
def test_many_adapters_get_their_own_chunks_with_a_ragged_last_one(rows):
    counts = [1, 8, 9, 23, 64, 70, 0, 129, 3]
    ids, order, tiles = _tiles(counts)
    chunks = ops.lora_sgmv_chunks(tiles, rows)
    _check_chunks(ids, order, chunks, rows)
    for adapter, n in enumerate(counts):
        sizes = [end - first for first, end, a in chunks.tolist() if a == adapter]
        # ceil(n / rows) chunks: full ones, then the remainder (never split further).
        assert sizes == [rows] * (n // rows) + ([n % rows] if n % rows else [])


def test_tiles_that_do_not_continue_each_other_are_not_merged():
    # Hand-built tiles: adapter 0's two tiles are apart in order (adapter 1's between them), and
    # a tile list may revisit an adapter; only consecutive continuing tiles of one adapter merge.
    tiles = torch.tensor([[0, 8, 0], [8, 11, 1], [11, 19, 0], [19, 27, 0], [27, 30, 0]],
                         dtype=torch.int32)
    chunks = ops.lora_sgmv_chunks(tiles, 16)
    assert chunks.tolist() == [[0, 8, 0], [8, 11, 1], [11, 27, 0], [27, 30, 0]]


@pytest.mark.parametrize("counts, rows", [
    ([4096], 64),        # a long prefill: 64 chunks of 64 still give two waves once K is split
    ([2048], 64),        # 32 chunks of 64
    ([1024], 32),        # 16 chunks of 64 would be under two waves; 32 of 32 are not
    ([512], 16),         # 32 chunks of 16
    ([128], 16),         # under two waves at every size: the most blocks
    ([3] * 64, 64),      # many adapters of a few tokens: one chunk each whatever the size
    ([40] * 20, 64),     # 20 adapters: 20 chunks of 40 suffice
])
def test_chunk_rows_rule(counts, rows):
    _, _, tiles = _tiles(counts)
    assert _C.lora_plan_sgmv_chunk_rows(tiles.reshape(-1).tolist(), SMS) == rows
    assert ops.lora_sgmv_chunks(tiles, sms=SMS).equal(ops.lora_sgmv_chunks(tiles, rows))


def test_chunk_rows_follow_the_gpu_size():
    # 1024 tokens: 16 chunks of 64 are two waves on a 100-SM GPU, not on 132 SMs.
    _, _, tiles = _tiles([1024])
    assert ops.lora_sgmv_chunks(tiles, sms=100).shape[0] == 16
    assert ops.lora_sgmv_chunks(tiles, sms=SMS).shape[0] == 32


def test_empty_plan_has_no_chunks():
    _, tiles = ops.lora_sgmv_plan(torch.tensor([-1, -1]), 2)
    assert ops.lora_sgmv_chunks(tiles).shape == (0, 3)


@pytest.mark.parametrize("call, error, message", [
    (lambda t: ops.lora_sgmv_chunks(t, 12), ValueError,
     r"rows must be a multiple of 8 in \[8, 64\]"),
    (lambda t: ops.lora_sgmv_chunks(t, 72), ValueError, r"rows must be a multiple of 8"),
    (lambda t: ops.lora_sgmv_chunks(t, 0), ValueError, r"rows must be a multiple of 8"),
    (lambda t: ops.lora_sgmv_chunks(t, 16.0), TypeError, "rows must be an int"),
    (lambda t: ops.lora_sgmv_chunks(t, sms=0), ValueError, "sms must be an int >= 1"),
    (lambda t: ops.lora_sgmv_chunks(t.long()), TypeError, "tiles must be an int32 CPU tensor"),
    (lambda t: ops.lora_sgmv_chunks(t[:, :2]), ValueError, r"tiles must be a \[tiles, 3\]"),
    (lambda t: ops.lora_sgmv_chunks(t.reshape(-1)), ValueError, r"tiles must be a \[tiles, 3\]"),
    (lambda t: _C.lora_sgmv_chunks([0, 8], 16), ValueError, "flat .first, end, adapter. triples"),
    (lambda t: _C.lora_plan_sgmv_chunk_rows([0, 8, 0], 0), ValueError, "sms must be >= 1"),
])
def test_chunk_functions_reject_bad_arguments(call, error, message):
    _, _, tiles = _tiles([20])
    with pytest.raises(error, match=message):
        call(tiles)


# ---- static checks of the compiled kernels -------------------------------------------------------

def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    candidate = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(candidate) if candidate.exists() else None


needs_cuda_binary = pytest.mark.skipif(
    not fastllm.build_info()["cuda"] or _cuobjdump() is None,
    reason="needs a CUDA build of fastllm and cuobjdump")


def _library() -> str:
    return _C.__file__


# The static checks read the code for the GPUs the issues target (H100 / H200): a default build
# also holds sm_80 / sm_86 / sm_89 code, which these checks do not judge (some of it keeps a small
# call stack, e.g. for fp64 division routines on those archs).
TARGET_ARCH = "sm_90"


def resource_usage() -> str:
    """``cuobjdump --dump-resource-usage`` of the library's TARGET_ARCH code."""
    return subprocess.run([_cuobjdump(), "--dump-resource-usage", "-arch", TARGET_ARCH,
                           _library()], capture_output=True, text=True, check=True).stdout


@needs_cuda_binary
def test_lora_kernels_have_no_spills_or_stack():
    out = resource_usage()
    kernels = re.findall(r"Function (\S*lora\S*(?:shrink|expand)_[bs]gmv\S*):\s*\n\s*(REG:.*)", out)
    assert kernels, "no LoRA kernels found in the binary"
    for name, usage in kernels:
        assert "STACK:0 " in usage and "LOCAL:0" in usage, f"{name}: {usage}"


@functools.lru_cache(maxsize=None)
def sass_dump() -> str:
    """The library's TARGET_ARCH SASS, disassembled once per test process (several seconds)."""
    return subprocess.run([_cuobjdump(), "-sass", "-arch", TARGET_ARCH, _library()],
                          capture_output=True, text=True, check=True).stdout


def _sass(kernel: str, dtype: str = "Half") -> dict[str, str]:
    """SASS per mangled function name containing `kernel` and `dtype` (default fp16)."""
    out = sass_dump()
    functions = {}
    for block in out.split("Function : ")[1:]:
        name = block.split("\n", 1)[0].strip()
        if kernel in name and dtype in name:
            functions[name] = block
    return functions


@needs_cuda_binary
@pytest.mark.parametrize("kernel", ["shrink_bgmv", "expand_bgmv"])
def test_decode_kernels_use_16_byte_global_loads(kernel):
    functions = _sass(kernel)
    assert functions, f"no fp16 {kernel} in the binary"
    for name, sass in functions.items():
        assert re.search(r"LDG\.E\.128", sass), f"{name} has no 16-byte global load"


@needs_cuda_binary
@pytest.mark.parametrize("kernel", ["shrink_sgmv_mma", "expand_sgmv_mma"])
@pytest.mark.parametrize("dtype", ["Half", "BFloat16"])
def test_prefill_kernels_run_on_tensor_cores_and_stage_with_16_byte_async_copies(kernel, dtype):
    functions = _sass(kernel, dtype)
    assert functions, f"no {dtype} {kernel} in the binary"
    for name, sass in functions.items():
        assert re.search(r"HMMA\.\d+\.F32", sass), f"{name} has no tensor-core MMA"
        # cp.async of 16 bytes (global -> shared, L1 bypassed) for the staged rows.
        assert re.search(r"LDGSTS\.E\.BYPASS\.128", sass), f"{name} has no 16-byte cp.async"
        if kernel == "shrink_sgmv_mma":
            # Double buffering: the K loop waits for all but the newest copy group.
            assert re.search(r"DEPBAR\.LE SB0, 0x1", sass), f"{name} waits for every copy"
        else:
            # y is read and written in 16-byte words.
            assert re.search(r"LDG\.E\.128", sass) and re.search(r"STG\.E\.128", sass), name
