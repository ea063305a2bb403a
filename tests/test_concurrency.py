"""Threads (issue 21): one thread runs the model (AdapterManager batches with a FastGenCache on the
same pool) while a loader thread loads, prefetches, replaces and unloads other adapters. The
model thread's logits equal a single-threaded run at every step, nothing raises but the refusals
the docs promise, and the pool's accounting is exact at the end. A second thread opening a batch
or calling the model inside another thread's batch is refused. A tiny random Llama; each stress
test runs for STRESS_SECONDS (bounded)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from test_faults import (VOCAB, StubTokenizer, adapter_state, assert_accounted,
                         assert_adapters_whole, forward, tiny_llama)

from fastllm.kv import FastGenCache
from fastllm.lora import AdapterManager
from fastllm.memory import PagePool

STRESS_SECONDS = 4.0
SERVED = {"s1": 2, "s2": 4}  # the model thread's adapters
LOADED = {f"x{i}": 1 + i % 8 for i in range(6)}  # the loader thread's


def setup(pool_pages=200):
    model = tiny_llama()
    pool = PagePool(pool_pages, 64, torch.float32)
    manager = AdapterManager(model, max_rank=8, pool=pool)
    states = {name: adapter_state(model, rank, seed=i) for i, (name, rank)
              in enumerate({**SERVED, **LOADED}.items())}
    for name, rank in SERVED.items():
        manager.load(name, states[name], {"r": rank, "lora_alpha": 2 * rank})
    return model, pool, manager, states


def serve(model, manager, pool, ids, steps):
    """Prefill then ``steps`` decode steps, a batch per step as a serving loop does."""
    cache = FastGenCache(model, StubTokenizer(), pool=pool, policy="h2o", budget=8)
    out = []
    with manager.batch(["s1", "s2"]):
        logits = forward(model, cache, ids)
    out.append(logits)
    for _ in range(steps):
        with manager.batch(["s1", "s2"], keep=["s1"]):
            logits = forward(model, cache, logits.argmax(-1, keepdim=True))
        out.append(logits)
    cache.release()
    return torch.stack(out)


class Loader(threading.Thread):
    """Loads, prefetches, replaces and unloads its own adapters until told to stop."""

    def __init__(self, manager, states, stop):
        super().__init__(daemon=True)
        self.manager, self.states, self.stop = manager, states, stop
        self.errors, self.cycles = [], 0

    def run(self):
        try:
            while not self.stop.is_set():
                for name, rank in LOADED.items():
                    self.manager.load(name, self.states[name], {"r": rank, "lora_alpha": rank},
                                      replace=name in self.manager.adapters)
                self.manager.prefetch(list(LOADED)[::2])
                self.manager.load("x0", self.states["x0"], {"r": 1, "lora_alpha": 3},
                                  replace=True)
                self.manager.stats()
                for name in LOADED:
                    self.manager.unload(name)
                self.cycles += 1
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.errors.append(err)


def test_loader_thread_beside_a_serving_thread_changes_no_result():
    torch.set_num_threads(1)
    model, pool, manager, states = setup()
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    reference = serve(model, manager, pool, ids, 6)
    stop = threading.Event()
    loader = Loader(manager, states, stop)
    loader.start()
    runs = 0
    deadline = time.monotonic() + STRESS_SECONDS
    try:
        while time.monotonic() < deadline and not loader.errors:
            assert torch.equal(serve(model, manager, pool, ids, 6), reference), f"run {runs}"
            runs += 1
    finally:
        stop.set()
        loader.join(timeout=30)
    assert not loader.is_alive()
    assert not loader.errors, loader.errors
    print(f"\nconcurrency: {runs} serving runs beside {loader.cycles} loader cycles")
    assert runs >= 3 and loader.cycles >= 3
    assert manager.adapters == sorted(SERVED)
    assert_accounted(pool, manager=manager)
    assert_adapters_whole(manager)
    manager.close()
    assert pool.used_pages == 0


def test_two_threads_hammering_one_pool_keep_its_accounting():
    pool = PagePool(64, 16, torch.float32)
    errors = []
    barrier = threading.Barrier(2)

    def worker(owner, seed):
        generator = torch.Generator().manual_seed(seed)
        held = []
        try:
            barrier.wait()
            deadline = time.monotonic() + STRESS_SECONDS / 2
            while time.monotonic() < deadline:
                n = int(torch.randint(1, 6, (1,), generator=generator))
                if pool.free_pages >= 12 and (len(held) < 6 or n % 2):
                    try:
                        held.append(pool.alloc(n, owner))
                    except Exception:  # a full pool: the other thread took the pages
                        pass
                elif held:
                    pool.free(held.pop(0))
                for ids in held:
                    assert all(pool.owner_of(int(i)) == owner for i in ids)
            for ids in held:
                pool.free(ids)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(f"t{i}", i)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    assert pool.used_pages == 0 and pool.free_pages == 64 and pool.stats()["by_owner"] == {}
    assert sorted(pool._free_stack.tolist()) == list(range(64))


def test_a_second_thread_is_refused_inside_a_batch():
    model, pool, manager, _ = setup()
    ids = torch.randint(2, VOCAB, (2, 4))
    results = {}

    def other_thread():
        for what, call in (("batch", lambda: manager.batch(["s1"]).__enter__()),
                           ("model", lambda: forward(model, None, ids))):
            try:
                call()
                results[what] = None
            except RuntimeError as err:
                results[what] = str(err)

    with manager.batch(["s1", None]):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join(timeout=30)
        forward(model, None, ids)  # the batch's own thread still runs the model
    assert "a batch is already active in thread" in results["batch"]
    assert "one thread runs the model" in results["model"]
    # after the batch the other thread may open one
    thread = threading.Thread(target=lambda: results.update(after=forward(model, None, ids)))
    thread.start()
    thread.join(timeout=30)
    assert results["after"].shape == (2, VOCAB)
    manager.close()


def test_a_loader_cannot_replace_or_unload_an_adapter_of_the_running_batch():
    model, pool, manager, states = setup()
    errors = []
    with manager.batch(["s1"], keep=["s2"]):
        def change():
            for call in (lambda: manager.load("s1", states["s1"], {"r": 2, "lora_alpha": 1},
                                              replace=True),
                         lambda: manager.unload("s2")):
                try:
                    call()
                except RuntimeError as err:
                    errors.append(str(err))
        thread = threading.Thread(target=change)
        thread.start()
        thread.join(timeout=30)
    assert len(errors) == 2 and all("running batch" in e for e in errors), errors
    assert manager.adapters == ["s1", "s2"]
    manager.load("s1", states["s1"], {"r": 2, "lora_alpha": 1}, replace=True)  # allowed now
    manager.close()


@pytest.fixture(autouse=True)
def _threads_back():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
