"""Small calls of every CUDA kernel, for compute-sanitizer (bench/gpu_check.sh runs it): page pool,
LoRA, FastGen KV, sparse MLP and GaLore. `python bench/sanitize_cases.py --device cpu` runs the same
calls on the CPU kernels, which checks the cases themselves (shapes, results against references).

Sizes are small so memcheck/racecheck finish in seconds, but chosen to cover each kernel's
branches: narrow and full-width vector access, int32 and int64 indices, partial thread groups.
bad_index_cases passes out-of-range indices: the CUDA kernels must skip them without touching
memory outside any tensor (what memcheck watches) and report them through the error word.
"""

import argparse

import torch

import fastllm.ops as ops
from fastllm import _reference as ref


def memory_cases(device):
    for width, dtype in [(1, torch.float16), (7, torch.float32), (64, torch.float16),
                         (300, torch.bfloat16), (4096, torch.float32)]:
        for index_dtype in (torch.int32, torch.int64):
            pool = torch.randn(257, width, device=device).to(dtype)
            slots = torch.randperm(257, device=device)[:100].to(index_dtype)
            rows = ops.pool_gather(pool, slots)
            assert torch.equal(rows, pool[slots.long()])
            ops.pool_write(pool, slots, rows * 2)
            assert torch.equal(pool[slots.long()], rows * 2)


def lora_cases(device):
    # Mixed ranks (0, 1, 3, 8, 16), rows without an adapter, two output slices, both paths.
    pool = torch.randn(1 << 16, device=device, dtype=torch.float16)
    rows = torch.randint(0, (1 << 16) - 512, (2, 3, 16), device=device)
    ranks = torch.tensor([[16, 3, 0], [1, 8, 16]], dtype=torch.int32, device=device)
    token_adapter = torch.tensor([0, 2, -1, 1, 1, 0, 2, 2, 1, 0, 0, 0, 0, 0], device=device)
    x = torch.randn(14, 136, device=device, dtype=torch.float16)
    for path in (1, 2):  # BGMV, SGMV
        h = ops.lora_shrink(x, pool, rows, ranks, token_adapter, path)
        y = torch.randn(14, 72, device=device, dtype=torch.float16)
        ops.lora_expand(y, h, pool, rows, ranks, torch.ones(2, 3, device=device), token_adapter,
                        [40, 32], path)
    # The tensor-core SGMV (fp16 / bf16): rows 16-byte aligned (the vector staging), a rank over
    # one group of 32 rows and one 64-row chunk, K past one 256-column chunk with a tail, a
    # second 128-column block, tiles of 1 to 8 tokens.
    for dtype in (torch.float16, torch.bfloat16):
        pool = torch.randn(1 << 17, device=device, dtype=dtype)
        rows = torch.randint(0, ((1 << 17) - 1024) // 8, (2, 3, 70), device=device) * 8
        ranks = torch.tensor([[70, 1, 33], [16, 70, 5]], dtype=torch.int32, device=device)
        token_adapter = torch.tensor([0] * 9 + [1] + [2] * 8 + [-1], device=device)
        x = torch.randn(token_adapter.numel(), 520, device=device, dtype=dtype)
        h = ops.lora_shrink(x, pool, rows, ranks, token_adapter, 2)
        y = torch.randn(token_adapter.numel(), 336, device=device, dtype=dtype)
        ops.lora_expand(y, h, pool, rows, ranks, torch.ones(2, 3, device=device), token_adapter,
                        [200, 136], 2)
        # Chunks of 16 to 64 tokens (lora_sgmv_chunks): several row tiles per block, ragged last
        # chunks (70 = 64 + 6, 17 = 16 + 1), a one-token chunk, K split across blocks with a
        # tail stage (520 columns), double-buffered; checked against the CPU kernels.
        ids = torch.tensor([0] * 70 + [1] + [2] * 17 + [-1] * 3)
        ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(1))]
        order, tiles = ops.lora_sgmv_plan(ids, 3)
        x = torch.randn(ids.numel(), 520, dtype=dtype)
        y = torch.randn(ids.numel(), 336, dtype=dtype)
        cpu_rows, cpu_ranks, cpu_pool = rows.cpu(), ranks.cpu(), pool.cpu()
        scalings = torch.rand(2, 3) + 0.5
        want_h = ops.lora_shrink(x, cpu_pool, cpu_rows, cpu_ranks, ids, 2)
        want_y = ops.lora_expand(y.clone(), want_h, cpu_pool, cpu_rows, cpu_ranks, scalings, ids,
                                 [200, 136], 2)
        for chunk_rows in (16, 64):
            plan = [t.to(device) for t in (order, tiles, ops.lora_sgmv_chunks(tiles, chunk_rows))]
            h = ops.lora_shrink(x.to(device), pool, rows, ranks, ids.to(device), 2, *plan)
            got_y = ops.lora_expand(y.to(device, copy=True), want_h.to(device), pool, rows,
                                    ranks, scalings.to(device), ids.to(device), [200, 136], 2,
                                    *plan)
            scale = float(want_h.abs().max())
            torch.testing.assert_close(h.cpu(), want_h, rtol=1e-3, atol=1e-3 * scale)
            torch.testing.assert_close(got_y.cpu().float(), want_y.float(), rtol=2e-2, atol=2e-2)


def kv_cases(device):
    # GQA (6 query heads on 2 KV heads), a chunk that does not divide the queries, ragged caches
    # of lengths 0..37 on shuffled pages, several splits.
    hq, hkv, d, length = 6, 2, 24, 37
    q = torch.randn(hq, 11, d, device=device)
    k = torch.randn(hkv, length, d, device=device)
    scores = ops.kv_attention_scores(q, k, d ** -0.5, chunk=4)
    torch.testing.assert_close(scores, ref.kv_attention_scores_reference(q, k, d ** -0.5),
                               rtol=1e-4, atol=1e-4)
    key_class = torch.randint(0, 8, (hkv, length), dtype=torch.uint8, device=device)
    recovery = ops.kv_policy_recovery(q, k, key_class, 5, d ** -0.5, chunk=4)
    torch.testing.assert_close(
        recovery, ref.kv_policy_recovery_reference(q, k, key_class, 5, d ** -0.5),
        rtol=1e-4, atol=1e-4)
    page_rows, lengths = 8, [37, 0, 5, 16]
    pages_per = -(-max(lengths) // page_rows)
    kv_rows = torch.randn((len(lengths) * pages_per + 1) * page_rows, 2 * d, device=device)
    table = torch.randperm(len(lengths) * pages_per + 1)[:len(lengths) * pages_per]
    table = table.view(len(lengths), pages_per).to(device, torch.int32)
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    for splits in (1, 3):
        ops.kv_ragged_decode(torch.randn(2, hq, d, device=device).half(), kv_rows.half(), table,
                             lens, page_rows, d ** -0.5, splits)
    # The grouped decode kernel at a real head dim: G = 4, D = 128 (fp16) and 64 (fp32), caches
    # over several staged tiles (the cp.async double buffer) and around a page.
    for d, dtype in ((128, torch.float16), (64, torch.float32)):
        page_rows, lengths = 16, [300, 17, 16, 0]
        pages_per = -(-max(lengths) // page_rows)
        kv_rows = torch.randn((4 * pages_per + 2) * page_rows, 2 * d, device=device).to(dtype)
        table = torch.randperm(4 * pages_per + 2)[:4 * pages_per].view(4, pages_per)
        table, lens = table.to(device, torch.int32), torch.tensor(lengths, dtype=torch.int32,
                                                                  device=device)
        q = torch.randn(2, 8, d, device=device).to(dtype)
        want, _, _ = ref.kv_ragged_decode_reference(q, kv_rows, table, lens, page_rows, d ** -0.5)
        # even splits, and work lists: balanced from the real lengths, and planned for shorter
        # caches (open-ended last items), as a graph-captured step replays it
        _, balanced = ops.kv_decode_plan(lengths, 132)
        _, stale = ops.kv_decode_plan([1] * len(lengths), 132)
        for splits, work in ((1, None), (5, None), (1, balanced.to(device)), (1, stale.to(device))):
            out, _, _ = ops.kv_ragged_decode(q, kv_rows, table, lens, page_rows, d ** -0.5, splits,
                                             work)
            torch.testing.assert_close(out.float(), want.float(), rtol=2e-3, atol=2e-3)
    # Eviction: caches shorter and longer than a warp, one that grows, one without evictable
    # entries, tied scores, step scores narrower than the longest cache.
    caches, cap = 5, 70
    lengths = torch.tensor([70, 3, 40, 0, 33])
    pos = torch.stack([torch.randperm(cap) for _ in range(caches)])
    score = torch.randint(0, 4, (caches, cap)).float()
    flags = torch.randint(0, 16, (caches, cap), dtype=torch.uint8)
    flags[1] |= 8
    args = [pos, score, flags, lengths, torch.rand(caches, 50), torch.full((caches,), cap),
            torch.tensor([4, 0, 10, 2, 1]), torch.tensor([10, 0, 5, 0, 2]),
            torch.tensor([False, False, False, False, True])]
    want_args = [t.clone() for t in args]
    got_args = [t.to(device) for t in args]
    moves = ops.kv_evict_round(*got_args)
    want = ref.kv_evict_round_reference(*want_args)
    torch.testing.assert_close(moves.cpu(), want, rtol=0, atol=0)
    for got, expected in zip(got_args[:4], want_args[:4]):
        torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)
    # A whole decode step (kv_decode_step: append, decode, eviction, row move): fp32 rows of
    # 16-byte words and fp16 rows of D = 10 (40-byte rows: the byte-copy path), with and
    # without graph capacities, caches empty, full and around a page.
    for d, dtype in ((64, torch.float32), (10, torch.float16)):
        page_rows, lengths = 4, [0, 3, 4, 9]
        pages_per = 3
        caches = len(lengths)
        table = torch.randperm(caches * pages_per + 1)[:caches * pages_per].view(caches, pages_per)
        cols = pages_per * page_rows
        step = [torch.randn(1, 2 * caches, d).to(dtype), torch.randn(caches, 2 * d).to(dtype),
                torch.full((caches,), 100), torch.tensor([0, 1, 2, 3], dtype=torch.uint8),
                torch.randn((caches * pages_per + 1) * page_rows, 2 * d).to(dtype),
                table.to(torch.int32), torch.tensor(lengths),
                torch.stack([torch.randperm(cols) for _ in range(caches)]),
                10 * torch.randperm(cols).float().repeat(caches, 1),
                torch.zeros(caches, cols, dtype=torch.uint8),
                torch.tensor([0, 2, 1, 0], dtype=torch.uint8), torch.tensor([0, 0, 0, 200]),
                torch.tensor([1, 0, 2, 1]), torch.tensor([0, 1, 1, 2]),
                torch.tensor([False, False, True, False])]
        for capacity in (None, torch.tensor([1, 4, 4, 10])):
            want_args = [t.clone() for t in step]
            got_args = [t.to(device) for t in step]
            got = ops.kv_decode_step(*got_args, page_rows, d ** -0.5, 1, None,
                                     None if capacity is None else capacity.to(device))
            want = ref.kv_decode_step_reference(*want_args, page_rows, d ** -0.5,
                                                capacity=capacity)
            torch.testing.assert_close(got[0].cpu().float(), want[0].float(), rtol=2e-3,
                                       atol=2e-3)
            torch.testing.assert_close(got[1].cpu(), want[1], rtol=0, atol=0)
            for i in (4, 6, 7, 9):  # kv_rows, lengths, pos, flags
                torch.testing.assert_close(got_args[i].cpu(), want_args[i], rtol=0, atol=0)


def sparse_cases(device):
    # Gated SiLU and plain ReLU, a shared set and per-row sets with counts, odd sizes, an empty set.
    d_in, n, d_out = 40, 72, 24
    w_up = torch.randn(n, d_in, device=device)
    w_gate = torch.randn(n, d_in, device=device)
    w_down_t = torch.randn(n, d_out, device=device)
    x = torch.randn(3, d_in, device=device)
    shared = torch.randperm(n)[:33].to(device)
    out = ops.sparse_mlp(x, w_up, w_down_t, shared, w_gate=w_gate)
    want = ref.sparse_mlp_reference(x, w_up, w_gate, w_down_t, None, None, None, shared, None,
                                    "silu")
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    per_row = torch.stack([torch.randperm(n)[:20] for _ in range(3)]).to(device, torch.int32)
    counts = torch.tensor([20, 0, 7], dtype=torch.int32, device=device)
    for deterministic in (False, True):
        ops.sparse_mlp(x.bfloat16(), w_up.bfloat16(), w_down_t.bfloat16(), per_row,
                       counts=counts, activation="relu", deterministic=deterministic)
    ops.sparse_mlp(x, w_up, w_down_t, shared[:0], w_gate=w_gate)
    # The 16-byte gather kernels in fp16: two row groups of a shared set, ReLU zeros skipped.
    d_in, n, d_out = 256, 500, 264
    x = torch.randn(5, d_in, device=device).half()
    w_up = (torch.randn(n, d_in, device=device) / 16).half()
    w_down_t = (torch.randn(n, d_out, device=device) / 16).half()
    shared = torch.randperm(n)[:300].to(device)
    out = ops.sparse_mlp(x, w_up, w_down_t, shared, activation="relu")
    want = ref.sparse_mlp_reference(x, w_up, None, w_down_t, None, None, None, shared, None,
                                    "relu")
    torch.testing.assert_close(out.float(), want.float(), rtol=1e-2, atol=1e-2)
    # The up/gate kernel's staged x: a row of 257 fp16 words (two steps of 4 words per lane and
    # a tail) in two passes (4 + 1 rows), and a row of 37 columns (scalar loads; staging pads the
    # last float4 of each row) with per-row sets.
    for d_in, dtype, per_row_sets in ((2056, torch.float16, False), (37, torch.float32, True)):
        x = torch.randn(5, d_in, device=device).to(dtype)
        w_up = (torch.randn(n, d_in, device=device) / d_in ** 0.5).to(dtype)
        w_gate = (torch.randn(n, d_in, device=device) / d_in ** 0.5).to(dtype)
        w_down_t = (torch.randn(n, 24, device=device) / 16).to(dtype)
        sets = torch.stack([torch.randperm(n)[:40] for _ in range(5)]).to(device) \
            if per_row_sets else torch.randperm(n)[:300].to(device)
        out = ops.sparse_mlp(x, w_up, w_down_t, sets, w_gate=w_gate)
        want = ref.sparse_mlp_reference(x, w_up, w_gate, w_down_t, None, None, None, sets, None,
                                        "silu")
        torch.testing.assert_close(out.float(), want.float(), rtol=1e-2, atol=1e-2)
    # The int8 predictor's scores: 5 rows (a full and a partial pass of rows), a row length that
    # ends mid-warp-step (80 = 5 lanes of 16), groups of 16 and the whole row, biases, no gate.
    from fastllm._ops.sparse import quantize_rows_int8
    x5 = torch.randn(5, 80, device=device)
    for group, gated in ((16, True), (80, False)):
        q_up, up_scale = quantize_rows_int8(torch.randn(n, 80, device=device), group)
        q_gate, gate_scale = quantize_rows_int8(torch.randn(n, 80, device=device), group) \
            if gated else (None, None)
        b_up = torch.randn(n, device=device)
        out = ops.quantized_neuron_scores(x5.half(), q_up, up_scale, q_gate=q_gate,
                                          gate_scale=gate_scale, b_up=b_up,
                                          activation="silu" if gated else "relu")
        want = ref.quantized_neuron_scores_reference(x5.half(), q_up, up_scale, q_gate,
                                                     gate_scale, b_up, None,
                                                     "silu" if gated else "relu")
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    # Packed int4 scores (uint8, two codes per byte): 32 columns per 16-byte word; rows of 3 words
    # (lanes past the row idle) and of 66 (two steps of two words per lane and a tail), groups of
    # 16 (two scales in a word) and 32, 5 rows (a pass of 4 staged rows and one of 1), no gate.
    from fastllm._ops.sparse import pack_int4_rows
    from fastllm.nn import quantize_rows
    for d, group, gated in ((96, 16, True), (2112, 32, True), (96, 32, False)):
        x = torch.randn(5, d, device=device)
        # weights of unit-variance pre-activations: fp32 summation order stays far below atol
        q_up, up_scale = quantize_rows(torch.randn(n, d, device=device) / d ** 0.5, group, bits=4)
        q_gate, gate_scale = quantize_rows(torch.randn(n, d, device=device) / d ** 0.5, group,
                                           bits=4) if gated else (None, None)
        q_up = pack_int4_rows(q_up)
        q_gate = pack_int4_rows(q_gate) if gated else None
        b_up = torch.randn(n, device=device)
        activation = "silu" if gated else "relu"
        out = ops.quantized_neuron_scores(x.bfloat16(), q_up, up_scale, q_gate=q_gate,
                                          gate_scale=gate_scale, b_up=b_up, activation=activation)
        want = ref.quantized_neuron_scores_reference(x.bfloat16(), q_up, up_scale, q_gate,
                                                     gate_scale, b_up, None, activation)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def galore_cases(device):
    # Both projection sides and none, fp32 and bf16 parameters, 8-bit moments over a partial block.
    m, n, rank = 37, 29, 5
    left = torch.linalg.qr(torch.randn(m, rank))[0].to(device)
    right = torch.linalg.qr(torch.randn(n, rank))[0].t().contiguous().to(device)
    for dtype in (torch.float32, torch.bfloat16):
        for l, r in ((left, None), (None, right), (None, None)):
            param = torch.randn(m, n, device=device, dtype=dtype)
            grad = torch.randn(m, n, device=device, dtype=dtype)
            low = (l.shape[1] if l is not None else m, r.shape[0] if r is not None else n)
            ops.galore_adam_step(param, grad, l, r, torch.zeros(low, device=device),
                                 torch.zeros(low, device=device), lr=1e-3, step=1)
            numel, blocks = low[0] * low[1], -(-(low[0] * low[1]) // 256)
            ops.galore_adam8bit_step(param, grad, l, r,
                                     torch.zeros(numel, dtype=torch.int8, device=device),
                                     torch.zeros(blocks, device=device),
                                     torch.zeros(numel, dtype=torch.uint8, device=device),
                                     torch.zeros(blocks, device=device), lr=1e-3, step=1)
    grad = torch.randn(m, n, device=device)
    low = ops.galore_project(grad, left, right)
    torch.testing.assert_close(low, left.t() @ grad @ right.t(), rtol=1e-4, atol=1e-4)
    ops.galore_project_back_(grad, low, left, right, alpha=-0.5)


def _expect_bad_index(device, what, call):
    """A call with out-of-range index values: the CPU rejects it; CUDA kernels skip the bad indices
    (memcheck proves they touch nothing outside the tensors) and report them in the error word."""
    if device == "cpu":
        try:
            call()
        except (IndexError, ValueError):
            return
        raise AssertionError(f"{what}: the CPU accepted a bad index")
    call()
    try:
        ops.raise_index_errors()
    except IndexError:
        return
    raise AssertionError(f"{what}: the bad index was not reported")


def bad_index_cases(device):
    if device == "cuda":
        ops.raise_index_errors()  # start clean
    pool = torch.randn(64, 32, device=device)
    _expect_bad_index(device, "pool_write", lambda: ops.pool_write(
        pool, torch.tensor([3, 64, -1], device=device), torch.randn(3, 32, device=device)))
    _expect_bad_index(device, "pool_gather", lambda: ops.pool_gather(
        pool, torch.tensor([1 << 40, 2], device=device)))
    flat = torch.randn(1 << 12, device=device)
    rows = torch.randint(0, (1 << 12) - 64, (1, 2, 4), device=device)
    ranks = torch.tensor([[4, 2]], dtype=torch.int32, device=device)
    x = torch.randn(3, 64, device=device)
    _expect_bad_index(device, "lora_shrink token_adapter", lambda: ops.lora_shrink(
        x, flat, rows, ranks, torch.tensor([0, 7, -5], device=device), 1))
    far = rows.clone()
    far[0, 1, 0] = (1 << 12) - 8  # a row running past the pool's end
    _expect_bad_index(device, "lora_shrink a_rows", lambda: ops.lora_shrink(
        x, flat, far, ranks, torch.tensor([1, 1, 0], device=device), 1))
    _expect_bad_index(device, "lora_expand ranks", lambda: ops.lora_expand(
        torch.randn(3, 64, device=device), torch.zeros(1, 3, 4, device=device), flat, rows,
        ranks + 9, torch.ones(1, 2, device=device), torch.tensor([0, 1, -1], device=device), [64],
        1))
    w_up, w_down_t = torch.randn(48, 64, device=device), torch.randn(48, 32, device=device)
    _expect_bad_index(device, "sparse_mlp active_idx", lambda: ops.sparse_mlp(
        x, w_up, w_down_t, torch.tensor([1, 10**6, -2], device=device)))
    _expect_bad_index(device, "sparse_mlp counts", lambda: ops.sparse_mlp(
        x, w_up, w_down_t, torch.randint(0, 48, (3, 5), device=device),
        counts=torch.tensor([5, 9, -1], device=device)))
    q = torch.randn(2, 4, 16, device=device)
    kv_rows = torch.randn(8 * 4, 32, device=device)  # 8 pages of 4 rows
    table = torch.randint(0, 8, (4, 3), dtype=torch.int32, device=device)
    lengths = torch.tensor([12, 5, 0, 9], dtype=torch.int32, device=device)
    far_table = table.clone()
    far_table[1, 0] = 99
    _expect_bad_index(device, "kv_ragged_decode page_table", lambda: ops.kv_ragged_decode(
        q, kv_rows, far_table, lengths, 4, 0.25, 2))
    _expect_bad_index(device, "kv_ragged_decode lengths", lambda: ops.kv_ragged_decode(
        q, kv_rows, table, lengths + 100, 4, 0.25, 2))
    _expect_bad_index(device, "kv_ragged_decode work", lambda: ops.kv_ragged_decode(
        q, kv_rows, table, lengths, 4, 0.25, 1,
        torch.tensor([[0, 0], [1, 0], [7, 0], [3, 0]], dtype=torch.int32, device=device)))
    # kv_decode_step: a cache with no room for its new entry (its 3 pages full, and a length
    # past the page table), and a graph capacity of 0.
    step = [q, torch.randn(4, 32, device=device), torch.full((4,), 50, device=device),
            torch.zeros(4, dtype=torch.uint8, device=device), kv_rows, table,
            torch.tensor([12, 5, 0, 9], device=device),
            torch.zeros(4, 20, dtype=torch.int64, device=device),
            torch.zeros(4, 20, device=device), torch.zeros(4, 20, dtype=torch.uint8, device=device),
            torch.zeros(4, dtype=torch.uint8, device=device),
            torch.zeros(4, dtype=torch.int64, device=device),
            torch.ones(4, dtype=torch.int64, device=device),
            torch.zeros(4, dtype=torch.int64, device=device),
            torch.zeros(4, dtype=torch.bool, device=device)]
    _expect_bad_index(device, "kv_decode_step lengths", lambda: ops.kv_decode_step(
        *step, 4, 0.25))
    step[6] = torch.tensor([18, 5, 0, 9], device=device)
    _expect_bad_index(device, "kv_decode_step lengths past the table", lambda: ops.kv_decode_step(
        *step, 4, 0.25))
    step[6] = torch.tensor([3, 5, 0, 9], device=device)
    _expect_bad_index(device, "kv_decode_step capacity", lambda: ops.kv_decode_step(
        *step, 4, 0.25, 1, None, torch.tensor([4, 0, 4, 12], device=device)))
    ids = torch.tensor([0, 1, 1], device=device)
    order, tiles = ops.lora_sgmv_plan(ids.cpu(), 2)
    tiles[0, 1] = 50  # past the end of order
    _expect_bad_index(device, "lora_shrink sgmv_tiles", lambda: ops.lora_shrink(
        x, flat, rows, ranks, ids, 2, order.to(device), tiles.to(device)))
    # The tensor-core kernels' chunks (fp16): one past the end of order, one naming the wrong
    # adapter.
    order, tiles = ops.lora_sgmv_plan(ids.cpu(), 2)
    for bad in ([0, 1, 0, 1, 50, 1], [0, 1, 1, 1, 3, 1]):
        chunks = torch.tensor(bad, dtype=torch.int32).reshape(2, 3)
        plan = [t.to(device) for t in (order, tiles, chunks)]
        _expect_bad_index(device, "lora_shrink sgmv_chunks", lambda: ops.lora_shrink(
            x.half(), flat.half(), rows, ranks, ids, 2, *plan))
        _expect_bad_index(device, "lora_expand sgmv_chunks", lambda: ops.lora_expand(
            x.half(), torch.zeros(1, 3, 4, device=device), flat.half(), rows, ranks,
            torch.ones(1, 2, device=device), ids, [64], 2, *plan))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    device = parser.parse_args().device
    if device == "cuda":
        assert torch.cuda.is_available(), "sanitize_cases needs a GPU (or --device cpu)"
    for cases in (memory_cases, lora_cases, kv_cases, sparse_cases, galore_cases,
                  bad_index_cases):
        cases(device)
        print(f"{cases.__name__} ok", flush=True)
    if device == "cuda":
        torch.cuda.synchronize()
    print("sanitize cases ok")


if __name__ == "__main__":
    main()
