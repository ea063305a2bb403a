"""``fastllm.kv.profile``: FastGen's per-head policy choice for a text, without keeping a cache.

(Named ``profiling`` so that the module does not shadow the function ``fastllm.kv.profile``.)
"""

from __future__ import annotations

import torch

from .cache import FastGenCache, cache_keyword


def profile(model, tokenizer, text: str, **kwargs) -> list[list[dict]]:
    """FastGen's per-head policy table for ``text``: ``[layer][kv head] -> {policy, kept}``.

    Runs one prefill with a :class:`FastGenCache` (keyword arguments go to it) and releases its
    pages before returning.
    """
    ids = tokenizer(text, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    cache = FastGenCache(model, tokenizer, **kwargs)
    try:
        with torch.no_grad():
            model(ids, **{cache_keyword(model): cache}, use_cache=True)
        return cache.stats()["policies"]
    finally:
        cache.release()
