"""FastGenCache on the real SmolLM2-135M: exactness of the full policy, memory really freed, each
head following its policy during decode, and the user-facing errors."""

import types

import pytest
import torch

from fastllm.kv import FASTGEN_POLICIES, FastGenCache, profile
from fastllm.memory import PagePool, PoolExhaustedError
from helpers import cache_arg

pytestmark = pytest.mark.real_model


def prompt_ids(tokenizer, text, tokens):
    return tokenizer(text, return_tensors="pt").input_ids[:, :tokens]


def step_logits(model, ids, cache, steps):
    """Prefill then `steps` greedy single-token forwards; the logits of every call."""
    out = []
    with torch.no_grad():
        logits = model(ids, **cache_arg(cache), use_cache=True).logits[:, -1]
        out.append(logits)
        for _ in range(steps):
            token = logits.argmax(-1, keepdim=True)
            logits = model(token, **cache_arg(cache), use_cache=True).logits[:, -1]
            out.append(logits)
    return torch.stack(out)


def test_full_policy_matches_dynamic_cache(smollm2, shakespeare):
    from transformers import DynamicCache

    model, tokenizer = smollm2
    ids = prompt_ids(tokenizer, shakespeare, 40)
    cache = FastGenCache(model, tokenizer, policy="full")
    got = step_logits(model, ids, cache, 3)
    want = step_logits(model, ids, DynamicCache(config=model.config), 3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # a chunk of several tokens on top of the cache (the dense multi-token path) agrees too
    more = prompt_ids(tokenizer, shakespeare[500:], 4)
    with torch.no_grad():
        dyn = DynamicCache(config=model.config)
        model(ids, **cache_arg(dyn), use_cache=True)
        want_chunk = model(more, **cache_arg(dyn), use_cache=True).logits
        fg = FastGenCache(model, tokenizer, policy="full")
        model(ids, **cache_arg(fg), use_cache=True)
        got_chunk = model(more, **cache_arg(fg), use_cache=True).logits
    torch.testing.assert_close(got_chunk, want_chunk, rtol=1e-4, atol=1e-4)
    stats = cache.stats()
    # every token kept: the pages hold the dense bytes plus at most one partial page per cache
    caches = model.config.num_hidden_layers * model.config.num_key_value_heads
    assert stats["kept_entries"] == stats["full_entries"]
    assert stats["full_bytes"] == stats["full_entries"] * stats["entry_bytes"]
    assert 0 <= stats["kept_bytes"] - stats["full_bytes"] < caches * cache.pool.page_bytes
    cache.release()
    fg.release()


def test_fastgen_generate_saves_memory_and_returns_pages(smollm2, shakespeare):
    model, tokenizer = smollm2
    ids = prompt_ids(tokenizer, shakespeare, 120)
    cache = FastGenCache(model, tokenizer, recovery=0.9)
    pool = cache.pool
    with torch.no_grad():
        out = model.generate(ids, **cache_arg(cache), max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
    stats = cache.stats()
    assert stats["tokens"] == ids.shape[1] + 7  # the last generated token is never fed back
    assert stats["kept_bytes"] < stats["full_bytes"]
    # bytes reported == pages really allocated from the pool to the kv owner
    assert stats["kept_bytes"] == pool.used_bytes("kv") == stats["pages"] * pool.page_bytes
    names = {p["policy"] for layer in stats["policies"] for p in layer}
    assert names <= set(FASTGEN_POLICIES) and len(stats["policies"]) == model.config.num_hidden_layers
    cache.release()
    assert pool.used_pages == 0


def test_decode_follows_each_heads_policy(smollm2, shakespeare):
    # StreamingLLM with 4 sinks + 28 recent: every head holds exactly 32 entries, always the
    # first 4 positions and the latest 28, and pages stay constant while tokens grow.
    model, tokenizer = smollm2
    ids = prompt_ids(tokenizer, shakespeare, 60)
    cache = FastGenCache(model, tokenizer, policy="streaming", budget=32, page_rows=8)
    step_logits(model, ids, cache, 6)
    pages = cache.stats()["pages"]
    step_logits_more = 4
    with torch.no_grad():
        token = torch.tensor([[tokenizer.eos_token_id or 0]])
        for _ in range(step_logits_more):
            model(token, **cache_arg(cache), use_cache=True)
    assert cache.stats()["pages"] == pages
    seen = cache.stats()["tokens"]
    for layer in cache.layers:
        heads = layer.heads
        assert heads.lengths.tolist() == [32] * 3
        for c in range(3):
            kept = sorted(heads.pos[c, :32].tolist())
            assert kept == list(range(4)) + list(range(seen - 28, seen))
    # H2O: heavy-hitter scores keep accumulating during decode
    h2o = FastGenCache(model, tokenizer, policy="h2o", budget=0.5)
    step_logits(model, ids, h2o, 2)
    before = h2o.layers[5].heads.score.sum().item()
    step_logits(model, torch.tensor([[13]]), h2o, 0)
    assert h2o.layers[5].heads.score.sum().item() > before
    assert set(h2o.layers[5].heads.lengths.tolist()) == {30}  # 0.5 of 60
    cache.release()
    h2o.release()


def test_fastgen_special_and_punct_heads_keep_them(smollm2, shakespeare):
    model, tokenizer = smollm2
    ids = prompt_ids(tokenizer, shakespeare, 80)
    cache = FastGenCache(model, tokenizer, recovery=0.5)
    step_logits(model, ids, cache, 3)
    seen_any = False
    for layer in cache.layers:
        heads = layer.heads
        for c, policy in enumerate(heads.policies):
            cls = heads.flags[c, :int(heads.lengths[c])]
            if policy.name == "special":
                seen_any = True
                # at most the newest (just attended, evicted next step) is not special
                assert int(((cls & 1) == 0).sum()) <= 1
            if policy.name == "special+punct":
                assert int(((cls & 3) == 0).sum()) <= 1
    table = profile(model, tokenizer, shakespeare[:300], recovery=0.5, progress=False)
    assert len(table) == model.config.num_hidden_layers and len(table[0]) == 3
    assert {c.policy for c in table.heads} <= set(FASTGEN_POLICIES)
    assert seen_any or any(c.policy != "full" for c in table.heads)
    assert len(table.summary().splitlines()) == 2 + model.config.num_hidden_layers + 1
    cache.release()


def test_user_errors(smollm2, shakespeare):
    model, tokenizer = smollm2
    for kwargs, match in [({"recovery": 0.0}, r"recovery must lie in \(0, 1\]"),
                          ({"recovery": 1.01}, "recovery"),
                          ({"locality": -0.1}, r"locality must lie in \[0, 1\]"),
                          ({"frequency": 2.0}, "frequency"),
                          ({"policy": "lru"}, "policy must be one of"),
                          ({"policy": "h2o", "budget": 0}, "token budget must be positive"),
                          ({"heavy_pool": 4}, "heavy_pool must be a positive odd int"),
                          ({"observe": -1}, "observe must be an int >= 0")]:
        with pytest.raises(ValueError, match=match):
            FastGenCache(model, tokenizer, **kwargs)
    for name in ("adaptive", "heavy_fit"):
        with pytest.raises(TypeError, match=f"{name} must be a bool, got 1"):
            FastGenCache(model, tokenizer, **{name: 1})
    fake = types.SimpleNamespace(config=types.SimpleNamespace(model_type="gpt2"))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'.*llama, mistral, qwen2"):
        FastGenCache(fake, tokenizer)
    # a prompt larger than the pool: clear error, and nothing left allocated
    pool = PagePool(20, 16 * 128, dtype=torch.float32)
    small = FastGenCache(model, tokenizer, policy="full", pool=pool)
    ids = prompt_ids(tokenizer, shakespeare, 100)
    with pytest.raises(PoolExhaustedError, match="prompt of 100 tokens .* does not fit"):
        with torch.no_grad():
            model(ids, **cache_arg(small), use_cache=True)
    assert pool.used_pages == 0
    # a reorder that repeats a sequence cannot be honoured
    cache = FastGenCache(model, tokenizer, policy="full")
    with torch.no_grad():
        model(torch.cat([ids[:, :20], ids[:, 20:40]]), **cache_arg(cache), use_cache=True)
    cache.reorder_cache(torch.tensor([1, 0]))  # a permutation is fine
    with pytest.raises(ValueError, match="cannot honour the batch reorder"):
        cache.reorder_cache(torch.tensor([0, 0]))
    with pytest.raises(NotImplementedError, match="crop"):
        cache.crop(-1)
    cache.release()


def test_batch_of_two_matches_single_sequences(smollm2, shakespeare):
    model, tokenizer = smollm2
    a = prompt_ids(tokenizer, shakespeare, 30)
    b = prompt_ids(tokenizer, shakespeare[3000:], 30)
    both = FastGenCache(model, tokenizer, recovery=0.9)
    got = step_logits(model, torch.cat([a, b]), both, 2)
    # the second row alone: a batch-indexing mistake (page tables, classes, scores) shows there
    single = FastGenCache(model, tokenizer, recovery=0.9)
    want = step_logits(model, b, single, 2)
    torch.testing.assert_close(got[:, 1], want[:, 0], rtol=1e-3, atol=1e-3)
    assert [p["policy"] for p in single.stats()["policies"][7]] == \
        [p["policy"] for p in both.stats()["policies"][7][3:]]
    single.release()
    both.release()


def test_token_classes_from_the_tokenizer(smollm2):
    from fastllm.kv.policies import token_classes

    _, tokenizer = smollm2
    comma = tokenizer(",").input_ids[0]
    word = tokenizer(" castle").input_ids[0]
    ids = torch.tensor([[tokenizer.bos_token_id, comma, word, len(tokenizer) + 5]])
    # special, punctuation, neither, and an id past the tokenizer's vocabulary (a model's padded
    # embedding rows) counted as neither
    assert token_classes(tokenizer, ids).tolist() == [[1, 2, 0, 0]]
