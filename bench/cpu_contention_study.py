"""How fastllm's CPU kernels degrade when the cores are oversubscribed, against the ATen ops they
replace (issue 21, "under contention").

Each pair (a fastllm op and its PyTorch baseline at SmolLM2's decode shapes, fp32, batch 1) is
timed with ``harness.time_interleaved`` twice in one run: on an idle machine, and while a second
process runs a 2-thread torch matmul loop (another model's generate on the same 2 cores). The
figure that matters is each op's slowdown (contended / idle) against its baseline's: a kernel
whose many short parallel regions wait on a descheduled thread degrades far worse than one big
ATen call.

Pairs: ``sparse_mlp`` at 50% of SmolLM2's gated MLP against the dense MLP (three F.linear);
``kv_ragged_decode`` over 3 caches of 708 entries (FastGen's 62% of 1000 tokens) against SDPA
over 1000; ``lora_shrink`` + ``lora_expand`` for 8 tokens of 4 rank-16 adapters on a 576-wide
projection against the per-adapter matmul loop; ``pool_gather`` against ``index_select``.

Usage: python bench/cpu_contention_study.py [--threads 2] [--repeats 15] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from harness import RESULTS_DIR, git_commit, machine_name, time_interleaved  # noqa: E402

# Another process's 2-thread torch work, as a generate beside ours would be.
BACKGROUND = """
import torch
torch.set_num_threads({threads})
a, b = torch.randn(384, 384), torch.randn(384, 384)
while True:
    a = torch.tanh(a @ b)
"""


def pairs() -> dict[str, dict]:
    """name -> {"ours": fn, "base": fn}, inputs built once."""
    import fastllm.ops as ops

    g = torch.Generator().manual_seed(0)
    out: dict[str, dict] = {}

    d, n = 576, 1536  # SmolLM2's MLP
    x = torch.randn(1, d, generator=g)
    w_gate, w_up = torch.randn(n, d, generator=g) / 24, torch.randn(n, d, generator=g) / 24
    w_down = torch.randn(d, n, generator=g) / 40
    w_down_t = w_down.t().contiguous()
    active = torch.randperm(n, generator=g)[: n // 2].sort().values
    out["sparse_mlp 50% vs dense MLP"] = {
        "ours": lambda: ops.sparse_mlp(x, w_up, w_down_t, active, w_gate=w_gate),
        "base": lambda: F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)}

    caches, entries, group, hd, page_rows = 3, 708, 3, 64, 16
    pages = -(-entries // page_rows)
    rows = torch.randn((caches * pages + 1) * page_rows, 2 * hd, generator=g)
    table = torch.randperm(caches * pages + 1, generator=g)[: caches * pages]
    table = table.view(caches, pages).to(torch.int32)
    lengths = torch.full((caches,), entries, dtype=torch.int32)
    q = torch.randn(1, caches * group, hd, generator=g)
    k, v = torch.randn(1, caches, 1000, hd, generator=g), torch.randn(1, caches, 1000, hd,
                                                                       generator=g)
    out["kv_ragged_decode vs SDPA"] = {
        "ours": lambda: ops.kv_ragged_decode(q, rows, table, lengths, page_rows, 0.125, 1),
        "base": lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, scale=0.125,
                                                       enable_gqa=True)}

    adapters, rank, tokens = 4, 16, 8
    a = torch.randn(adapters, rank, d, generator=g) / 24
    b = torch.randn(adapters, d, rank, generator=g) / 4
    # A's rows, then B^T's rows (rank rows of d each), back to back in one pool
    pool = torch.cat([a.reshape(-1), b.transpose(1, 2).reshape(-1)])
    a_rows = (torch.arange(adapters * rank) * d).view(1, adapters, rank)
    b_rows = (adapters * rank * d + torch.arange(adapters * rank) * d).view(1, adapters, rank)
    ranks = torch.full((1, adapters), rank, dtype=torch.int32)
    token_adapter = torch.arange(tokens) % adapters
    xt = torch.randn(tokens, d, generator=g)
    y = torch.zeros(tokens, d)
    scaling = torch.ones(1, adapters)

    def lora_ours():
        h = ops.lora_shrink(xt, pool, a_rows, ranks, token_adapter)
        ops.lora_expand(y, h, pool, b_rows, ranks, scaling, token_adapter, [d])

    def lora_base():
        for i in range(adapters):
            rows_i = token_adapter == i
            y[rows_i] += xt[rows_i] @ a[i].t() @ b[i].t()

    out["lora_shrink + lora_expand vs per-adapter matmuls"] = {"ours": lora_ours,
                                                               "base": lora_base}

    pool_rows = torch.randn(4096, 128, generator=g)
    slots = torch.randint(0, 4096, (2124,), generator=g)
    out["pool_gather vs index_select"] = {
        "ours": lambda: ops.pool_gather(pool_rows, slots),
        "base": lambda: pool_rows.index_select(0, slots)}
    return out


def measure(cases: dict[str, dict], repeats: int) -> dict[str, dict[str, float]]:
    return {name: time_interleaved(fns, "cpu", repeats=repeats) for name, fns in cases.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=pathlib.Path,
                        default=RESULTS_DIR / f"{machine_name('cpu')}-contention.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = pairs()
    load_idle = os.getloadavg()
    idle = measure(cases, args.repeats)
    background = subprocess.Popen([sys.executable, "-c", BACKGROUND.format(threads=2)])
    try:
        time.sleep(2.0)  # let it reach its loop
        load_busy = os.getloadavg()
        busy = measure(cases, args.repeats)
    finally:
        background.kill()
        background.wait()
    rows = []
    for name in cases:
        row = {"case": name}
        for who in ("ours", "base"):
            row[f"{who}_idle_ms"] = idle[name][who] * 1e3
            row[f"{who}_contended_ms"] = busy[name][who] * 1e3
            row[f"{who}_slowdown"] = busy[name][who] / idle[name][who]
        row["slowdown_vs_baseline"] = row["ours_slowdown"] / row["base_slowdown"]
        rows.append(row)
        print(f"{name:52s} ours {row['ours_idle_ms']:.3f} -> {row['ours_contended_ms']:.3f} ms "
              f"(x{row['ours_slowdown']:.1f}); baseline {row['base_idle_ms']:.3f} -> "
              f"{row['base_contended_ms']:.3f} ms (x{row['base_slowdown']:.1f})", flush=True)
    record = {"benchmark": "bench/cpu_contention_study.py", "commit": git_commit(),
              "machine": machine_name("cpu"), "torch_threads": args.threads,
              "background": "a second process: 2-thread torch 384x384 matmul + tanh loop",
              "loadavg_idle": load_idle, "loadavg_contended": load_busy, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
