"""FastGen adaptive KV cache eviction: per-head policies profiled at prefill, ragged per-head
caches in the unified page pool.

>>> cache = fastllm.kv.FastGenCache(model, tokenizer)            # doctest: +SKIP
>>> model.generate(ids, past_key_values=cache, max_new_tokens=32)  # doctest: +SKIP
>>> cache.stats()["kept_bytes"] / cache.stats()["full_bytes"]      # doctest: +SKIP
"""

from .cache import SUPPORTED_MODEL_TYPES, FastGenCache, profile
from .policies import FASTGEN_POLICIES, POLICIES

__all__ = ["FASTGEN_POLICIES", "POLICIES", "SUPPORTED_MODEL_TYPES", "FastGenCache", "profile"]
