"""Leaks (issue 21): many generate calls with FastGenCache, many adapter load / batch / unload
cycles with AdapterManager, and both together on one pool, on a long-lived pool return every
page and keep the process's memory flat. A tiny random Llama (no download); FASTLLM_LEAK_CALLS sets the number of calls
(default 1000)."""

from __future__ import annotations

import gc
import os
import resource

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastllm.kv import FastGenCache  # noqa: E402
from fastllm.lora import AdapterManager  # noqa: E402
from fastllm.memory import PagePool  # noqa: E402

CALLS = int(os.environ.get("FASTLLM_LEAK_CALLS", "1000"))
VOCAB = 97
# Resident memory may grow while allocator caches and Python's free lists warm up; past the
# first tenth of the calls it must stay within this bound (a leak of one 4 KB page table or
# adapter row per call would pass 4 MB in 1000 calls).
GROWTH_BOUND_BYTES = 24 << 20


class StubTokenizer:
    all_special_ids = [0, 1]

    def __len__(self):
        return VOCAB

    def batch_decode(self, ids):
        return ["." if i[0] % 5 == 0 else f" w{i[0]}" for i in ids]


def tiny_llama(layers=2):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def peak_rss_bytes() -> int:
    # ru_maxrss is in KB on Linux: the peak, so growth shows as a higher peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_flat(call, calls: int) -> int:
    """Run ``call(i)`` ``calls`` times; returns the peak-RSS growth after the warm-up tenth."""
    warm = max(1, calls // 10)
    for i in range(warm):
        call(i)
    gc.collect()
    base = peak_rss_bytes()
    for i in range(warm, calls):
        call(i)
    gc.collect()
    return peak_rss_bytes() - base


def test_fastgen_generate_returns_every_page_and_memory_stays_flat():
    model = tiny_llama(layers=1)  # one layer: a generate call costs what the cache costs
    cache_probe = FastGenCache(model, StubTokenizer(), page_rows=4, max_tokens=64)
    pool = PagePool(256, cache_probe.pool.page_size, torch.float32, torch.device("cpu"))
    cache_probe.release()
    generator = torch.Generator().manual_seed(0)

    def call(i):
        length = 6 + i % 11  # prompts of varying length: caches of every page count
        ids = torch.randint(2, VOCAB, (2, length), generator=generator)
        cache = FastGenCache(model, StubTokenizer(), page_rows=4, pool=pool,
                             policy=("fastgen", "h2o", "streaming")[i % 3],
                             **({"budget": 6} if i % 3 else {}))
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                           do_sample=False, pad_token_id=0, cache=cache)
        assert pool.used_pages > 0  # the cache did hold pages
        cache.release()
        assert pool.used_pages == 0, f"call {i}: {pool.stats()}"

    growth = run_flat(call, CALLS)
    assert pool.stats()["by_owner"] == {}
    assert growth < GROWTH_BOUND_BYTES, f"peak RSS grew {growth / 2**20:.1f} MB in {CALLS} calls"


def test_adapter_cycles_return_every_page_and_memory_stays_flat():
    model = tiny_llama()
    manager = AdapterManager(model, max_rank=8, num_pages=64)
    generator = torch.Generator().manual_seed(0)
    shapes = {name: module.weight.shape for name, module in model.named_modules()
              if name.endswith(("q_proj", "v_proj"))}

    def adapter_state(rank):
        state = {}
        for name, (out_f, in_f) in shapes.items():
            prefix = f"base_model.model.{name}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=generator)
            state[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=generator)
        return state

    ids = torch.randint(2, VOCAB, (3, 5), generator=generator)

    def call(i):
        names = [f"a{i}", f"b{i}"]
        for k, name in enumerate(names):
            rank = 1 + (i + 3 * k) % 8  # every rank 1..8: rows of every page count
            manager.load(name, adapter_state(rank), config={"r": rank, "lora_alpha": 2 * rank})
        with manager.batch([names[0], None, names[1]]), torch.no_grad():
            model(ids)
        for name in names:
            manager.unload(name)
        assert manager.pool.used_pages == 0, f"call {i}: {manager.pool.stats()}"

    growth = run_flat(call, CALLS)
    assert manager.adapters == []
    assert growth < GROWTH_BOUND_BYTES, f"peak RSS grew {growth / 2**20:.1f} MB in {CALLS} calls"
    manager.close()


def test_adapters_and_fastgen_caches_on_one_pool_return_every_page_and_memory_stays_flat():
    from fastllm.memory import unified_page_size

    model = tiny_llama(layers=1)
    pool = PagePool(512, unified_page_size(model, target_modules=("q_proj", "v_proj"), rank=8),
                    torch.float32, torch.device("cpu"))
    manager = AdapterManager(model, max_rank=8, pool=pool, target_modules=("q_proj", "v_proj"))
    generator = torch.Generator().manual_seed(0)
    shapes = {name: module.weight.shape for name, module in model.named_modules()
              if name.endswith(("q_proj", "v_proj"))}

    def adapter_state(rank):
        state = {}
        for name, (out_f, in_f) in shapes.items():
            prefix = f"base_model.model.{name}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=generator)
            state[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=generator)
        return state

    def call(i):
        name = f"a{i}"
        rank = 1 + i % 8
        manager.load(name, adapter_state(rank), config={"r": rank, "lora_alpha": 2 * rank})
        ids = torch.randint(2, VOCAB, (2, 6 + i % 11), generator=generator)
        cache = FastGenCache(model, StubTokenizer(), pool=pool)
        with manager.batch([name, None]), torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                           do_sample=False, pad_token_id=0, cache=cache)
        assert set(pool.stats()["by_owner"]) == {"kv", "lora"}  # both held pages of this pool
        cache.release()
        manager.unload(name)
        assert pool.used_pages == 0, f"call {i}: {pool.stats()}"

    growth = run_flat(call, CALLS)
    assert pool.stats()["by_owner"] == {}
    assert growth < GROWTH_BOUND_BYTES, f"peak RSS grew {growth / 2**20:.1f} MB in {CALLS} calls"
    manager.close()
