"""The page pool holding a real model's KV cache: SmolLM2-135M's keys and values, stored per
(layer, KV head) in pool pages and gathered back, must continue generation exactly."""

import copy

import pytest
import torch

from fastllm.memory import PagePool
from helpers import cache_arg

pytestmark = pytest.mark.real_model


def test_kv_cache_round_trips_through_pool_pages(smollm2, shakespeare):
    from transformers import DynamicCache

    model, tokenizer = smollm2
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    ids = tokenizer(shakespeare[:400], return_tensors="pt").input_ids
    prompt, next_token = ids[:, :-1], ids[:, -1:]

    with torch.no_grad():
        prefill = model(prompt, use_cache=True)
        cache = prefill.past_key_values
        # Stepping appends to the cache, so step a copy and keep the prefill cache to store.
        expected = model(next_token, **cache_arg(copy.deepcopy(cache)), use_cache=True).logits

    tokens = prompt.shape[1]
    rows_per_page = 16
    pool = PagePool(num_pages=2 * config.num_hidden_layers * config.num_key_value_heads
                    * -(-tokens // rows_per_page),
                    page_size=rows_per_page * head_dim, dtype=torch.float32)
    page_tables = {}
    for layer in range(config.num_hidden_layers):
        keys, values = cache.layers[layer].keys, cache.layers[layer].values  # [1, kv_heads, T, d]
        for kind, tensor in (("k", keys), ("v", values)):
            for head in range(config.num_key_value_heads):
                pages = pool.alloc(-(-tokens // rows_per_page), owner="kv")
                slots = pool.slots_at(pages, torch.arange(tokens), head_dim)
                pool.write(slots, tensor[0, head].contiguous())
                page_tables[layer, kind, head] = pages
    assert pool.stats()["by_owner"]["kv"]["pages"] == pool.num_pages

    rebuilt = DynamicCache()
    for layer in range(config.num_hidden_layers):
        per_kind = []
        for kind in ("k", "v"):
            heads = [pool.gather(pool.slots_at(page_tables[layer, kind, h], torch.arange(tokens),
                                               head_dim), head_dim)
                     for h in range(config.num_key_value_heads)]
            per_kind.append(torch.stack(heads)[None])
        rebuilt.update(per_kind[0], per_kind[1], layer)

    with torch.no_grad():
        logits = model(next_token, **cache_arg(rebuilt), use_cache=True).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
