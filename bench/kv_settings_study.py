"""How FastGen's settings trade quality for memory on SmolLM2: for each setting, needle retrieval
on the development cases (bench_kv's quick set, 16 cases, on which the defaults were chosen) and
on held-out cases (HELDOUT_FACTS: 18 cases written afterwards), and teacher-forced perplexity over
8 prompts of 320 tokens + 64 scored tokens. A diagnostic, not part of bench/run.py; README
(FastGen, Policies) quotes its output.

    python bench/kv_settings_study.py ['[null, {}, {"heavy_pool": 1, "observe": 0}]']

Each setting is a dict of FastGenCache keyword arguments; null is transformers' DynamicCache.
"""

from __future__ import annotations

import json
import sys

from bench_kv import (TEXT, load_model, needle_cases, needle_retrieval, perplexity,
                      ppl_passages)

DEFAULT_SETTINGS = [None, {}, {"heavy_pool": 1, "observe": 0}, {"observe": 0},
                    {"heavy_pool": 1}, {"observe": 32}, {"recovery": 0.9}]


def main() -> None:
    settings = json.loads(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SETTINGS
    from fastllm.kv import FastGenCache
    from transformers import DynamicCache

    model, tokenizer = load_model("cpu")
    text = TEXT.read_text()
    dev = needle_cases(tokenizer, text, quick=True)
    heldout = needle_cases(tokenizer, text, quick=False, heldout=True)
    passages = ppl_passages(tokenizer, text, 8, "cpu")
    full_ppl = None
    print(f"needles: {len(dev)} development, {len(heldout)} held out; perplexity: "
          f"{len(passages)} x ({passages[0][0].shape[1]} + {passages[0][1].shape[1]}) tokens")
    for kwargs in settings:
        def make():
            if kwargs is None:
                return DynamicCache(config=model.config)
            return FastGenCache(model, tokenizer, **kwargs)

        d, h, p = (needle_retrieval(model, dev, make), needle_retrieval(model, heldout, make),
                   perplexity(model, passages, make))
        full_ppl = full_ppl or p["ppl"]
        name = "DynamicCache" if kwargs is None else f"FastGenCache({kwargs})"
        print(f"{name:60s} needles dev {d['cases']:2d}/{len(dev)} {d['hits']} "
              f"(KV {100 * d['mem']:.1f}%), held out {h['cases']:2d}/{len(heldout)} {h['hits']} "
              f"(KV {100 * h['mem']:.1f}%); ppl {p['ppl']:.3f} "
              f"({100 * (p['ppl'] / full_ppl - 1):+.1f}%, KV {100 * p['mem']:.1f}% at the end, "
              f"{100 * p['prompt_mem']:.1f}% at the prompt's end)", flush=True)


if __name__ == "__main__":
    main()
