"""Where a FastGenCache decode step's time goes on SmolLM2, by function, under py-spy. A
diagnostic, not part of bench/run.py; README (FastGen, end-to-end time) quotes its output.

    py-spy record -r 200 -f raw -o /tmp/decode.txt -- python bench/kv_decode_profile.py run
    python bench/kv_decode_profile.py report /tmp/decode.txt

``run`` prefills a fresh cache with one 1000-token prompt six times, each followed by 32
single-token steps on one thread (so samples are not split across BLAS threads); ``report``
prints each fastllm / attention / MLP function's share of the samples taken inside those steps
(a function counts once per sample however deep it recurs).
"""

from __future__ import annotations

import sys
import time
from collections import Counter

import torch

from bench_kv import TEXT, load_model, make_cache, ppl_passages

from fastllm.kv import cache_keyword

STEPS, REPEATS = 32, 6


def decode_steps(model, cont) -> None:
    """The only caller of the timed steps: ``report`` keeps the samples below this frame."""
    key = cache_keyword(model)
    for i in range(STEPS):
        model(cont[:, i:i + 1], **{key: CACHE[0]}, use_cache=True)


CACHE = [None]


@torch.no_grad()
def run() -> None:
    torch.set_num_threads(1)
    model, tokenizer = load_model("cpu")
    (prompt, cont), = ppl_passages(tokenizer, TEXT.read_text(), 1, "cpu", prompt_len=1000,
                                   cont_len=STEPS)
    for _ in range(REPEATS):
        CACHE[0] = make_cache(model, tokenizer, ("fastgen", 0.95))
        model(prompt, **{cache_keyword(model): CACHE[0]}, use_cache=True)
        start = time.perf_counter()
        decode_steps(model, cont)
        print(f"{(time.perf_counter() - start) / STEPS * 1e3:.1f} ms per step", flush=True)
        CACHE[0].release()


def report(path: str) -> None:
    total, inclusive = 0, Counter()
    for line in open(path):
        stack, count = line.rstrip().rsplit(" ", 1)
        frames = stack.split(";")
        inside = [i for i, f in enumerate(frames) if f.startswith("decode_steps ")]
        if not inside:
            continue
        total += int(count)
        names = {f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].split(":")[0]
                 for f in frames[inside[0] + 1:]}
        for name in names:
            inclusive[name] += int(count)
    print(f"{total} samples inside the decode steps")
    for name, count in inclusive.most_common():
        if any(key in name for key in ("cache.py", "attention.py", "storage.py", "decode.py",
                                       "kv.py", "page_pool", "memory.py", "Attention", "MLP",
                                       "Linear")):
            print(f"{100 * count / total:5.1f}%  {name}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"]:
        run()
    elif sys.argv[1:2] == ["report"] and len(sys.argv) == 3:
        report(sys.argv[2])
    else:
        sys.exit(__doc__)
