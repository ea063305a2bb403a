"""The sparse MLP's CUDA launch plan (a pure host function, checked here on the CPU) and static
checks of the compiled gather and predictor-scoring kernels (no GPU needed): 16-byte global loads
in the up/gate, down and scoring kernels, x read from shared memory in 16-byte words by the
scoring kernel, codes decoded without int-to-float conversions, no stack or spills. These guard
the design until a GPU can time it. (The scoring kernel's plan and staging layout are checked in
test_sparse_packed_int4.py.)"""

from __future__ import annotations

import re

import pytest

from fastllm import _C
from test_lora_launch import needs_cuda_binary, resource_usage, sass_dump

SMS = 132  # an H100 / H200


@pytest.mark.parametrize("rows, per_row, expected",
                         [(1, False, 4), (4, False, 4), (5, False, 8), (8, False, 8),
                          (64, False, 8), (8, True, 4)])
def test_shared_sets_of_up_to_8_rows_read_each_weight_once(rows, per_row, expected):
    # Decode steps and per-row sets take the 4-row kernels (fewer registers).
    assert _C.sparse_rows_per_pass(rows, per_row) == expected


@pytest.mark.parametrize("rows, per_row", [(1, False), (4, False), (5, False), (8, False),
                                           (9, False), (8, True)])
@pytest.mark.parametrize("d_out", [8, 600, 4096, 11008])
@pytest.mark.parametrize("k", [0, 1, 31, 33, 5504, 11008])
@pytest.mark.parametrize("vec", [1, 4, 8])
@pytest.mark.parametrize("blocks_per_sm", [1, 2, 4])
def test_down_grid_covers_every_column_and_row_with_slices_of_32_neurons(rows, per_row, d_out, k,
                                                                         vec, blocks_per_sm):
    per_pass = _C.sparse_rows_per_pass(rows, per_row)
    col_tiles, slices, row_groups = _C.sparse_plan_down(rows, d_out, k, per_row, SMS, vec,
                                                        blocks_per_sm, per_pass)
    columns = 256 * vec
    assert col_tiles * columns >= d_out > (col_tiles - 1) * columns
    assert row_groups == (rows if per_row else -(-rows // per_pass))
    assert 1 <= slices <= max(1, -(-k // 32))  # no slice of a full set under 32 neurons
    blocks = col_tiles * slices * row_groups
    # One wave at the kernel's occupancy (no second, mostly idle wave), unless 32-neuron slices
    # or the output tiles alone need more.
    resident = blocks_per_sm * SMS
    assert blocks >= resident or slices == max(1, -(-k // 32))
    assert slices == 1 or col_tiles * (slices - 1) * row_groups < resident


def test_llama_7b_decode_at_50_percent_fills_the_gpu():
    # 5504 of 11008 neurons, d_out 4096 in fp16: 2 column tiles of 2048 columns. At 4 resident
    # blocks per SM, 264 slices would fill the wave,
    # but a slice keeps at least 32 neurons: 172 slices, 1.3 blocks per SM, each reading 32 rows of
    # one 16-byte word per thread.
    col_tiles, slices, _ = _C.sparse_plan_down(1, 4096, 5504, False, SMS, 8, 4, 4)
    assert col_tiles == 2 and slices == 172
    # At 2 resident blocks (the fp16 8-row kernel's ~120 registers) the wave is 264 blocks: 132
    # slices.
    assert _C.sparse_plan_down(8, 4096, 5504, False, SMS, 8, 2, 8) == (2, 132, 1)


@pytest.mark.parametrize("rows, per_row", [(1, False), (4, False), (5, False), (8, False),
                                           (3, True)])
@pytest.mark.parametrize("d", [40, 576, 4096, 8192, 16384])
@pytest.mark.parametrize("k", [1, 33, 768, 5504, 11008])
@pytest.mark.parametrize("blocks_per_sm", [1, 2, 4])
def test_hidden_plan_stages_the_rows_it_serves_and_spreads_the_set(rows, per_row, d, k,
                                                                   blocks_per_sm):
    most = _C.sparse_rows_per_pass(rows, per_row)
    per_pass, blocks, row_floats, shared = _C.sparse_plan_hidden(rows, d, k, per_row, SMS,
                                                                 blocks_per_sm, most)
    assert row_floats % 32 == 0 and row_floats >= d > row_floats - 32
    assert shared == per_pass * row_floats * 4
    if per_row:
        assert per_pass == 1  # a per-row set belongs to one row
    else:
        assert 1 <= per_pass <= min(most, rows)
        if min(most, rows) * row_floats * 4 <= 48 * 1024:
            assert per_pass == min(most, rows)
    assert shared <= 48 * 1024 or per_pass == 1
    warps = 8 * blocks
    per_warp = -(-k // warps)
    assert warps * per_warp >= k > (blocks - 1) * 8 * per_warp  # every block has a neuron
    # Never more blocks than one wave holds at the kernel's occupancy, unless a warp per neuron
    # needs fewer.
    assert blocks <= max(blocks_per_sm * SMS, 1) or per_warp == 1
    assert blocks <= max(blocks_per_sm * SMS, -(-k // 8))


def test_llama_7b_hidden_decode_plan():
    # 5504 of 11008 neurons at batch 1, 2 resident blocks per SM (the fp16 kernel's ~113
    # registers): 3 neurons per warp over 230 blocks (one wave of 264 slots, none idle for a tail),
    # x (fp32, 16 KB) staged once per block. Planned for 4 per SM, as before the occupancy query,
    # the 344 blocks of 2 neurons per warp would have run as 1.3 waves.
    assert _C.sparse_plan_hidden(1, 4096, 5504, False, SMS, 2, 4) == (1, 230, 4096, 16384)
    assert _C.sparse_plan_hidden(1, 4096, 5504, False, SMS, 4, 4) == (1, 344, 4096, 16384)


def resident_blocks(registers: int, threads: int = 256) -> int:
    """Blocks per SM that a kernel's registers allow on sm_90 (65,536 registers per SM, allocated
    per warp in units of 256, at most 64 warps): the runtime's occupancy rule, registers only."""
    per_warp = -(-registers * 32 // 256) * 256
    warps = threads // 32
    return min(65536 // (per_warp * warps), 64 // warps)


def test_register_occupancy_rule():
    assert resident_blocks(56) == 4 and resident_blocks(113) == 2 and resident_blocks(119) == 2
    assert resident_blocks(32) == 8 and resident_blocks(128) == 2 and resident_blocks(129) == 1


def _sass_blocks(kernel: str):
    out = sass_dump()
    for block in out.split("Function : ")[1:]:
        name = block.split("\n", 1)[0].strip()
        if kernel in name and ("Half" in name or "BFloat16" in name):
            yield name, block


@needs_cuda_binary
@pytest.mark.parametrize("kernel", ["hidden_kernel", "down_vec_kernel"])
def test_gather_kernels_use_16_byte_global_loads(kernel):
    found = list(_sass_blocks(kernel))
    assert found, f"no fp16 / bf16 {kernel} in the binary"
    for name, sass in found:
        assert re.search(r"LDG\.E\.128", sass), f"{name} has no 16-byte global load"


@needs_cuda_binary
def test_down_kernels_finish_their_tiles_themselves():
    # The last block of a tile to arrive (a fence, then an atomic on the tile's counter) writes the
    # output; it reads the other blocks' sums through L2 in 16-byte words (ld.global.cg.v4:
    # LDG.E.128.STRONG.GPU). No finishing kernel is left in the binary.
    assert "finish_kernel" not in sass_dump()
    found = list(_sass_blocks("down_vec_kernel"))
    assert found, "no fp16 / bf16 down_vec_kernel in the binary"
    for name, sass in found:
        assert re.search(r"MEMBAR", sass), f"{name} has no fence before counting its block in"
        assert re.search(r"ATOMG|RED\.", sass), f"{name} has no global atomic"
        assert re.search(r"LDG\.E\.128\.STRONG\.GPU", sass), \
            f"{name} does not read the tile's sums through L2 in 16-byte words"


@needs_cuda_binary
def test_down_kernels_are_programmatic_dependents_of_the_hidden_kernel():
    # sm_90 SASS of griddepcontrol: PREEXIT (launch_dependents) in hidden_kernel, ACQBULK (wait)
    # in both down kernels, and the vector one's L2 prefetches (CCTL.E.PF2) of its first rows.
    for name, sass in _sass_blocks("hidden_kernel"):
        assert "PREEXIT" in sass, f"{name} does not let the down kernel launch early"
    for kernel in ("down_kernel", "down_vec_kernel"):
        found = list(_sass_blocks(kernel))
        assert found, f"no fp16 / bf16 {kernel} in the binary"
        for name, sass in found:
            assert "ACQBULK" in sass, f"{name} does not wait for hidden_kernel"
            before, after = sass.split("ACQBULK", 1)
            # Before the wait only the read-only inputs (set, counts: .CONSTANT) are loaded; h is
            # read after it, through L2 (ld.global.cg: LDG.E.STRONG.GPU), not the non-coherent
            # read-only path a `const __restrict__` pointer would give, which the compiler may
            # hoist above the wait.
            early = re.findall(r"LDG\.E[A-Z0-9_.]*", before)
            assert all(op.endswith(".CONSTANT") for op in early), f"{name}: {early} before the wait"
            assert "LDG.E.STRONG.GPU" in after, f"{name} does not read h through L2"
            if kernel == "down_vec_kernel":
                assert "CCTL.E.PF2" in before, f"{name} prefetches nothing into L2 before the wait"


@needs_cuda_binary
def test_hidden_kernel_reads_staged_x_and_keeps_several_words_in_flight():
    for name, sass in _sass_blocks("hidden_kernel"):
        assert re.search(r"STS\.128", sass), f"{name} does not stage x in 16-byte words"
        assert re.search(r"LDS\.128", sass), f"{name} does not read staged x in 16-byte words"
        # kHiddenWordsPerStep (4) words of the up and of the gate row per step
        loads = len(re.findall(r"LDG\.E\.128", sass))
        assert loads >= 8, f"{name}: {loads} 16-byte global loads"


@needs_cuda_binary
def test_scoring_kernel_reads_codes_and_staged_x_in_16_byte_words():
    # neuron_scores_kernel<scalar_t, packed, gated>: the int8 and packed-int4 forms, with and
    # without a gate, for fp16 and bf16 x.
    found = list(_sass_blocks("neuron_scores_kernel"))
    assert len(found) == 8, [name for name, _ in found]
    for name, sass in found:
        assert re.search(r"LDG\.E\.128", sass), f"{name} has no 16-byte global load"
        assert re.search(r"STS\.128", sass), f"{name} does not stage x in 16-byte words"
        assert re.search(r"LDS\.128", sass), f"{name} does not read staged x in 16-byte words"
        # The only int-to-float conversions left are the division routines' reciprocals
        # (I2F.U32.RP / .U64.RP): codes become floats by int8_code / int4_code's bit trick.
        conversions = set(re.findall(r"\bI2F[A-Z0-9_.]*", sass))
        assert conversions <= {"I2F.U32.RP", "I2F.U64.RP"}, f"{name}: {conversions}"


@needs_cuda_binary
@pytest.mark.parametrize("kernel", ["hidden_kernel", "down_vec_kernel", "neuron_scores_kernel"])
def test_fp16_gather_kernels_keep_two_blocks_per_sm(kernel):
    # The grids are sized from the occupancy the runtime reports; this guards the registers that
    # decide it: at one 256-thread block per SM, 8 warps would be left to hide HBM latency.
    out = resource_usage()
    found = re.findall(r"Function (\S*" + kernel + r"\S*(?:Half|BFloat16)\S*):\s*\n\s*REG:(\d+)", out)
    assert found, f"no fp16 / bf16 {kernel} in the binary"
    for name, registers in found:
        assert resident_blocks(int(registers)) >= 2, f"{name}: {registers} registers"


@needs_cuda_binary
def test_sparse_kernels_have_no_spills_or_stack():
    out = resource_usage()
    kernels = re.findall(r"Function (\S*(?:hidden_kernel|down_vec_kernel|down_kernel|"
                         r"neuron_scores_kernel)\S*):\s*\n\s*(REG:.*)", out)
    assert len(kernels) >= 24
    for name, usage in kernels:
        assert "LOCAL:0" in usage and "STACK:0 " in usage, f"{name}: {usage}"
