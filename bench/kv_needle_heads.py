"""Why a KV policy loses a needle: per layer and KV head, the policy FastGen gave it, how many of
the buried fact's tokens it kept, and how much attention the last prompt query puts on the fact
under a full cache (eager attention). Not part of bench/run.py; a diagnostic.

    python bench/kv_needle_heads.py [case index ...] [--heavy-pool N] [--observe N] [--recovery T]
"""

from __future__ import annotations

import argparse

import torch

from bench_kv import TEXT, load_model, needle_cases


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cases", nargs="*", type=int, default=[0])
    parser.add_argument("--heavy-pool", type=int, default=11)
    parser.add_argument("--observe", type=int, default=64)
    parser.add_argument("--recovery", type=float, default=0.95)
    parser.add_argument("--full", action="store_true", help="6 facts x 4 depths, 320-token filler")
    args = parser.parse_args()
    from fastllm.kv import FastGenCache, cache_keyword

    model, tokenizer = load_model("cpu")
    cases = needle_cases(tokenizer, TEXT.read_text(), quick=not args.full, spans=True)
    hkv = model.config.num_key_value_heads
    group = model.config.num_attention_heads // hkv
    for index in args.cases:
        ids, _, (start, stop) = cases[index]
        model.set_attn_implementation("eager")
        with torch.no_grad():
            attentions = model(ids, output_attentions=True).attentions
        on_fact = torch.stack([a[0, :, -1, start:stop].sum(-1) for a in attentions])
        on_fact = on_fact.view(len(attentions), hkv, group).mean(-1)
        cache = FastGenCache(model, tokenizer, recovery=args.recovery, heavy_pool=args.heavy_pool,
                             observe=args.observe)
        with torch.no_grad():
            model(ids, **{cache_keyword(model): cache}, use_cache=True)
        print(f"case {index}: {ids.shape[1]} tokens, fact at {start}..{stop}")
        for li, layer in enumerate(cache.layers):
            heads = layer.heads
            cells = []
            for h in range(hkv):
                n = int(heads.lengths[h])
                kept = set(heads.pos[h, :n].tolist())
                hit = sum(p in kept for p in range(start, stop))
                cells.append(f"{heads.policies[h].name:>29s} {n:4d} kept, fact {hit}/{stop - start}"
                             f", attn {on_fact[li, h]:.2f}")
            print(f"  layer {li:2d}: " + " | ".join(cells))
        cache.release()


if __name__ == "__main__":
    main()
