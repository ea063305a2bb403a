"""How fastllm's CPU kernels degrade when the cores are oversubscribed, against the ATen ops they
replace (issue 21, "under contention").

Each pair (a fastllm op and its PyTorch baseline at SmolLM2's decode shapes, fp32, batch 1) is
timed with ``harness.time_interleaved`` twice in one run: on an idle machine, and while a second
process runs a 2-thread torch matmul loop (another model's generate on the same 2 cores). The
figure that matters is each op's slowdown (contended / idle) against its baseline's: a kernel
whose many short parallel regions wait on a descheduled thread degrades far worse than one big
ATen call.

Contended timings swing by 100x from one background start to the next (whether the two
processes' threads happen to be descheduled in step), so the contended half runs ``--rounds``
times, each against a freshly started background, and the report keeps every round, the medians,
and the rounds in which each op degraded no worse than its baseline.

Pairs: ``sparse_mlp`` at 50% of SmolLM2's gated MLP against the dense MLP (three F.linear);
``SparseMLP`` (the module, its int4 predictor and top-k included) against the same dense MLP;
``kv_ragged_decode`` over 3 caches of 708 entries (FastGen's 62% of 1000 tokens) against SDPA
over 1000; ``lora_shrink`` + ``lora_expand`` for 8 tokens of 4 rank-16 adapters on a 576-wide
projection against the per-adapter matmul loop; ``pool_gather`` against ``index_select``.

Usage: python bench/cpu_contention_study.py [--threads 2] [--repeats 15] [--rounds 5] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
    import fastllm.nn
    import fastllm.ops as ops

    g = torch.Generator().manual_seed(0)
    out: dict[str, dict] = {}

    d, n = 576, 1536  # SmolLM2's MLP
    x = torch.randn(1, d, generator=g)
    w_gate, w_up = torch.randn(n, d, generator=g) / 24, torch.randn(n, d, generator=g) / 24
    w_down = torch.randn(d, n, generator=g) / 40
    w_down_t = w_down.t().contiguous()
    active = torch.randperm(n, generator=g)[: n // 2].sort().values
    dense_mlp = lambda: F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)  # noqa: E731
    out["sparse_mlp 50% vs dense MLP"] = {
        "ours": lambda: ops.sparse_mlp(x, w_up, w_down_t, active, w_gate=w_gate),
        "base": dense_mlp}

    mlp = torch.nn.Module()
    mlp.gate_proj, mlp.up_proj = (torch.nn.Linear(d, n, bias=False),
                                  torch.nn.Linear(d, n, bias=False))
    mlp.down_proj, mlp.act_fn = torch.nn.Linear(n, d, bias=False), torch.nn.SiLU()
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(w_gate)
        mlp.up_proj.weight.copy_(w_up)
        mlp.down_proj.weight.copy_(w_down)
    predictor = fastllm.nn.QuantizedPredictor.from_weights(w_up, w_gate, bits=4)
    sparse_module = fastllm.nn.SparseMLP(mlp, mode="predictor", keep=n // 2, predictor=predictor)
    x3 = x.view(1, 1, d)

    def module_ours():
        with torch.no_grad():
            return sparse_module(x3)

    out["SparseMLP 50% (int4 predictor) vs dense MLP"] = {"ours": module_ours, "base": dense_mlp}

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


def contended_round(cases: dict[str, dict], repeats: int, threads: int):
    """One measurement against a freshly started background process: (timings, load average)."""
    background = subprocess.Popen([sys.executable, "-c", BACKGROUND.format(threads=threads)])
    try:
        time.sleep(2.0)  # let it reach its loop
        load = os.getloadavg()
        return measure(cases, repeats), load
    finally:
        background.kill()
        background.wait()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=5,
                        help="contended measurements, each against a fresh background process")
    parser.add_argument("--out", type=pathlib.Path,
                        default=RESULTS_DIR / f"{machine_name('cpu')}-contention.json")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    torch.set_num_threads(args.threads)
    cases = pairs()
    load_idle = os.getloadavg()
    idle = measure(cases, args.repeats)
    rounds = [contended_round(cases, args.repeats, 2) for _ in range(args.rounds)]
    rows = []
    for name in cases:
        row = {"case": name}
        for who in ("ours", "base"):
            row[f"{who}_idle_ms"] = idle[name][who] * 1e3
            row[f"{who}_contended_ms_rounds"] = [busy[name][who] * 1e3 for busy, _ in rounds]
            row[f"{who}_contended_ms"] = statistics.median(row[f"{who}_contended_ms_rounds"])
            row[f"{who}_contended_ms_worst"] = max(row[f"{who}_contended_ms_rounds"])
            row[f"{who}_slowdown"] = row[f"{who}_contended_ms"] / row[f"{who}_idle_ms"]
        row["slowdown_vs_baseline"] = row["ours_slowdown"] / row["base_slowdown"]
        # In each round: did ours slow down by no more than its baseline did?
        row["rounds_no_worse"] = sum(
            o / row["ours_idle_ms"] <= b / row["base_idle_ms"]
            for o, b in zip(row["ours_contended_ms_rounds"], row["base_contended_ms_rounds"]))
        rows.append(row)
        print(f"{name:52s} ours {row['ours_idle_ms']:.3f} -> {row['ours_contended_ms']:.3f} ms "
              f"(x{row['ours_slowdown']:.1f}); baseline {row['base_idle_ms']:.3f} -> "
              f"{row['base_contended_ms']:.3f} ms (x{row['base_slowdown']:.1f}); worst round "
              f"{row['ours_contended_ms_worst']:.3f} vs {row['base_contended_ms_worst']:.3f} ms; "
              f"no worse in {row['rounds_no_worse']}/{args.rounds} rounds", flush=True)
    record = {"benchmark": "bench/cpu_contention_study.py", "commit": git_commit(),
              "machine": machine_name("cpu"), "torch_threads": args.threads,
              "background": "a second process: 2-thread torch 384x384 matmul + tanh loop",
              "rounds": args.rounds, "contended_ms": "median over rounds",
              "loadavg_idle": load_idle, "loadavg_contended": [load for _, load in rounds],
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
