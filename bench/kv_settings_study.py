"""How FastGen's settings trade quality for memory on SmolLM2: for each setting, needle retrieval
on the development cases (bench_kv's quick set, 16 cases, on which the defaults were chosen) and
on held-out cases (HELDOUT_FACTS: 18 cases written afterwards), and teacher-forced perplexity over
8 prompts of ``--prompt-len`` tokens + 64 scored tokens. A diagnostic, not part of bench/run.py;
README (FastGen) quotes its output.

    python bench/kv_settings_study.py [--settings '[null, {}, {"observe": 0}]'] \\
        [--prompt-len 320] [--filler-len N] [--out results.json]

Each setting is a dict of FastGenCache keyword arguments; null is transformers' DynamicCache.
``--filler-len`` lengthens both needle sets' filler (default: 240 development, 320 held out).
"""

from __future__ import annotations

import argparse
import json
import pathlib

from bench_kv import (TEXT, load_model, needle_cases, needle_retrieval, perplexity,
                      ppl_passages)

DEFAULT_SETTINGS = [None, {}, {"heavy_pool": 1, "observe": 0}, {"observe": 0},
                    {"heavy_pool": 1}, {"observe": 32}, {"recovery": 0.9}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", type=json.loads, default=DEFAULT_SETTINGS)
    parser.add_argument("--prompt-len", type=int, default=320)
    parser.add_argument("--filler-len", type=int, default=None)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    from fastllm.kv import FastGenCache
    from transformers import DynamicCache

    model, tokenizer = load_model("cpu")
    text = TEXT.read_text()
    dev = needle_cases(tokenizer, text, quick=True, filler_len=args.filler_len)
    heldout = needle_cases(tokenizer, text, quick=False, heldout=True, filler_len=args.filler_len)
    passages = ppl_passages(tokenizer, text, 8, "cpu", prompt_len=args.prompt_len)
    full_ppl = None
    print(f"needles: {len(dev)} development ({dev[0][0].shape[1]} tokens), {len(heldout)} held "
          f"out ({heldout[0][0].shape[1]} tokens); perplexity: {len(passages)} x "
          f"({passages[0][0].shape[1]} + {passages[0][1].shape[1]}) tokens")
    rows = []
    for kwargs in args.settings:
        def make():
            if kwargs is None:
                return DynamicCache(config=model.config)
            return FastGenCache(model, tokenizer, **kwargs)

        d, h, p = (needle_retrieval(model, dev, make), needle_retrieval(model, heldout, make),
                   perplexity(model, passages, make))
        full_ppl = full_ppl or p["ppl"]
        name = "DynamicCache" if kwargs is None else f"FastGenCache({kwargs})"
        row = {"setting": kwargs, "needles_dev": d["cases"], "needles_dev_of": len(dev),
               "needles_dev_hits": d["hits"], "needles_dev_kv_pct": 100 * d["mem"],
               "needles_heldout": h["cases"], "needles_heldout_of": len(heldout),
               "needles_heldout_hits": h["hits"], "needles_heldout_kv_pct": 100 * h["mem"],
               "ppl": p["ppl"], "ppl_vs_first_pct": 100 * (p["ppl"] / full_ppl - 1),
               "kv_pct_end": 100 * p["mem"], "kv_pct_prompt_end": 100 * p["prompt_mem"]}
        rows.append(row)
        print(f"{name:60s} needles dev {d['cases']:2d}/{len(dev)} {d['hits']} "
              f"(KV {row['needles_dev_kv_pct']:.1f}%), held out {h['cases']:2d}/{len(heldout)} "
              f"{h['hits']} (KV {row['needles_heldout_kv_pct']:.1f}%); ppl {p['ppl']:.3f} "
              f"({row['ppl_vs_first_pct']:+.1f}%, KV {row['kv_pct_end']:.1f}% at the end, "
              f"{row['kv_pct_prompt_end']:.1f}% at the prompt's end)", flush=True)
    if args.out is not None:
        meta = {"prompt_len": passages[0][0].shape[1], "continuation": passages[0][1].shape[1],
                "prompts": len(passages), "dev_needle_tokens": dev[0][0].shape[1],
                "heldout_needle_tokens": heldout[0][0].shape[1],
                "note": "ppl_vs_first_pct is against the first setting (DynamicCache when null)"}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
