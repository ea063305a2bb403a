"""Fault injection (issue 21): the page pool made to fail (``PagePool.fail_after``) at every
allocation point of a FastGenCache generate (prompt compaction: one allocation per layer; decode
append: one per step that needs pages), of an AdapterManager serving loop (adapter load, load
after eviction, prefetch) and of both on one shared pool. At every point: the error is the
injected one, the pool's accounting equals the pages the caches and adapters actually hold, no
cache or adapter is half-written, and running the failed step again continues exactly as a run
without faults (same logits, bit for bit). A tiny random Llama (no download) for the sweeps; the
real SmolLM2 for the shared pool."""

from __future__ import annotations

import gc

import pytest
import torch

from helpers import cache_arg

transformers = pytest.importorskip("transformers")

from fastllm.kv import FastGenCache  # noqa: E402
from fastllm.lora import AdapterManager  # noqa: E402
from fastllm.memory import InjectedFault, PagePool, PoolExhaustedError  # noqa: E402

VOCAB = 97
# Generic errors a pool user might meet at an allocation besides a full pool (an allocator's own
# failure); they must leave the same consistent state.
OTHER_ERROR = RuntimeError("simulated allocator failure")


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


def adapter_state(model, rank, seed):
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "v_proj", "down_proj")) and hasattr(module, "in_features"):
            prefix = f"base_model.model.{name}"
            state[f"{prefix}.lora_A.weight"] = 0.1 * torch.randn(rank, module.in_features,
                                                                 generator=generator)
            state[f"{prefix}.lora_B.weight"] = 0.1 * torch.randn(module.out_features, rank,
                                                                 generator=generator)
    return state


def forward(model, cache, tokens):
    """One forward on top of ``cache`` (None: no cache); the last position's logits."""
    kwargs = {}
    if cache is not None:
        kwargs = cache_arg(cache)
        kwargs["use_cache"] = True
        if cache.batch_size:
            n = tokens.shape[1]
            kwargs.update(attention_mask=cache.attention_mask(n),
                          position_ids=cache.position_ids(n))
    with torch.no_grad():
        return model(tokens, **kwargs).logits[:, -1]


# ---- what "consistent" means ---------------------------------------------------------------------

def kv_pages(cache) -> list[int]:
    return [page for layer in cache.layers if layer.heads is not None
            for per_cache in layer.heads.pages for page in per_cache]


def assert_accounted(pool, caches=(), manager=None):
    """The pool's owner table and per-owner counts equal the pages the users hold, page by page,
    and no page is held twice."""
    owners = {}
    for page in range(pool.num_pages):
        owner = pool.owner_of(page)
        if owner is not None:
            owners.setdefault(owner, set()).add(page)
    held_kv = [p for c in caches for p in kv_pages(c)]
    held_lora = [] if manager is None else [
        int(p) for r in manager.store.resident.values() for p in r.page_ids.tolist()]
    assert len(set(held_kv)) == len(held_kv) and len(set(held_lora)) == len(held_lora)
    assert owners.get("kv", set()) == set(held_kv)
    assert owners.get("lora", set()) == set(held_lora)
    by_owner = pool.stats()["by_owner"]
    assert {k: v["pages"] for k, v in by_owner.items()} == \
        {k: len(v) for k, v in owners.items() if v}
    assert pool.used_pages == len(held_kv) + len(held_lora)
    assert pool.free_pages + pool.used_pages == pool.num_pages


def assert_adapters_whole(manager):
    """Every resident adapter's pages hold exactly its host copy (nothing half-loaded), and no
    batch is left open."""
    store = manager.store
    assert manager._active is None and manager._opening is None and store._in_use == set()
    page = store.pool.page_size
    for name, resident in store.resident.items():
        host = store.host[name]
        assert resident.page_ids.numel() == host.buffer.shape[0]
        got = store.pool.gather(store.pool.slots(resident.page_ids, page), page)
        used = host.plan.used  # the tail of the last page is never written
        assert torch.equal(got.reshape(-1)[:used], host.buffer.reshape(-1)[:used]), name


def assert_cache_coherent(cache):
    """Host mirror and device lengths agree, and every cache's entries fit its pages."""
    for layer in cache.layers:
        heads = layer.heads
        if heads is None:
            assert layer.seen == 0 or cache.layers[0].heads is not None
            continue
        lengths = heads.lengths.cpu().numpy()
        assert (heads.npages == [len(p) for p in heads.pages]).all()
        assert (-(-lengths // heads.page_rows) <= heads.npages).all()


# ---- the resilient runner ------------------------------------------------------------------------

def run_resilient(steps, check, fault=None):
    """Run ``steps`` (callables, each all-or-nothing by contract) in order; when one raises,
    ``check(err, step_index)`` the state and run that step again (the fault is one-shot).
    Returns the steps' results and the (step index, error) pairs."""
    results, failures = [], []
    for i, run in enumerate(steps):
        try:
            results.append(run())
        except (PoolExhaustedError, RuntimeError) as err:
            if fault is None or not fault.fired:
                raise
            failures.append((i, err))
            check(err, i)
            results.append(run())
    return results, failures


def sweep(pool, make, error=None, after_reclaim=False):
    """Probe the scenario ``make()`` -> (steps, check, finish) for its allocation points, then
    fail at each in turn. Returns (points, log of the probe's allocations, how many of them
    asked the reclaimers)."""
    steps, _, _ = make()
    with pool.fail_after(10 ** 9) as probe:
        reference, _ = run_resilient(steps, None)
    assert not probe.fired and probe.allocations > 0
    for n in range(probe.allocations):
        steps, check, finish = make()
        with pool.fail_after(n, error, after_reclaim=after_reclaim) as fault:
            results, failures = run_resilient(steps, check, fault)
        assert fault.fired, f"allocation {n + 1} of {probe.allocations} was never reached"
        assert len(failures) <= 1
        for got, want in zip(results, reference):
            assert torch.equal(got, want), f"fault at allocation {n + 1}: results differ"
        finish()
    return probe.allocations, probe.log, probe.short


def report(what, points, log, short=None):
    # The README's reliability figures are these lines (pytest -s tests/test_faults.py).
    owners = {}
    for owner, _ in log:
        owners[owner] = owners.get(owner, 0) + 1
    asked = "" if short is None else f", {short} asked the reclaimers"
    print(f"\nfault points, {what}: {points} ({owners}{asked})")


def check_error(err, error):
    if error is None:
        assert isinstance(err, InjectedFault), repr(err)
        assert "injected fault" in str(err) and err.requested and err.owner in ("kv", "lora")
    else:
        assert err is error or err.__cause__ is error or error in (err.args or ()), repr(err)


def test_the_hook_fails_once_counts_only_real_allocations_and_checks_its_arguments():
    pool = PagePool(8, 4, torch.float32)
    with pool.fail_after(1) as fault:
        first = pool.alloc(2, "x")
        pool.alloc(0, "x")  # zero pages: no pool can fail it, not counted
        with pytest.raises(InjectedFault, match=r"fail_after\(1\)\) at allocation 2: 'y' asked "
                                                r"for 3 pages \(6 of 8 free\)") as caught:
            pool.alloc(3, "y")
        assert caught.value.requested == 3 and caught.value.held == {"x": 2}
        assert pool.used_pages == 2  # the failed allocation took nothing
        second = pool.alloc(3, "y")  # one fault per block
        with pytest.raises(RuntimeError, match="already armed"):
            pool.fail_after(0).__enter__()
    assert fault.fired and fault.allocations == 3 and fault.log == [("x", 2), ("y", 3), ("y", 3)]
    assert pool._fault is None
    boom = OSError("device lost")
    with pool.fail_after(0, boom), pytest.raises(OSError, match="device lost"):
        pool.alloc(1, "x")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=rf"n must be a non-negative int, got {bad!r}"):
            pool.fail_after(bad)
    with pytest.raises(TypeError, match="error must be an exception instance or None, got type"):
        pool.fail_after(0, OSError)
    with pytest.raises(TypeError, match="after_reclaim must be a bool, got 1"):
        pool.fail_after(0, after_reclaim=1)
    pool.free(first)
    pool.free(second)
    assert pool.used_pages == 0


# ---- FastGenCache --------------------------------------------------------------------------------

@pytest.mark.parametrize("error", [None, OTHER_ERROR], ids=["injected", "other"])
def test_fastgen_steps_survive_a_fault_at_every_allocation(error):
    model = tiny_llama()
    ids = torch.randint(2, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    pool = PagePool(96, 4 * 16, torch.float32)

    def make():
        cache = FastGenCache(model, StubTokenizer(), pool=pool, budget=0.5)
        state = {}

        def prefill():
            state["logits"] = forward(model, cache, ids)
            return state["logits"]

        def decode():
            state["logits"] = forward(model, cache, state["logits"].argmax(-1, keepdim=True))
            return state["logits"]

        def check(err, i):
            check_error(err, error)
            assert_accounted(pool, [cache])
            assert_cache_coherent(cache)
            if i == 0:  # a failed prompt releases the cache whole
                assert kv_pages(cache) == [] and cache.layers[0].seen == 0

        def finish():
            assert_accounted(pool, [cache])
            cache.release()
            assert pool.used_pages == 0

        return [prefill] + [decode] * 9, check, finish

    points, log, _ = sweep(pool, make, error)
    report("FastGenCache steps", points, log)
    # prompt compaction takes one allocation per layer; the decode appends need at least one
    assert points > model.config.num_hidden_layers
    assert {owner for owner, _ in log} == {"kv"}


def test_fastgen_generate_fails_clearly_and_the_next_generate_works():
    model = tiny_llama()
    ids = torch.randint(2, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    pool = PagePool(96, 4 * 16, torch.float32)

    def generate(cache):
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                  do_sample=False, pad_token_id=0, **cache_arg(cache))

    cache = FastGenCache(model, StubTokenizer(), pool=pool, policy="h2o", budget=8)
    with pool.fail_after(10 ** 9) as probe:
        reference = generate(cache)
    cache.release()
    report("FastGenCache generate", probe.allocations, probe.log)
    for n in range(probe.allocations):
        cache = FastGenCache(model, StubTokenizer(), pool=pool, policy="h2o", budget=8)
        with pool.fail_after(n) as fault, pytest.raises(PoolExhaustedError) as caught:
            generate(cache)
        assert fault.fired and isinstance(caught.value.__cause__ or caught.value, InjectedFault)
        assert "injected fault" in str(caught.value)
        assert_accounted(pool, [cache])
        assert_cache_coherent(cache)
        cache.release()
        assert pool.used_pages == 0
        # the next call, on the same cache object and on a new one
        assert torch.equal(generate(cache), reference)
        cache.release()
        assert torch.equal(generate(FastGenCache(model, StubTokenizer(), pool=pool,
                                                 policy="h2o", budget=8)), reference)
        gc.collect()  # the unnamed cache's __del__ gives its pages back
        assert pool.used_pages == 0
    # one per layer for the prompt, then decode appends (8 kept entries + 1 crosses a page)
    assert probe.allocations > model.config.num_hidden_layers + 1


# ---- AdapterManager ------------------------------------------------------------------------------

RANKS = {"a": 2, "b": 8, "c": 4, "d": 8, "e": 1}


def adapter_scenario(model, manager, ids):
    """A serving loop's adapter traffic: loads into free pages, loads that evict, prefetches
    (one that fits, one that stops for lack of room) and hits."""
    def batch(names):
        def run():
            with manager.batch(names):
                return forward(model, None, ids)
        return run

    def prefetch(names):
        def run():
            manager.prefetch(names)
            return torch.zeros(())
        return run

    return [batch(["a", None, "b"]), prefetch(["c"]), batch(["c", "a", "c"]),
            batch(["d", "e", None]), prefetch(["a", "b", "c"]), batch(["b", "b", "a"]),
            batch(["e", "d", "c"])]


def new_manager(model, pool):
    manager = AdapterManager(model, max_rank=8, pool=pool)
    for name, rank in RANKS.items():
        manager.load(name, adapter_state(model, rank, seed=rank * 10 + len(name)),
                     {"r": rank, "lora_alpha": 2 * rank})
    return manager


@pytest.mark.parametrize("error", [None, OTHER_ERROR], ids=["injected", "other"])
def test_adapter_batches_survive_a_fault_at_every_allocation(error):
    model = tiny_llama()
    ids = torch.randint(2, VOCAB, (3, 5), generator=torch.Generator().manual_seed(3))
    # adapters of 7 (rank 1) to 52 (rank 8) pages: room for about three, so batches evict
    pool = PagePool(96, 64, torch.float32)
    managers = []

    def make():
        if managers:
            managers.pop().close()
        manager = new_manager(model, pool)
        managers.append(manager)

        def check(err, i):
            check_error(err, error)
            assert_accounted(pool, manager=manager)
            assert_adapters_whole(manager)
            assert manager.adapters == sorted(RANKS)  # the registry is untouched

        def finish():
            assert_accounted(pool, manager=manager)
            assert_adapters_whole(manager)

        return adapter_scenario(model, manager, ids), check, finish

    points, log, _ = sweep(pool, make, error)
    report("AdapterManager batches", points, log)
    manager = managers.pop()
    # the scenario did load, evict and prefetch (so those allocation points were among the ones
    # failed)
    stats = manager.stats()
    assert stats["evictions"] > 0 and stats["misses"] > 0 and stats["hits"] > 0
    assert {owner for owner, _ in log} == {"lora"} and points >= 6
    manager.close()


def test_prefetch_that_hits_a_full_pool_stops_quietly_and_leaves_nothing_half_loaded():
    model = tiny_llama()
    pool = PagePool(96, 64, torch.float32)
    manager = new_manager(model, pool)
    with pool.fail_after(1) as fault:
        manager.prefetch(["a", "b", "c"])  # the second load fails: it stops, no error
    assert fault.fired and sorted(manager.store.resident) == ["a"]
    assert_accounted(pool, manager=manager)
    assert_adapters_whole(manager)
    manager.close()


def test_prefetch_keeps_the_requested_adapters_already_resident():
    # Found by the sweep above: a prefetch evicted an adapter it was asked to prefetch (one
    # already resident) to load another of the same request.
    model = tiny_llama()
    pool = PagePool(96, 64, torch.float32)
    manager = new_manager(model, pool)
    manager.prefetch(["a", "d", "e"])  # 14 + 52 + 8 pages
    manager.prefetch(["a", "b"])  # b (52) needs d's pages, not a's
    assert sorted(manager.store.resident) == ["a", "b", "e"]
    manager.close()


def test_close_gives_the_adapters_pages_back_to_a_shared_pool():
    # Found by the sweep: a closed manager kept its adapters' pages in the shared pool, where no
    # later manager (same owner tag) could reclaim them.
    model = tiny_llama()
    pool = PagePool(96, 64, torch.float32)
    manager = new_manager(model, pool)
    with manager.batch(["b", "e"]):
        with pytest.raises(RuntimeError, match="a batch is already active"):
            manager.close()
    assert pool.used_pages == 52 + 8
    manager.close()
    assert pool.used_pages == 0 and pool.reclaimable_pages() == {}
    manager = new_manager(model, pool)
    with manager.batch(["b", "c"]):
        assert pool.used_pages == 52 + 26
    manager.close()


# ---- both on one pool ----------------------------------------------------------------------------

def shared_scenario(model, manager, cache, ids, names, steps):
    """Prompt and decode steps under ``names``, with another batch's loads (evicting) between
    two steps, then a prefetch that fills the pool with adapters outside the batch: the next
    KV appends must take their pages (the reclaimer)."""
    state = {}

    def prefill():
        with manager.batch(names):
            state["logits"] = forward(model, cache, ids)
        return state["logits"]

    def decode():
        with manager.batch(names):
            state["logits"] = forward(model, cache, state["logits"].argmax(-1, keepdim=True))
        return state["logits"]

    def switch():  # a batch of other adapters between steps: loads and evictions
        manager.prefetch(["d", "e"])
        with manager.batch(["d", "e"]):
            return forward(model, None, ids[:, :3])

    def fill():
        manager.prefetch(["b", "c", "d"])
        return torch.zeros(())

    return [prefill, decode, switch, decode, fill] + [decode] * steps


@pytest.mark.parametrize("after_reclaim", [False, True], ids=["at-start", "after-reclaim"])
def test_shared_pool_survives_a_fault_at_every_allocation(after_reclaim):
    model = tiny_llama()
    ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    # 64 elements: 4 KV entries or one adapter row; the batch's adapters (66 pages) and the KV
    # caches (about 24) nearly fill it, so the other batch's loads evict, and after the filling
    # prefetch a KV append takes an unused adapter's pages
    pool = PagePool(110, 64, torch.float32)
    managers = []

    def make():
        if managers:
            old_manager, old_cache = managers.pop()
            old_cache.release()
            old_manager.close()
        manager = new_manager(model, pool)
        cache = FastGenCache(model, StubTokenizer(), pool=pool, policy="h2o", budget=8)
        managers.append((manager, cache))

        def check(err, i):
            check_error(err, None)
            assert_accounted(pool, [cache], manager)
            assert_adapters_whole(manager)
            assert_cache_coherent(cache)

        def finish():
            assert_accounted(pool, [cache], manager)

        return shared_scenario(model, manager, cache, ids, ["a", "b"], 8), check, finish

    points, log, short = sweep(pool, make, after_reclaim=after_reclaim)
    report(f"shared pool{', after reclaiming' if after_reclaim else ''}", points, log, short)
    assert {owner for owner, _ in log} == {"kv", "lora"} and points >= 8
    # some allocations found the pool full and took adapter pages (KV appends) or evicted
    # (adapter loads): with after_reclaim those are failed after the eviction
    assert short > 0
    manager, cache = managers.pop()
    cache.release()
    manager.close()


@pytest.mark.real_model
@pytest.mark.slow
def test_shared_pool_on_smollm2_survives_a_fault_at_every_allocation(smollm2, shakespeare):
    import copy
    base, tokenizer = smollm2
    model = copy.deepcopy(base)
    ids = tokenizer(shakespeare[:2000], return_tensors="pt").input_ids[:, :24]
    pool = PagePool.for_model(model, nbytes=24 << 20)
    state_a = adapter_state(model, 4, seed=1)
    state_b = adapter_state(model, 8, seed=2)
    manager = AdapterManager(model, max_rank=8, pool=pool)
    manager.load("a", state_a, {"r": 4, "lora_alpha": 8})
    manager.load("b", state_b, {"r": 8, "lora_alpha": 8})
    caches = []

    def make():
        if caches:
            caches.pop().release()
        for name in list(manager.store.resident):  # each run starts with nothing resident
            manager.store._evict(name)
        cache = FastGenCache(model, tokenizer, pool=pool)
        caches.append(cache)
        state = {}

        def prefill():
            with manager.batch(["a"]):
                state["logits"] = forward(model, cache, ids)
            return state["logits"]

        def decode():
            with manager.batch(["a"], keep=["b"]):
                state["logits"] = forward(model, cache, state["logits"].argmax(-1, keepdim=True))
            return state["logits"]

        def other():
            with manager.batch(["b"]):
                return forward(model, None, ids[:, :4])

        def check(err, i):
            check_error(err, None)
            assert_accounted(pool, [cache], manager)
            assert_adapters_whole(manager)
            assert_cache_coherent(cache)

        def finish():
            assert_accounted(pool, [cache], manager)

        return [prefill, decode, other, decode], check, finish

    points, log, _ = sweep(pool, make)
    report("shared pool, SmolLM2", points, log)
    assert points >= model.config.num_hidden_layers + 2
    caches.pop().release()
    manager.close()
    assert pool.used_pages == 0
