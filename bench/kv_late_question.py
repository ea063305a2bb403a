"""Needles asked after the compression: the prompt (BOS + filler with the fact) is prefilled and
compressed alone, then the question arrives as a second multi-token step, then the answer is
teacher-forced. No policy can see the question when it decides what to drop, unlike bench_kv's
needles, where the question ends the prompt (SnapKV's last-window scores and FastGen's `observe`
both read it). Baselines get the share of the prompt FastGen kept at T = 0.95.

    python bench/kv_late_question.py [--heldout] --out /tmp/kv_late_question.json
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch

import bench_kv as B
from fastllm.kv import cache_keyword


def late_cases(tokenizer, text: str, heldout: bool):
    """(context ids, question ids, answer ids) per bench_kv needle case."""
    facts = B.HELDOUT_FACTS if heldout else B.FACTS[:4]
    depths = B.HELDOUT_DEPTHS if heldout else B.DEPTHS
    questions = [(q, p) for _, q, p, _ in facts for _ in depths]
    cases = []
    for (prompt, answer), (question, prefix) in zip(
            B.needle_cases(tokenizer, text, quick=not heldout, heldout=heldout), questions):
        ask = tokenizer(f"\nQuestion: {question}\nAnswer: {prefix}", return_tensors="pt").input_ids
        n = ask.shape[1]
        assert torch.equal(prompt[0, -n:], ask[0]), "the prompt must end with the question"
        cases.append((prompt[:, :-n], ask, answer))
    return cases


@torch.no_grad()
def retrieval(model, tokenizer, cases, config) -> dict:
    hits, mems = [], []
    for context, ask, answer in cases:
        cache = B.make_cache(model, tokenizer, config)
        model(context, **{cache_keyword(model): cache}, use_cache=True)
        mems.append(B.memory_ratio(cache))
        logits = model(ask, **{cache_keyword(model): cache}, use_cache=True).logits[:, -1]
        retrieved = True
        for i in range(answer.shape[1]):
            if int(logits.argmax(-1)) != int(answer[0, i]):
                retrieved = False
                break
            logits = model(answer[:, i:i + 1], **{cache_keyword(model): cache}, use_cache=True).logits[:, -1]
        hits.append(int(retrieved))
        if hasattr(cache, "release"):
            cache.release()
    return {"cases": sum(hits), "of": len(hits), "mem_at_prompt_end": sum(mems) / len(mems),
            "hits": "".join(map(str, hits))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--heldout", action="store_true", help="HELDOUT_FACTS instead of FACTS[:4]")
    ap.add_argument("--out", default="/tmp/kv_late_question.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = B.load_model("cpu")
    cases = late_cases(tokenizer, B.TEXT.read_text(), args.heldout)
    results = {}
    for config in [("dynamic", None), ("fastgen", 0.95), ("fastgen-paper", 0.95)]:
        results[str(config)] = retrieval(model, tokenizer, cases, config)
        print(config, results[str(config)], flush=True)
    budget = results[str(("fastgen", 0.95))]["mem_at_prompt_end"]
    for name in ("snapkv", "h2o", "streaming"):
        config = (name, budget)
        results[str(config)] = retrieval(model, tokenizer, cases, config)
        print(config, results[str(config)], flush=True)
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
