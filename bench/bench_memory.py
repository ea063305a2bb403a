"""Unified page pool: pool_write / pool_gather against torch's index_copy_ / index_select.

Shapes come from the pool's two tenants: KV entries (one head, 64 or 128 values per slot, many
thousands of slots per step) and LoRA adapter rows (4096 values, a few hundred rows per adapter).
Achieved bandwidth counts bytes read plus bytes written.
"""

from __future__ import annotations

import torch

import fastllm.ops as ops
from fastllm._reference import pool_gather_reference, pool_write_reference

from harness import (Progress, Record, Rotating, copy_bandwidth_gbs, sets_to_defeat_cache,
                     time_interleaved)

CAPABILITY = "memory"


def cases(device: str):
    # Each call moves 8-64 MB, so the rotation of input sets outgrows any CPU cache or GPU L2.
    scale = 4 if device == "cuda" else 1
    for width, rows, label in [
        (64, 65536 * scale, "kv head_dim 64"),
        (128, 32768 * scale, "kv head_dim 128"),
        (4096, 1024 * scale, "lora row 4096"),
    ]:
        for dtype in (torch.float16, torch.float32):
            yield width, rows, dtype, label


def run(device: str, quick: bool = False) -> list[Record]:
    ceiling = copy_bandwidth_gbs(device)
    all_cases = list(cases(device))
    progress = Progress(CAPABILITY, 2 * len(all_cases))
    records = []
    for width, rows, dtype, label in all_cases:
        num_slots = 4 * rows  # the rows touched are a quarter of the pool, scattered
        element = torch.empty((), dtype=dtype).element_size()
        moved_bytes = 2 * rows * width * element  # read once, written once
        n_sets = sets_to_defeat_cache(moved_bytes, device, cap=4 if quick else 16)
        pool = torch.randn(num_slots, width, device=device).to(dtype)
        sets = Rotating([
            (torch.randperm(num_slots, device=device)[:rows],
             torch.randn(rows, width, device=device).to(dtype))
            for _ in range(n_sets)
        ])
        repeats = 5 if quick else 25

        def ours_write():
            slots, data = sets.next()
            ops.pool_write(pool, slots, data)

        def base_write():
            slots, data = sets.next()
            pool_write_reference(pool, slots, data)

        def ours_gather():
            ops.pool_gather(pool, sets.next()[0])

        def base_gather():
            pool_gather_reference(pool, sets.next()[0])

        case = f"{label} x{rows} {str(dtype).removeprefix('torch.')}"
        for op_name, ours, base, base_name in [
            ("pool_write", ours_write, base_write, "index_copy_"),
            ("pool_gather", ours_gather, base_gather, "index_select"),
        ]:
            t = time_interleaved({"ours": ours, "base": base}, device, repeats=repeats)
            gbs = moved_bytes / t["ours"] / 1e9
            records.append(Record(CAPABILITY, case, op_name, base_name, t["ours"] * 1e3,
                                  t["base"] * 1e3,
                                  {"GB/s": gbs, "% of copy BW": 100 * gbs / ceiling}))
            progress.step(f"{op_name} {case}: {t['base'] / t['ours']:.2f}x")
    return records
