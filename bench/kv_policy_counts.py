"""How many KV heads take each FastGen policy, and the share of the prompt's entries they keep
(before page rounding), over bench_kv's perplexity prompts. A diagnostic, not part of
bench/run.py; README (FastGen, targets) quotes it.

    python bench/kv_policy_counts.py ['[{}, {"observe": 0}]']

Each setting is a dict of FastGenCache keyword arguments.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import torch

from bench_kv import TEXT, load_model, ppl_passages


def main() -> None:
    settings = json.loads(sys.argv[1]) if len(sys.argv) > 1 else [{}, {"observe": 0}]
    from fastllm.kv import FastGenCache, cache_keyword

    model, tokenizer = load_model("cpu")
    passages = ppl_passages(tokenizer, TEXT.read_text(), 4, "cpu")
    for kwargs in settings:
        heads, kept, total = Counter(), 0, 0
        for prompt, _ in passages:
            cache = FastGenCache(model, tokenizer, **kwargs)
            with torch.no_grad():
                model(prompt, **{cache_keyword(model): cache}, use_cache=True)
            for layer in cache.stats()["policies"]:
                for head in layer:
                    heads[head["policy"]] += 1
                    kept += head["kept"]
                    total += prompt.shape[1]
            cache.release()
        print(f"FastGenCache({kwargs}): {dict(heads)}; entries kept {100 * kept / total:.1f}% "
              f"of {len(passages)} prompts of {passages[0][0].shape[1]} tokens", flush=True)


if __name__ == "__main__":
    main()
