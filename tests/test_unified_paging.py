"""Adapters and FastGen KV caches in one PagePool (S-LoRA's unified paging) on the real model:
page sizes that suit both owners, results equal to separate pools, every page accounted for, the
owners cooperating under pressure (unused adapters evicted for KV pages, a clear error when the
running batch cannot fit, nothing half-written wherever pages are taken), and sequences that join
and leave a running batch exactly as if each ran alone."""

import copy
import warnings

import pytest
import torch

from fastllm.kv import FastGenCache
from fastllm.lora import LLAMA_TARGETS, AdapterManager, AdapterStore, ModuleSpec
from fastllm.memory import PagePool, PoolExhaustedError, unified_page_size
from fastllm.memory.page_pool import MIN_KV_ROWS, kv_page_waste, lora_page_waste, lora_row_widths

pytestmark = pytest.mark.real_model

RANKS = {"a": 4, "b": 8, "c": 4, "d": 8}


@pytest.fixture(scope="module")
def served(smollm2):
    """A copy of SmolLM2 to wrap (AdapterManager changes it in place) and random adapters of
    mixed ranks on every projection, as PEFT-style state dicts."""
    model, tokenizer = smollm2
    ours = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(7)
    adapters = {}
    for name, rank in RANKS.items():
        state = {}
        for module_name, module in ours.named_modules():
            if isinstance(module, torch.nn.Linear) and module_name.rsplit(".", 1)[-1] in LLAMA_TARGETS:
                state[f"{module_name}.lora_A.weight"] = 0.05 * torch.randn(
                    rank, module.in_features, generator=generator)
                state[f"{module_name}.lora_B.weight"] = 0.05 * torch.randn(
                    module.out_features, rank, generator=generator)
        adapters[name] = (state, {"r": rank, "lora_alpha": 2 * rank})
    return ours, tokenizer, adapters


def manager_for(model, adapters, **kwargs):
    manager = AdapterManager(model, max_rank=8, **kwargs)
    for name, (state, config) in adapters.items():
        manager.load(name, state, config)
    return manager


def prompt(tokenizer, text, n):
    return tokenizer(text[:4000], return_tensors="pt").input_ids[:, :n]


def adapter_pages(manager, name):
    return manager.store.host[name].buffer.shape[0]


def step(model, cache, tokens, new_tokens=None):
    """One forward of ``tokens [B, n]`` on top of the cache with the mask and positions the
    running batch needs; the last position's logits [B, vocab]."""
    kwargs = {}
    if cache.batch_size:
        n = tokens.shape[1]
        kwargs = dict(attention_mask=cache.attention_mask(n), position_ids=cache.position_ids(n))
    with torch.no_grad():
        return model(tokens, cache=cache, use_cache=True, **kwargs).logits[:, -1]


def greedy(model, manager, names, cache, ids, steps):
    """Prefill ``ids`` then ``steps`` greedy decode steps with ``names`` applied; logits per step."""
    out = []
    with manager.batch(names):
        logits = step(model, cache, ids)
        out.append(logits)
        for _ in range(steps):
            logits = step(model, cache, logits.argmax(-1, keepdim=True))
            out.append(logits)
    return torch.stack(out)


def snapshot(cache):
    return [(layer.seen, [list(p) for p in layer.heads.pages], layer.heads.lengths.clone(),
             layer.heads.m_len.copy()) for layer in cache.layers]


def assert_same_snapshot(before, after):
    assert len(before) == len(after)
    for (seen, pages, lengths, mirror), (seen2, pages2, lengths2, mirror2) in zip(before, after):
        assert seen == seen2 and pages == pages2
        assert torch.equal(lengths, lengths2) and (mirror == mirror2).all()


def assert_accounted(pool, manager, caches):
    by_owner = pool.stats()["by_owner"]
    kv = sum(c.stats()["pages"] for c in caches)
    lora = sum(r.page_ids.numel() for r in manager.store.resident.values())
    assert by_owner.get("kv", {"pages": 0})["pages"] == kv
    assert by_owner.get("lora", {"pages": 0})["pages"] == lora == manager.stats()["pages_used"]
    assert pool.used_pages == sum(v["pages"] for v in by_owner.values())


# ---- page sizes ----------------------------------------------------------------------------------

def test_unified_page_size_suits_adapters_and_kv_caches(smollm2):
    model, _ = smollm2
    kv_width = 2 * model.config.head_dim
    widths = lora_row_widths(model, LLAMA_TARGETS)
    assert len(widths) == 7 * model.config.num_hidden_layers
    page = unified_page_size(model)
    assert page % kv_width == 0 and page >= max(max(w) for w in widths)
    kv, lora = kv_page_waste(page // kv_width, 64), lora_page_waste(widths, 16, page, 4)
    assert max(kv, lora) < 0.15, (page, kv, lora)
    # the adapter-only default page (65536 elements = 512 KV entries) leaves short caches empty
    assert kv_page_waste(65536 // kv_width, 64) > 0.85
    # the smallest page that fits the widest row wastes more of every adapter
    assert lora_page_waste(widths, 16, 1536, 4) > lora
    # longer caches favour larger pages, and no adapters the smallest KV page
    assert unified_page_size(model, kv_entries=512) >= page
    assert unified_page_size(model, target_modules=()) == MIN_KV_ROWS * kv_width


@pytest.mark.parametrize("page", [1536, 1792, 3072, 3056, 4608])
@pytest.mark.parametrize("rank", [1, 8, 16])
def test_packing_model_is_the_adapter_stores(smollm2, page, rank):
    model, _ = smollm2
    widths = lora_row_widths(model, LLAMA_TARGETS)
    specs = [ModuleSpec(f"m{i}", i_f, o_f) for i, (i_f, o_f) in enumerate(widths)]
    store = AdapterStore(PagePool(1, page, torch.float32), specs, max_rank=16)
    plan = store._plan(tuple([rank] * len(specs)))
    payload = sum(rank * (i_f + o_f) for i_f, o_f in widths)
    assert lora_page_waste(widths, rank, page, 4) == pytest.approx(
        1 - payload / (plan.num_pages * page), abs=1e-12)


def test_pool_for_model_and_argument_errors(smollm2):
    model, _ = smollm2
    page = unified_page_size(model)
    pool = PagePool.for_model(model, nbytes=10_000_000)
    assert pool.page_size == page and pool.dtype == torch.float32
    assert pool.num_pages == 10_000_000 // (page * 4)
    assert PagePool.for_model(model, num_pages=3, page_size=2048).page_size == 2048
    assert PagePool.for_model(model, num_pages=3, rank=64, kv_entries=16).page_size == \
        unified_page_size(model, rank=64, kv_entries=16)
    with pytest.raises(ValueError, match="exactly one of nbytes and num_pages"):
        PagePool.for_model(model)
    with pytest.raises(ValueError, match="exactly one of nbytes and num_pages"):
        PagePool.for_model(model, nbytes=1 << 20, num_pages=4)
    with pytest.raises(ValueError, match="less than one page"):
        PagePool.for_model(model, nbytes=100)
    with pytest.raises(ValueError, match="nbytes must be a positive int"):
        PagePool.for_model(model, nbytes=-5)
    with pytest.raises(ValueError, match="only apply when page_size is computed"):
        PagePool.for_model(model, num_pages=2, page_size=2048, rank=8)
    with pytest.raises(ValueError, match="rank must be an int in"):
        unified_page_size(model, rank=0)
    with pytest.raises(ValueError, match="kv_entries must be a positive int"):
        unified_page_size(model, kv_entries=0)
    with pytest.raises(ValueError, match="transformers model with a config"):
        unified_page_size(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="not a str"):
        unified_page_size(model, target_modules="q_proj")


def test_page_size_mismatches_are_warned_or_refused(served, shakespeare):
    model, tokenizer, adapters = served
    ids = prompt(tokenizer, shakespeare, 30)
    # the case: KV caches in an adapter-sized pool (65536-element pages)
    big = PagePool(200, 65536, torch.float32)
    cache = FastGenCache(model, tokenizer, pool=big)
    with pytest.warns(UserWarning, match=r"fill \d+% of the \d+ pages .*PagePool\.for_model"):
        step(model, cache, ids)
    stats = cache.stats()
    # full_bytes is what a dense cache holds, not page-rounded: here 17x less than the pages
    assert stats["full_bytes"] == stats["full_entries"] * stats["entry_bytes"]
    assert stats["kept_bytes"] == big.used_bytes("kv") > 10 * stats["full_bytes"]
    cache.release()
    # a pool sized for both owners: no warning, and the pages hold little more than the entries
    shared = PagePool.for_model(model, nbytes=8 << 20)
    cache = FastGenCache(model, tokenizer, pool=shared)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(model, cache, ids)
        manager = AdapterManager(model, max_rank=8, pool=shared)
    stats = cache.stats()
    assert stats["kept_bytes"] < 2 * stats["kept_entries"] * stats["entry_bytes"]
    cache.release()
    manager.close()
    # pages too small for an adapter row are refused; pages that waste a third of an adapter warn
    with pytest.raises(ValueError, match="cannot hold an adapter row of 1536 elements"):
        AdapterManager(model, max_rank=8, pool=PagePool(4, 1024, torch.float32))
    with pytest.warns(UserWarning, match="leaves 4\\d% of its pages empty"):
        manager = AdapterManager(model, target_modules=["gate_proj"], max_rank=16,
                                 pool=PagePool(4, 3056, torch.float32))
    manager.close()
    # KV rows must divide the page
    with pytest.raises(ValueError, match="multiple of 2 \\* head_dim"):
        FastGenCache(model, tokenizer, pool=PagePool(4, 1000, torch.float32))


# ---- one pool, two owners ------------------------------------------------------------------------

def test_one_pool_logits_and_generate_equal_separate_pools(served, shakespeare):
    model, tokenizer, adapters = served
    tokenizer.padding_side = "left"
    texts = [shakespeare[:300], shakespeare[2000:2150], shakespeare[5000:5400]]
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=40)
    names = ["a", None, "b"]
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def run(manager, kv_pool):
        cache = FastGenCache(model, tokenizer, pool=kv_pool)
        out = []
        with manager.batch(names), torch.no_grad():
            logits = model(**batch, cache=cache, use_cache=True).logits[:, -1]
            out.append(logits)
            mask = batch["attention_mask"]
            for _ in range(3):
                mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
                logits = model(logits.argmax(-1, keepdim=True), attention_mask=mask, cache=cache,
                               use_cache=True).logits[:, -1]
                out.append(logits)
        gen_cache = FastGenCache(model, tokenizer, pool=kv_pool)
        with manager.batch(names), torch.no_grad():
            tokens = model.generate(**batch, cache=gen_cache, **gen)
        return torch.stack(out), tokens, cache, gen_cache

    separate = manager_for(model, adapters, num_pages=64)
    try:
        want, want_tokens, c1, c2 = run(separate, None)
        c1.release()
        c2.release()
    finally:
        separate.close()
    pool = PagePool.for_model(model, nbytes=48 << 20)
    unified = manager_for(model, adapters, pool=pool)
    try:
        got, got_tokens, c1, c2 = run(unified, pool)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got_tokens, want_tokens)
        # every page of the pool is an adapter's or one of the two caches'
        assert_accounted(pool, unified, [c1, c2])
        by_owner = pool.stats()["by_owner"]
        assert set(by_owner) == {"kv", "lora"} and by_owner["kv"]["pages"] > 0
        c1.release()
        c2.release()
        assert set(pool.stats()["by_owner"]) == {"lora"}
    finally:
        unified.close()


def test_kv_takes_the_pages_of_adapters_outside_the_batch(served, shakespeare):
    model, tokenizer, adapters = served
    ids = prompt(tokenizer, shakespeare, 40)
    # how many KV pages the prompt and two steps take, and the logits, in a pool with room
    roomy = PagePool.for_model(model, nbytes=64 << 20)
    manager = manager_for(model, adapters, pool=roomy)
    try:
        cache = FastGenCache(model, tokenizer, pool=roomy)
        want = greedy(model, manager, ["a"], cache, ids, 2)
        kv_prompt = cache.stats()["pages"]
        cache.release()
        sizes = {n: adapter_pages(manager, n) for n in adapters}
    finally:
        manager.close()
    # adapters b, c, a resident (LRU order), and too few free pages for the prompt unless b goes
    pool = PagePool.for_model(model, num_pages=sizes["a"] + sizes["b"] + sizes["c"] + kv_prompt - 3)
    manager = manager_for(model, adapters, pool=pool)
    try:
        for name in ("b", "c", "a"):
            with manager.batch([name]):
                pass
        assert list(manager.store.resident) == ["b", "c", "a"] and pool.free_pages == kv_prompt - 3
        cache = FastGenCache(model, tokenizer, pool=pool)
        with manager.batch(["a"]):
            logits = step(model, cache, ids)
        assert list(manager.store.resident) == ["c", "a"]  # the least recently used one went
        assert manager.stats()["evictions"] == 1
        assert_accounted(pool, manager, [cache])
        # decode steps take more pages: c goes too once needed; the batch's adapter never does
        got = [logits]
        with manager.batch(["a"]):
            for _ in range(2):
                logits = step(model, cache, logits.argmax(-1, keepdim=True))
                got.append(logits)
        assert "a" in manager.store.resident
        torch.testing.assert_close(torch.stack(got), want, rtol=1e-5, atol=1e-5)
        assert_accounted(pool, manager, [cache])
        cache.release()
    finally:
        manager.close()


def test_batch_that_cannot_fit_raises_with_holds_and_needs_and_leaves_nothing(served, shakespeare):
    model, tokenizer, adapters = served
    ids = prompt(tokenizer, shakespeare, 40)
    probe = PagePool.for_model(model, nbytes=64 << 20)
    cache = FastGenCache(model, tokenizer, pool=probe)
    step(model, cache, ids)
    kv_prompt = cache.stats()["pages"]
    cache.release()
    manager = manager_for(model, adapters, pool=probe)
    sizes = {n: adapter_pages(manager, n) for n in adapters}
    manager.close()
    pool = PagePool.for_model(model, num_pages=sizes["a"] + sizes["c"] + kv_prompt // 2)
    manager = manager_for(model, adapters, pool=pool)
    try:
        cache = FastGenCache(model, tokenizer, pool=pool)
        # prompt compaction: the running batch's adapters a and c plus the prompt's KV do not fit
        with manager.batch(["a", "c"]):
            with pytest.raises(PoolExhaustedError, match=r"prompt of 40 tokens .* 'lora' holds "
                                                         rf"{sizes['a'] + sizes['c']} and needs") \
                    as err:
                step(model, cache, torch.cat([ids, ids]))
        e = err.value
        assert e.owner == "kv" and e.requested > 0
        assert e.held["lora"] == e.needed["lora"] == sizes["a"] + sizes["c"]
        assert e.needed["kv"] == e.held.get("kv", 0) + e.requested
        assert e.free_pages < e.requested and e.num_pages == pool.num_pages
        # nothing half-written: no KV page is left, both adapters are resident and work
        assert pool.used_bytes("kv") == 0 and cache.batch_size == 0
        assert sorted(manager.store.resident) == ["a", "c"]
        assert_accounted(pool, manager, [cache])
        # with c outside the batch its pages are reclaimed and the same prompt fits
        with manager.batch(["a"]):
            step(model, cache, ids)
        assert list(manager.store.resident) == ["a"] and cache.batch_size == 1
        assert_accounted(pool, manager, [cache])
        cache.release()
    finally:
        manager.close()


def test_decode_append_is_all_or_nothing(served, shakespeare):
    model, tokenizer, adapters = served
    ids = prompt(tokenizer, shakespeare, 30)
    pool = PagePool.for_model(model, nbytes=32 << 20)
    manager = manager_for(model, adapters, pool=pool)
    try:
        reference = FastGenCache(model, tokenizer, pool=pool)
        want = greedy(model, manager, ["a"], reference, ids, 14)
        reference.release()
        cache = FastGenCache(model, tokenizer, pool=pool)
        with manager.batch(["b"]):  # resident, outside the decoding batch: reclaimable
            pass
        got = []
        with manager.batch(["a"]):
            logits = step(model, cache, ids)
            got.append(logits)
            blockers = [pool.alloc(pool.free_pages, "other")]
            failures = 0
            while len(got) < 15:
                before, stats = snapshot(cache), pool.stats()
                token = logits.argmax(-1, keepdim=True)
                try:
                    logits = step(model, cache, token)
                except PoolExhaustedError as err:
                    failures += 1
                    # raised before the first layer appended: every layer and page as it was
                    assert_same_snapshot(before, snapshot(cache))
                    assert pool.stats() == stats
                    assert "nothing was appended" in str(err)
                    assert err.owner == "kv" and err.needed["lora"] == adapter_pages(manager, "a")
                    assert err.held["other"] == err.needed["other"] == pool.used_bytes("other") \
                        // pool.page_bytes
                    for blocker in blockers:  # room again: the same step runs and is right
                        pool.free(blocker)
                    blockers = []
                    logits = step(model, cache, token)
                got.append(logits)
                blockers.append(pool.alloc(pool.free_pages, "other"))
            # the first step short of pages took b's pages instead of failing, a later one failed
            assert "b" not in manager.store.resident and failures >= 1
        for blocker in blockers:
            pool.free(blocker)
        torch.testing.assert_close(torch.stack(got), want, rtol=1e-5, atol=1e-5)
        assert_accounted(pool, manager, [cache])
        cache.release()
    finally:
        manager.close()


def test_adapter_load_that_cannot_fit_changes_nothing(served, shakespeare):
    model, tokenizer, adapters = served
    ids = prompt(tokenizer, shakespeare, 30)
    probe = PagePool.for_model(model, nbytes=64 << 20)
    manager = manager_for(model, adapters, pool=probe)
    sizes = {n: adapter_pages(manager, n) for n in adapters}
    reference = FastGenCache(model, tokenizer, pool=probe)
    want = greedy(model, manager, ["a"], reference, ids, 2)
    kv = reference.stats()["pages"]
    reference.release()
    manager.close()
    pool = PagePool.for_model(model, num_pages=kv + sizes["a"] + sizes["b"] - 1 + 30)
    manager = manager_for(model, adapters, pool=pool)
    try:
        cache = FastGenCache(model, tokenizer, pool=pool)
        with manager.batch(["a"]):
            logits = step(model, cache, ids)
        blocker = pool.alloc(pool.free_pages - (sizes["b"] - 1), "other")
        before, stats = snapshot(cache), pool.stats()
        with pytest.raises(PoolExhaustedError, match="adapter 'b' needs") as err:
            with manager.batch(["a", "b"]):
                pass
        assert err.value.owner == "lora" and err.value.requested == sizes["b"]
        assert err.value.needed["kv"] == err.value.held["kv"] == cache.stats()["pages"]
        assert err.value.needed["lora"] == sizes["a"] + sizes["b"]
        # nothing half-loaded, no KV page touched, and the cache decodes on as before
        assert_same_snapshot(before, snapshot(cache))
        assert pool.stats() == stats and list(manager.store.resident) == ["a"]
        assert manager._active is None
        pool.free(blocker)
        got = [logits]
        with manager.batch(["a"]):
            for _ in range(2):
                logits = step(model, cache, logits.argmax(-1, keepdim=True))
                got.append(logits)
        torch.testing.assert_close(torch.stack(got), want, rtol=1e-5, atol=1e-5)
        cache.release()
    finally:
        manager.close()


# ---- a running batch -----------------------------------------------------------------------------

def test_join_and_leave_equal_each_sequence_alone(served, shakespeare):
    model, tokenizer, adapters = served
    requests = [  # (prompt, adapter, step it joins at, steps it decodes)
        (prompt(tokenizer, shakespeare, 33), "a", 0, 5),
        (prompt(tokenizer, shakespeare[3000:], 21), "b", 2, 6),
        (prompt(tokenizer, shakespeare[6000:], 52), None, 3, 3),  # longer than the batch so far
    ]
    pool = PagePool.for_model(model, nbytes=48 << 20)
    manager = manager_for(model, adapters, pool=pool)
    try:
        alone = []
        for ids, name, _, steps in requests:
            cache = FastGenCache(model, tokenizer, pool=pool)
            alone.append(greedy(model, manager, [name], cache, ids, steps))
            cache.release()
        cache = FastGenCache(model, tokenizer, pool=pool)
        running: list[int] = []  # request index of each sequence of the batch
        got = {i: [] for i in range(len(requests))}
        last = {}
        for t in range(12):
            for i, (ids, name, start, _) in enumerate(requests):
                if start == t:
                    with manager.batch([name], keep=[requests[j][1] for j in running]):
                        logits = cache.join(ids).logits[:, -1]
                    running.append(i)
                    got[i].append(logits[0])
                    last[i] = logits[0].argmax()
            for i in [i for i in running if len(got[i]) == requests[i][3] + 1]:
                cache.leave(running.index(i))
                running.remove(i)
            assert cache.batch_size == len(running)
            if not running:
                break
            tokens = torch.stack([last[i] for i in running])[:, None]
            with manager.batch([requests[i][1] for i in running]):
                logits = step(model, cache, tokens)
            for row, i in enumerate(running):
                got[i].append(logits[row])
                last[i] = logits[row].argmax()
            assert_accounted(pool, manager, [cache])
        for i, want in enumerate(alone):
            torch.testing.assert_close(torch.stack(got[i]), want[:, 0], rtol=1e-4, atol=1e-4)
        assert cache.batch_size == 0 and pool.used_bytes("kv") == 0
    finally:
        manager.close()


def test_join_profiles_with_the_batch_caches_own_options(smollm2, shakespeare):
    # join() builds a one-sequence sibling to profile the prompt: it must carry every FastGen
    # option of the batch's cache (it once dropped heavy_from, recovery_on, adaptive and
    # adaptive_floor, so a joined sequence got the defaults' policies).
    from fastllm.kv import cache_keyword
    model, tokenizer = smollm2
    ids = prompt(tokenizer, shakespeare, 96)
    options = dict(heavy_from="both", recovery_on="observed", adaptive=True, heavy_fit=True)
    joined = FastGenCache(model, tokenizer, **options)
    alone = FastGenCache(model, tokenizer, **options)
    defaults = FastGenCache(model, tokenizer)
    with torch.no_grad():
        joined.join(ids)
        model(ids, **{cache_keyword(model): alone}, use_cache=True)
        model(ids, **{cache_keyword(model): defaults}, use_cache=True)
    policies = lambda cache: cache.stats()["policies"]  # noqa: E731
    assert policies(joined) == policies(alone) != policies(defaults)
    for cache in (joined, alone, defaults):
        cache.release()


def test_join_that_does_not_fit_leaves_the_batch_as_it_was(smollm2, shakespeare):
    model, tokenizer = smollm2
    a, b = prompt(tokenizer, shakespeare, 24), prompt(tokenizer, shakespeare[3000:], 200)
    pool = PagePool.for_model(model, num_pages=400, target_modules=())
    cache = FastGenCache(model, tokenizer, pool=pool)
    reference = FastGenCache(model, tokenizer, pool=PagePool.for_model(model, num_pages=4000))
    first = cache.join(a).logits[:, -1]
    want = [reference.join(a).logits[:, -1]]
    before, stats = snapshot(cache), pool.stats()
    with pytest.raises(PoolExhaustedError, match="prompt of 200 tokens .* does not fit") as err:
        cache.join(b)
    assert err.value.owner == "kv"
    assert_same_snapshot(before, snapshot(cache))
    assert pool.stats() == stats and cache.batch_size == 1
    # the running sequence decodes on as if the join had never been tried
    got = [first]
    for _ in range(2):
        got.append(step(model, cache, got[-1].argmax(-1, keepdim=True)))
        want.append(step(model, reference, want[-1].argmax(-1, keepdim=True)))
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor \[1, L\]"):
        cache.join(torch.cat([a, a]))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        cache.join(a, attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="cache is set by join itself"):
        cache.join(a, cache=reference)
    with pytest.raises(ValueError, match=r"index must be an int in \[0, 1\)"):
        cache.leave(1)
    with pytest.raises(ValueError, match="new_tokens must be an int >= 1"):
        cache.position_ids(0)
    cache.leave(0)
    assert cache.batch_size == 0 and pool.used_pages == 0
    with pytest.raises(RuntimeError, match="holds no sequence"):
        cache.attention_mask()
    reference.release()
