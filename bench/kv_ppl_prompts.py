"""Teacher-forced perplexity of FastGen (T = 0.95) with the paper's heavy-hitter ranking
(heavy_pool=1) and this project's (heavy_pool=7) against the full cache, over several prompts, so
that one token does not decide the figure (bench_kv's quick mode scores only 8 tokens). A
diagnostic, not part of bench/run.py.

    python bench/kv_ppl_prompts.py [--prompt 320] [--cont 32]
"""

from __future__ import annotations

import argparse
import math

import torch

from bench_kv import TEXT, load_model, memory_ratio, teacher_forced

OFFSETS = (0, 40000, 80000, 120000)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", type=int, default=320)
    parser.add_argument("--cont", type=int, default=32)
    args = parser.parse_args()
    from fastllm.kv import FastGenCache
    from transformers import DynamicCache

    model, tokenizer = load_model("cpu")
    text = TEXT.read_text()
    bos = torch.tensor([tokenizer.bos_token_id])
    configs = {"full": lambda: DynamicCache(config=model.config),
               "fastgen T=0.95 heavy_pool=7": lambda: FastGenCache(model, tokenizer, recovery=0.95),
               "fastgen T=0.95 heavy_pool=1": lambda: FastGenCache(model, tokenizer, recovery=0.95,
                                                                   heavy_pool=1)}
    totals = {name: [0.0, 0.0] for name in configs}
    for offset in OFFSETS:
        ids = torch.cat([bos, tokenizer(text[offset:offset + 8000],
                                        return_tensors="pt").input_ids[0]])[None]
        prompt, cont = ids[:, :args.prompt], ids[:, args.prompt:args.prompt + args.cont]
        for name, make in configs.items():
            cache = make()
            logps, _, _, _ = teacher_forced(model, cache, prompt, cont)
            totals[name][0] -= sum(logps)
            totals[name][1] += memory_ratio(cache)
            if hasattr(cache, "release"):
                cache.release()
    tokens = args.cont * len(OFFSETS)
    full = math.exp(totals["full"][0] / tokens)
    print(f"{len(OFFSETS)} prompts of {args.prompt} tokens, {tokens} scored tokens")
    for name, (nll, mem) in totals.items():
        ppl = math.exp(nll / tokens)
        print(f"{name:28s} ppl {ppl:7.2f} ({100 * (ppl / full - 1):+.1f}%), "
              f"KV memory {100 * mem / len(OFFSETS):.1f}%")


if __name__ == "__main__":
    main()
