"""The CUDA decode kernels' launch plans (pure host functions, checked here on the CPU) and static
checks of the compiled LoRA kernels (no GPU needed): no spills or stack, and 16-byte global loads
in the decode shrink and expand. These guard the design until a GPU can time it."""

from __future__ import annotations

import functools
import pathlib
import re
import shutil
import subprocess

import pytest

import fastllm
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
    # 64 tiles of 8 tokens; q/k/v expand (4096 + 1024 + 1024 columns, widest 4096) at rank 16.
    tiles = 512 // _C.lora_tile
    rank_groups, column_blocks = _C.lora_plan_sgmv_mma(16, 4096)
    assert tiles * column_blocks * 3 >= 2 * SMS
    assert _C.lora_gpu_prefers_sgmv(512, tiles, SMS)
    # the shrink splits K (hidden 4096 = 16 chunks) to reach 4 blocks per SM: 192 -> 576 blocks
    k_splits = _C.lora_plan_sgmv_mma_k_splits(tiles, rank_groups, 3, 4096, SMS)
    assert k_splits == 3 and tiles * rank_groups * k_splits * 3 >= 4 * SMS


@pytest.mark.parametrize("tiles", [1, 8, 64, 4096])
@pytest.mark.parametrize("rank_groups", [1, 8, 128])
@pytest.mark.parametrize("hidden", [8, 256, 257, 4096, 14336])
def test_shrink_k_splits_never_leave_a_split_without_a_chunk_of_k(tiles, rank_groups, hidden):
    k_splits = _C.lora_plan_sgmv_mma_k_splits(tiles, rank_groups, 1, hidden, SMS)
    chunks = -(-hidden // _C.lora_mma_chunk)
    assert 1 <= k_splits <= min(16, chunks) and rank_groups * k_splits <= 65535
    assert tiles * rank_groups * k_splits >= 4 * SMS or k_splits == min(16, chunks)


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


@needs_cuda_binary
def test_lora_kernels_have_no_spills_or_stack():
    out = subprocess.run([_cuobjdump(), "--dump-resource-usage", _library()], capture_output=True,
                         text=True, check=True).stdout
    kernels = re.findall(r"Function (\S*lora\S*(?:shrink|expand)_[bs]gmv\S*):\s*\n\s*(REG:.*)", out)
    assert kernels, "no LoRA kernels found in the binary"
    for name, usage in kernels:
        assert "STACK:0 " in usage and "LOCAL:0" in usage, f"{name}: {usage}"


@functools.lru_cache(maxsize=None)
def sass_dump() -> str:
    """The library's SASS, disassembled once per test process (several seconds each time)."""
    return subprocess.run([_cuobjdump(), "-sass", _library()], capture_output=True, text=True,
                          check=True).stdout


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
def test_prefill_kernels_run_on_tensor_cores_with_16_byte_loads(kernel, dtype):
    functions = _sass(kernel, dtype)
    assert functions, f"no {dtype} {kernel} in the binary"
    for name, sass in functions.items():
        assert re.search(r"HMMA\.\d+\.F32", sass), f"{name} has no tensor-core MMA"
        assert re.search(r"LDG\.E\.128", sass), f"{name} has no 16-byte global load"
