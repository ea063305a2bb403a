"""The LoRA GPU path without host synchronisation: the SGMV plan built once per batch on the host,
the GPU's BGMV/SGMV rule, a mixed-batch decode step on fake CUDA tensors (proof, without a GPU,
that the Python layer reads no device data), and on a GPU: bad indices reported through the
device error word, and a decode step captured in a CUDA graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import fastllm.ops as ops
from fastllm import _C
from fastllm._ops.lora import SGMV_TILE
from fastllm.lora import AdapterManager
from helpers import random_tensor

transformers = pytest.importorskip("transformers")

cuda_only = pytest.mark.skipif(not (_C.with_cuda and torch.cuda.is_available()),
                               reason="needs a GPU and fastllm's CUDA kernels")


# ---- the SGMV plan -------------------------------------------------------------------------------

@pytest.mark.parametrize("ids", [[], [-1, -1], [0], [2, 0, 2, -1, 1, 2] * 7, [1] * 17])
def test_sgmv_plan_groups_tokens_by_adapter_in_tiles(ids):
    token_adapter = torch.tensor(ids, dtype=torch.int64)
    order, tiles = ops.lora_sgmv_plan(token_adapter, 3)
    assert order.dtype == tiles.dtype == torch.int32 and tiles.shape[1] == 3
    covered = []
    for first, end, adapter in tiles.tolist():
        assert 0 < end - first <= SGMV_TILE
        members = order[first:end].tolist()
        assert all(ids[t] == adapter for t in members)
        covered += members
    assert sorted(covered) == [t for t, a in enumerate(ids) if a >= 0]
    assert sorted(covered) == sorted(order.tolist())  # every listed token in exactly one tile


def test_ops_give_the_same_result_with_a_plan():
    pool = random_tensor(1 << 12)
    a_rows = torch.randint(0, (1 << 12) - 32, (1, 3, 8))
    ranks = torch.tensor([[8, 3, 5]], dtype=torch.int32)
    ids = torch.tensor([2, 0, -1, 1, 1, 0, 2, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    x = random_tensor(ids.numel(), 32)
    order, tiles = ops.lora_sgmv_plan(ids, 3)
    expected = ops.lora_shrink(x, pool, a_rows, ranks, ids, 2)  # the CPU builds its own tiles
    y = random_tensor(ids.numel(), 32)
    scalings = torch.rand(1, 3)
    want = ops.lora_expand(y.clone(), expected, pool, a_rows, ranks, scalings, ids, [32], 2)
    # With the chunks too: the CPU checks them and keeps its tiles.
    for plan in [(order, tiles), (order, tiles, ops.lora_sgmv_chunks(tiles, 16))]:
        torch.testing.assert_close(ops.lora_shrink(x, pool, a_rows, ranks, ids, 2, *plan),
                                   expected)
        got = ops.lora_expand(y.clone(), expected, pool, a_rows, ranks, scalings, ids, [32], 2,
                              *plan)
        torch.testing.assert_close(got, want)


def _bad_plans(ids):
    order, tiles = ops.lora_sgmv_plan(ids, 3)
    wrong_adapter = tiles.clone()
    wrong_adapter[0, 2] = (wrong_adapter[0, 2] + 1) % 3
    too_long = tiles.clone()
    too_long[0, 1] = order.numel() + 1
    chunks = ops.lora_sgmv_chunks(tiles, 16)
    chunk_of_wrong_adapter = chunks.clone()
    chunk_of_wrong_adapter[-1, 2] = (chunk_of_wrong_adapter[-1, 2] + 1) % 3
    chunk_too_long = chunks.clone()
    chunk_too_long[0, 1] = chunk_too_long[0, 0] + 65
    return [
        ("sgmv_tiles", (order, None), ValueError, r"sgmv_order and sgmv_tiles must be given together"),
        ("sgmv_order", (order.long(), tiles), TypeError, r"sgmv_order must have dtype in \{Int\}"),
        ("sgmv_tiles", (order, tiles[:, :2].contiguous()), ValueError, r"sgmv_tiles must be \[tiles, 3\]"),
        ("sgmv_tiles", (order, wrong_adapter), IndexError, r"is not a token of that adapter"),
        ("sgmv_tiles", (order, too_long), IndexError, r"sgmv_tiles\[0\].*must cover 1 to 8"),
        ("sgmv_order", (order[:-1].contiguous(), tiles[:-1].contiguous()), ValueError,
         r"sgmv_tiles covers"),
        ("sgmv_chunks", (None, None, chunks), ValueError, r"sgmv_chunks needs the plan"),
        ("sgmv_chunks", (order, tiles, chunks.long()), TypeError,
         r"sgmv_chunks must have dtype in \{Int\}"),
        ("sgmv_chunks", (order, tiles, chunks[:, :2].contiguous()), ValueError,
         r"sgmv_chunks must be \[chunks, 3\]"),
        ("sgmv_chunks", (order, tiles, chunk_of_wrong_adapter), IndexError,
         r"sgmv_chunks\[\d+\] of adapter \d is not a token of that adapter"),
        ("sgmv_chunks", (order, tiles, chunk_too_long), IndexError,
         r"sgmv_chunks\[0\].*must cover 1 to 64"),
        ("sgmv_chunks", (order, tiles, chunks[:-1].contiguous()), ValueError,
         r"sgmv_chunks covers"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_bad_plans_are_rejected_naming_the_argument(case):
    ids = torch.tensor([2, 0, 2, -1, 1, 2, 0, 0, 1])
    name, plan, error, message = _bad_plans(ids)[case]
    pool = random_tensor(1 << 10)
    a_rows = torch.randint(0, (1 << 10) - 16, (1, 3, 4))
    ranks = torch.tensor([[4, 2, 3]], dtype=torch.int32)
    with pytest.raises(error, match=message):
        ops.lora_shrink(random_tensor(9, 16), pool, a_rows, ranks, ids, 2, *plan)
    y = random_tensor(9, 16)
    before = y.clone()
    with pytest.raises(error, match=message):
        ops.lora_expand(y, torch.zeros(1, 9, 4), pool, a_rows, ranks, torch.ones(1, 3), ids, [16],
                        2, *plan)
    assert torch.equal(y, before)


@pytest.mark.parametrize("make, error, message", [
    (lambda: (torch.tensor([[0, 1]]), 2), ValueError, "token_adapter must be a 1-D tensor"),
    (lambda: (torch.tensor([0.0]), 2), TypeError, "must be int32 or int64"),
    (lambda: (torch.tensor([0, 2]), 2), IndexError, r"must lie in \[-1, 2\)"),
    (lambda: (torch.tensor([0, -2]), 2), IndexError, r"must lie in \[-1, 2\)"),
    (lambda: (torch.tensor([0]), -1), ValueError, "adapters must be an int >= 0"),
])
def test_sgmv_plan_rejects_bad_input(make, error, message):
    with pytest.raises(error, match=message):
        ops.lora_sgmv_plan(*make())


# ---- the GPU rule --------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens, adapters, sgmv", [
    # fp16/bf16 on sm_80+: both paths fill the GPU (split K), so the rule counts adapter-row reads
    (1, 1, False),        # one decode token
    (2, 2, False),        # two tokens on two adapters: both read each row once
    (64, 64, False),      # 64 decode sequences on 64 adapters: every row read once either way
    (64, 16, True),       # 64 sequences on 16 adapters: 16 tiles read each row 4x less often
    (64, 1, True),        # 64 sequences sharing one adapter: 8 tiles, chunked on tensor cores
    (64, 48, False),      # 48 tiles for 64 tokens: fewer reads, but not half as many
    (4096, 4, True),      # a prefill
])
def test_gpu_path_rule_on_tensor_cores(tokens, adapters, sgmv):
    tiles = _tiles(tokens, adapters)
    assert _C.lora_gpu_prefers_sgmv(tokens, tiles, 132, True) is sgmv


@pytest.mark.parametrize("tokens, adapters, sgmv", [
    # fp32/fp64 or pre-sm_80: the CUDA-core SGMV runs one block per tile and does not split K
    (1, 1, False),        # one decode token
    (64, 16, False),      # a decode batch of 64 sequences on 16 adapters: 64 blocks either way
    (64, 1, False),       # 64 sequences sharing one adapter: 8 tiles leave the GPU idle
    (256, 4, False),      # 256 blocks vs 32 tiles: both within two waves, a tie goes to BGMV
    (512, 4, True),       # 512 blocks vs 64 tiles (under two waves: costs as 264)
    (4096, 4, True),      # a prefill: 512 tiles read each row 8x less often
    (2048, 64, True),
])
def test_gpu_path_rule_on_cuda_cores(tokens, adapters, sgmv):
    tiles = _tiles(tokens, adapters)
    assert _C.lora_gpu_prefers_sgmv(tokens, tiles, 132, False) is sgmv


def _tiles(tokens, adapters):
    """The plan's tile count for `tokens` spread evenly over `adapters` (each adapter's tokens in
    tiles of SGMV_TILE, the last ragged)."""
    share, extra = divmod(tokens, adapters)
    return sum(-(-(share + (a < extra)) // SGMV_TILE) for a in range(adapters))


def test_gpu_path_rule_without_tiles_is_bgmv():
    assert _C.lora_gpu_prefers_sgmv(0, 0, 132, True) is False
    assert _C.lora_gpu_prefers_sgmv(64, 0, 132, True) is False


# ---- a decode step on fake CUDA tensors ----------------------------------------------------------

from test_lora_manager import random_adapter, tiny_llama  # noqa: E402


def _to_fake_cuda(mode, model, state):
    """Every tensor a decode step touches, as a fake CUDA tensor (created inside `mode`)."""
    fake = lambda t: mode.from_tensor(t).to("cuda")  # noqa: E731
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(fake(p), requires_grad=False)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = fake(b)
    state.pool = fake(state.pool)
    state.device = torch.device("cuda")
    state.entries = [None if e is None else tuple(fake(t) for t in e) for e in state.entries]
    state.group_tables = [(fake(a), fake(r), members) for a, r, members in state.group_tables]
    state._tokens = {k: tuple(fake(t) for t in v) for k, v in state._tokens.items()}


def _decode_step_on_fake_cuda(inject=None):
    model = tiny_llama()
    r4, r16 = random_adapter(model, 4), random_adapter(model, 16)
    manager = AdapterManager(model, max_rank=16, num_pages=64, page_size=4096)
    manager.load("r4", r4, {"r": 4, "lora_alpha": 8})
    manager.load("r16", r16, {"r": 16, "lora_alpha": 16})
    names = ["r4", None, "r16", "r4"]
    step = torch.randint(0, 96, (4, 1))
    with torch.no_grad(), manager.batch(names):
        # The batch's host work (tables, the decode shape's token map and plan) happens once, on
        # the first call of a shape; this warm-up is that call. Then only launches remain.
        model(step, use_cache=False)
        state = manager._active
        if inject is not None:
            inject(state)
        with FakeTensorMode() as mode:
            _to_fake_cuda(mode, model, state)
            logits = model(mode.from_tensor(step).to("cuda"), use_cache=False).logits
    return logits


def test_mixed_batch_decode_step_reads_no_device_data():
    logits = _decode_step_on_fake_cuda()
    assert logits.device.type == "cuda" and logits.shape == (4, 1, 96)


def test_fake_cuda_step_catches_a_host_read():
    # The proof above can fail: a forward that reads a device value raises on fake tensors.
    def inject(state):
        original = state.apply

        def apply(index, x, y):
            if x.sum().item() > 1e30:  # a host read of device data
                pass
            return original(index, x, y)
        state.apply = apply
    with pytest.raises(Exception, match="DataDependent|local_scalar_dense|item"):
        _decode_step_on_fake_cuda(inject)


# ---- on a GPU ------------------------------------------------------------------------------------

@cuda_only
def test_cuda_bad_indices_are_skipped_and_reported():
    ops.raise_index_errors()
    pool = random_tensor(1 << 12, device="cuda")
    a_rows = torch.randint(0, (1 << 12) - 32, (1, 2, 4), device="cuda")
    ranks = torch.tensor([[4, 2]], dtype=torch.int32, device="cuda")
    x = random_tensor(3, 32, device="cuda")
    bad_ids = torch.tensor([0, 5, 1], device="cuda")
    h = ops.lora_shrink(x, pool, a_rows, ranks, bad_ids, 1)
    assert torch.equal(h[0, 1], torch.zeros_like(h[0, 1]))  # the bad token's work was skipped
    with pytest.raises(IndexError, match="token_adapter"):
        ops.raise_index_errors()
    far = a_rows.clone()
    far[0, 0, 1] = 10**12
    y = random_tensor(3, 32, device="cuda")
    ops.lora_expand(y, h, pool, far, ranks, torch.ones(1, 2, device="cuda"),
                    torch.tensor([0, -1, 1], device="cuda"), [32], 1)
    with pytest.raises(IndexError, match="a_rows/b_rows"):
        ops.raise_index_errors()
    with ops.checked_indices(), pytest.raises(IndexError, match=r"token_adapter must lie in"):
        ops.lora_shrink(x, pool, a_rows, ranks, bad_ids, 1)


@cuda_only
def test_cuda_bad_tensor_core_chunks_are_skipped_and_reported():
    ops.raise_index_errors()
    x, y, pool, a_rows, b_rows, ranks, scalings, ids = _prefill_problem(
        64, [64], [8, 8], [20], torch.float16)
    order, tiles = ops.lora_sgmv_plan(ids, 2)
    chunks = ops.lora_sgmv_chunks(tiles, 16)  # adapter 0: 16 + 4 tokens, adapter 1: 16 + 4
    wrong = chunks.clone()
    wrong[0, 2] = 1 - wrong[0, 2]  # the first chunk names the other adapter
    g = _cuda(x, pool, a_rows, ranks, ids, order, tiles, wrong)
    h = ops.lora_shrink(*g[:5], 2, *g[5:])
    skipped = order[int(chunks[0, 0]):int(chunks[0, 1])].long()
    assert not h[0, skipped.cuda()].any()  # the bad chunk's tokens were not computed
    assert h[0].abs().sum(1).gt(0).sum() == ids.numel() - skipped.numel()
    with pytest.raises(IndexError, match="sgmv_chunks"):
        ops.raise_index_errors()
    past = chunks.clone()
    past[-1, 1] = order.numel() + 3  # past the end of order
    gy = y.cuda()
    before = gy.clone()
    ops.lora_expand(gy, h, g[1], b_rows.cuda(), g[3], scalings.cuda(), g[4], [64], 2, g[5], g[6],
                    past.cuda())
    last = order[int(chunks[-1, 0]):].long().cuda()
    assert torch.equal(gy[last], before[last])  # the bad chunk's rows of y untouched
    with pytest.raises(IndexError, match="sgmv_chunks"):
        ops.raise_index_errors()


@cuda_only
def test_cuda_sgmv_without_a_plan_is_refused_by_the_op():
    pool = random_tensor(1 << 10, device="cuda")
    a_rows = torch.zeros(1, 1, 2, dtype=torch.int64, device="cuda")
    ranks = torch.tensor([[2]], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="needs sgmv_order and sgmv_tiles"):
        torch.ops.fastllm.lora_shrink.default(random_tensor(2, 8, device="cuda"), pool, a_rows,
                                              ranks, torch.zeros(2, dtype=torch.int64,
                                                                 device="cuda"), 2)


@cuda_only
def test_cuda_mixed_batch_decode_step_no_syncs_and_graph_replay_equals_eager():
    model = tiny_llama().cuda()
    r4, r16 = random_adapter(model, 4), random_adapter(model, 16)
    manager = AdapterManager(model, max_rank=16, num_pages=64, page_size=4096)
    manager.load("r4", r4, {"r": 4, "lora_alpha": 8})
    manager.load("r16", r16, {"r": 16, "lora_alpha": 16})
    step = torch.randint(0, 96, (4, 1), device="cuda")
    with torch.no_grad(), manager.batch(["r4", None, "r16", "r4"]):
        eager = model(step, use_cache=False).logits  # warm-up: the shape's plan is built here
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            again = model(step, use_cache=False).logits
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(again, eager)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(step, use_cache=False).logits
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(captured, eager)
    ops.raise_index_errors()


# ---- overflow in the host checks (review findings) -----------------------------------------------

def test_row_offset_near_int64_max_is_rejected():
    pool = random_tensor(1 << 10)
    a_rows = torch.zeros(1, 1, 2, dtype=torch.int64)
    a_rows[0, 0, 1] = 2**63 - 4  # o + width would wrap negative
    ranks = torch.tensor([[2]], dtype=torch.int32)
    with pytest.raises(IndexError, match=r"a_rows\[0, 0, 1\].*outside the pool"):
        ops.lora_shrink(random_tensor(2, 16), pool, a_rows, ranks, torch.zeros(2, dtype=torch.int64))


def test_slice_sizes_whose_sum_wraps_are_rejected():
    pool = random_tensor(1 << 10)
    b_rows = torch.zeros(4, 1, 2, dtype=torch.int64)
    ranks = torch.full((4, 1), 2, dtype=torch.int32)
    y = random_tensor(2, 24)
    before = y.clone()
    sizes = [2**62, 2**62, 2**62, 2**62 + 24]  # adds up to 2**64 + 24: 24 after wrapping
    with pytest.raises(ValueError, match="slice_sizes must be >= 0 and add up to y's width 24"):
        ops.lora_expand(y, torch.zeros(4, 2, 2), pool, b_rows, ranks, torch.ones(4, 1),
                        torch.zeros(2, dtype=torch.int64), sizes)
    assert torch.equal(y, before)


@cuda_only
def test_first_op_inside_graph_capture_is_refused_not_corrupted():
    # Run in a fresh process: the error word must not exist yet.
    import subprocess
    import sys
    code = (
        "import torch, fastllm.ops as ops\n"
        "pool = torch.randn(8, 4, device='cuda'); s = torch.tensor([1], device='cuda')\n"
        "g = torch.cuda.CUDAGraph()\n"
        "try:\n"
        "    with torch.cuda.graph(g):\n"
        "        ops.pool_gather(pool, s)\n"
        "except RuntimeError as e:\n"
        "    print('refused' if 'eagerly before capturing' in str(e) else e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "refused" in out.stdout, out.stdout + out.stderr


# ---- CUDA: tensor-core SGMV and the deterministic decode shrink ---------------------------------

def _prefill_problem(in_features, slice_sizes, ranks_list, counts, dtype, seed=0):
    """CPU tensors: adapters of the given ranks with rows packed one after another in one pool (16-
    byte aligned when the row lengths are whole words, as the store packs them), and a batch
    where adapter a has counts[a % len(counts)] tokens, shuffled."""
    generator = torch.Generator().manual_seed(seed)
    adapters, slices, max_rank = len(ranks_list), len(slice_sizes), max(ranks_list)
    a_rows = torch.zeros(slices, adapters, max_rank, dtype=torch.int64)
    b_rows = torch.zeros(slices, adapters, max_rank, dtype=torch.int64)
    pos = 0
    for s, out_features in enumerate(slice_sizes):
        for a, r in enumerate(ranks_list):
            a_rows[s, a, :r] = pos + torch.arange(r) * in_features
            pos += r * in_features
            b_rows[s, a, :r] = pos + torch.arange(r) * out_features
            pos += r * out_features
    pool = (torch.randn(pos, generator=generator) * 0.1).to(dtype)
    ranks = torch.tensor(ranks_list, dtype=torch.int32).repeat(slices, 1)
    ids = torch.cat([torch.full((counts[a % len(counts)],), a) for a in range(adapters)])
    ids = ids[torch.randperm(ids.numel(), generator=generator)]
    x = torch.randn(ids.numel(), in_features, generator=generator).to(dtype)
    y = torch.randn(ids.numel(), sum(slice_sizes), generator=generator).to(dtype)
    scalings = torch.rand(slices, adapters, generator=generator) + 0.5
    return x, y, pool, a_rows, b_rows, ranks, scalings, ids


def _cuda(*tensors):
    return [t.cuda() for t in tensors]


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_features, slice_sizes, ranks_list", [
    (4096, [4096], [16, 16]),               # full tiles, K a whole number of staged chunks
    (1000, [96, 40, 24], [1, 17, 64, 100]),  # K tail; ranks across the MMA's 16, 32 and 64 edges
    (136, [129], [33, 8]),                  # a second column block of one column
    (1001, [130], [5, 9]),                  # rows not word-aligned: element loads
])
@pytest.mark.parametrize("counts, rows", [
    ([1, 8, 9, 23], None),     # the tiles as chunks: partial and full tiles of 8 tokens
    ([3], None),
    ([3], 64),                 # a chunk of one row tile
    ([64, 70, 17, 33], 16),    # chunks of 16, 32, 64 with ragged tails (70 = 64 + 6, 17, 33)
    ([64, 70, 17, 33], 32),
    ([64, 70, 17, 33], 64),
    ([129, 1], 64),            # 64 + 64 + 1, next to a one-token adapter
])
def test_cuda_tensor_core_sgmv_matches_the_cpu_kernel(dtype, in_features, slice_sizes,
                                                     ranks_list, counts, rows):
    x, y, pool, a_rows, b_rows, ranks, scalings, ids = _prefill_problem(
        in_features, slice_sizes, ranks_list, counts, dtype)
    adapters = len(ranks_list)
    want_h = ops.lora_shrink(x, pool, a_rows, ranks, ids, 2)
    gx, gy, gpool, ga, gb, granks, gscale, gids = _cuda(x, y, pool, a_rows, b_rows, ranks,
                                                        scalings, ids)
    order, tiles = ops.lora_sgmv_plan(ids, adapters)
    plan = [order, tiles] + ([] if rows is None else [ops.lora_sgmv_chunks(tiles, rows)])
    plan = [p.cuda() for p in plan]
    got_h = ops.lora_shrink(gx, gpool, ga, granks, gids, 2, *plan)
    # Same products in fp32, another summation order.
    scale = float(want_h.abs().max())
    torch.testing.assert_close(got_h.cpu(), want_h, rtol=1e-3, atol=1e-3 * scale)
    want_y = ops.lora_expand(y.clone(), want_h, pool, b_rows, ranks, scalings, ids, slice_sizes, 2)
    got_y = ops.lora_expand(gy.clone(), want_h.cuda(), gpool, gb, granks, gscale, gids,
                            slice_sizes, 2, *plan)
    # The tensor cores take h as two parts in the input type (about fp32's accuracy): the outputs
    # may differ by the rounding of y itself, up to two units in the last place.
    tol = 2 * 2.0 ** -10 if dtype == torch.float16 else 2 * 2.0 ** -7
    delta = (want_y.float() - y.float()).abs().max()
    torch.testing.assert_close(got_y.cpu().float(), want_y.float(), rtol=tol,
                               atol=tol * float(delta))
    ops.raise_index_errors("cuda")


def _deterministic_runs(call, times=3):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return [call() for _ in range(times)]
    finally:
        torch.use_deterministic_algorithms(before)


@cuda_only
def test_cuda_deterministic_decode_shrink_is_reproducible_bit_for_bit():
    # Batch 1 at hidden 4096 splits K 16 ways (test_lora_launch.py); with deterministic
    # algorithms on, the splits are summed in a fixed order instead of atomically.
    x, _, pool, a_rows, _, ranks, _, ids = _prefill_problem(4096, [4096], [16], [1],
                                                           torch.float16)
    want = ops.lora_shrink(x, pool, a_rows, ranks, ids, 1)
    args = _cuda(x, pool, a_rows, ranks, ids)
    runs = _deterministic_runs(lambda: ops.lora_shrink(*args, 1))
    assert all(torch.equal(run, runs[0]) for run in runs[1:])
    torch.testing.assert_close(runs[0].cpu(), want, rtol=1e-3, atol=1e-3)


@cuda_only
def test_cuda_deterministic_tensor_core_shrink_is_reproducible_bit_for_bit():
    # A 512-token prefill at rank 16 splits K across blocks with atomics (test_lora_launch.py);
    # with deterministic algorithms on it runs one split per block.
    x, _, pool, a_rows, _, ranks, _, ids = _prefill_problem(4096, [4096], [16], [512],
                                                           torch.bfloat16)
    want = ops.lora_shrink(x, pool, a_rows, ranks, ids, 2)
    args = _cuda(x, pool, a_rows, ranks, ids)
    order, tiles = ops.lora_sgmv_plan(ids, 1)
    plan = [p.cuda() for p in (order, tiles, ops.lora_sgmv_chunks(tiles, 64))]
    runs = _deterministic_runs(lambda: ops.lora_shrink(*args, 2, *plan))
    assert all(torch.equal(run, runs[0]) for run in runs[1:])
    scale = float(want.abs().max())
    torch.testing.assert_close(runs[0].cpu(), want, rtol=1e-3, atol=1e-3 * scale)
