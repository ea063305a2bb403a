"""FastGen adaptive KV cache eviction: per-head policies profiled at prefill, ragged per-head
caches in the unified page pool.

Needs transformers (``pip install 'fastllm[hf]'``): FastGenCache is a transformers Cache.

>>> cache = fastllm.kv.FastGenCache(model, tokenizer)            # doctest: +SKIP
>>> model.generate(ids, cache=cache, max_new_tokens=32)  # doctest: +SKIP
>>> cache.stats()["kept_bytes"] / cache.stats()["full_bytes"]      # doctest: +SKIP
>>> print(fastllm.kv.profile(model, tokenizer, text))   # each head's policy  # doctest: +SKIP
"""

from .._optional import needs

with needs("transformers", "fastllm.kv"):
    from .cache import SUPPORTED_MODEL_TYPES, FastGenCache, cache_keyword
    from .profiling import HeadChoice, Profile, profile
from .policies import FASTGEN_POLICIES, POLICIES

__all__ = [
    "FASTGEN_POLICIES", "POLICIES", "SUPPORTED_MODEL_TYPES", "FastGenCache", "HeadChoice",
    "Profile", "cache_keyword", "profile",
]
