"""FastGenCache's GPU path without host synchronisation (issue 13): decode steps on fake CUDA
tensors (they raise on any read of device data), the host mirror of the cache lengths against the
device's, index errors reported by the CUDA kernels, and a decode step in a CUDA graph.

A small random-weight Llama and a stub tokenizer: nothing to download, runs anywhere."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    FakeTensor,
    FakeTensorMode,
)
from torch.utils._python_dispatch import TorchDispatchMode

import fastllm
import fastllm.ops as ops
from fastllm._reference import kv_evict_round_reference, kv_ragged_decode_reference
from fastllm.kv import FastGenCache
from fastllm.kv.decode import _cpu_decode_splits, _decode_work
from fastllm.kv.storage import _HeadCaches
from helpers import cache_arg

transformers = pytest.importorskip("transformers")

VOCAB = 97


class StubTokenizer:
    """What FastGenCache asks of a tokenizer: ids 0 and 1 are special, every id that is a multiple
    of 5 decodes to punctuation."""

    all_special_ids = [0, 1]

    def __len__(self):
        return VOCAB

    def batch_decode(self, ids):
        return ["." if i[0] % 5 == 0 else f" w{i[0]}" for i in ids]


def tiny_llama(device="cpu"):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    # Sharper attention than the default init's near-uniform one, so FastGen's heads differ.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model.to(device)


# Per policy: FastGenCache arguments. "fastgen" with a low recovery gives heads that keep special
# and punctuation tokens with no local window, whose length depends on each decode token's class:
# the case where the host's mirror must wait for the device.
POLICIES = {
    "fastgen": dict(policy="fastgen", recovery=0.3, locality=0.1, frequency=0.1),
    "h2o": dict(policy="h2o", budget=12),
    "streaming": dict(policy="streaming", budget=10, sinks=2),
    "full": dict(policy="full"),
}


def prompt_batch(lengths, generator=None):
    """Left-padded prompts of the given lengths: ids [B, L] and the 0/1 mask."""
    width = max(lengths)
    ids = torch.randint(2, VOCAB, (len(lengths), width), generator=generator)
    ids[:, 0] = 1
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, width - n:] = 1
        ids[i, width - n] = 1
    return ids, mask


def prefilled(policy, lengths=(40, 31), page_rows=4, device="cpu"):
    model = tiny_llama(device)
    cache = FastGenCache(model, StubTokenizer(), page_rows=page_rows, max_tokens=256,
                         **POLICIES[policy])
    ids, mask = prompt_batch(lengths)
    with torch.no_grad():
        model(ids.to(device), attention_mask=mask.to(device), **cache_arg(cache),
              use_cache=True)
    return model, cache, mask


def step_tokens(steps, batch, generator=None):
    return torch.randint(2, VOCAB, (steps, batch, 1), generator=generator)


def move_state(cache, device):
    """Move a prefilled cache's device state (the pool and each layer's bookkeeping) to
    ``device``; the host state (pages, mirror, token classes) stays where it is."""
    cache.pool.storage = cache.pool.storage.to(device)
    cache.pool.device = cache.pool.storage.device
    for layer in cache.layers:
        layer.heads.device = cache.pool.device
        for name in _HeadCaches.DEVICE_TENSORS:
            setattr(layer.heads, name, getattr(layer.heads, name).to(device))
    cache._class_tables.clear()


class DeviceToHostCopy(RuntimeError):
    pass


class NoDeviceToHost(TorchDispatchMode):
    """Fails on any copy of a CUDA tensor to the host. A fake tensor raises when its data is read
    (``.item()``, ``.tolist()``); this also catches a ``.cpu()`` whose result is never read, which
    would still stop a real GPU."""

    COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default,
              torch.ops.aten.copy.default, torch.ops.aten._copy_from.default)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.COPIES:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            out = func(*args, **kwargs)
            dst = out if func is not torch.ops.aten.copy_.default else args[0]
            if dst.device.type == "cpu" and any(t.device.type == "cuda" for t in tensors):
                raise DeviceToHostCopy(f"{func} copies a CUDA tensor to the host")
            return out
        return func(*args, **kwargs)


def fake_decode(policy, steps=10):
    """Prefill for real on the CPU, then run ``steps`` decode steps with the model and the cache
    state as fake CUDA tensors, failing on any read or host copy of device data. Returns the
    cache and the last logits."""
    model, cache, mask = prefilled(policy)
    tokens = step_tokens(steps, mask.shape[0])
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        model.to("cuda")
        move_state(cache, "cuda")
        for t in range(steps):
            mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], dim=1)
            ids, step_mask = tokens[t].to("cuda"), mask.to("cuda")
            with NoDeviceToHost():
                logits = model(ids, attention_mask=step_mask, **cache_arg(cache),
                               use_cache=True).logits
    return cache, logits


# ---- (1) decode steps read no device data --------------------------------------------------------

@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_decode_steps_on_fake_cuda_read_no_device_data(policy):
    steps = 10
    cache, logits = fake_decode(policy, steps)
    assert isinstance(logits, FakeTensor) and logits.device.type == "cuda"
    assert logits.shape == (2, 1, VOCAB)
    prompt = cache.layers[0].prompt_valid.shape[1]
    for layer in cache.layers:
        heads = layer.heads
        assert layer.seen == prompt + steps
        assert isinstance(heads.lengths, FakeTensor) and isinstance(heads.table, FakeTensor)
        # The host allocated pages from its mirror alone: enough for every cache's bound.
        bound = heads.bound(layer.seen)
        assert (heads.npages * cache.page_rows >= bound).all()
        assert heads.npages.tolist() == [len(p) for p in heads.pages]
        # The attention ran on a work list planned from the mirror's bounds.
        work = layer.decode_work
        assert work is not None and (bound - work.cover).max() <= work.chunk // 2
        assert isinstance(layer.decode_work.work, FakeTensor)
        if policy == "fastgen":
            # heads keeping punctuation with no window wait for the decode tokens' classes,
            # which never arrive from fake tensors: their mirror stays an upper bound
            assert heads.h_dep.any()
            assert (heads.m_seen[heads.h_dep & (heads.h_window == 0)] == prompt).all()
        else:  # no policy reads classes: the mirror is exact without the device
            assert (heads.m_seen == layer.seen).all()
    assert cache.pool.used_pages == sum(len(p) for layer in cache.layers for p in layer.heads.pages)


@pytest.mark.parametrize("read", ["item", "tolist", "int", "cpu", "to_cpu", "copy_to_host"])
def test_fake_decode_would_catch_a_device_read(monkeypatch, read):
    # The proof above is only as good as its ability to fail: a decode step that reads device
    # data or copies it to the host (here injected into the step) must raise.
    original = _HeadCaches.decode_step

    def reading(self, *args, **kwargs):
        if read == "item":
            self.lengths.max().item()
        elif read == "tolist":
            self.lengths.tolist()
        elif read == "int":
            int(self.lengths[0])
        elif read == "cpu":
            self.lengths.cpu()
        elif read == "to_cpu":
            self.score.to("cpu", non_blocking=True)
        else:
            torch.empty(self.lengths.shape, dtype=self.lengths.dtype).copy_(self.lengths)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(_HeadCaches, "decode_step", reading)
    with pytest.raises((DataDependentOutputException, DeviceToHostCopy)):
        fake_decode("h2o", steps=1)


# ---- (2) the host mirror equals the device lengths -----------------------------------------------

def test_decode_work_is_replanned_only_when_a_cache_outgrows_it():
    class Layer:
        decode_work = None

    layer, bounds = Layer(), np.array([100, 1000, 64, 3000], dtype=np.int64)
    plans = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        for step in range(300):  # every cache grows by one entry per step
            splits, work = _decode_work(layer, int((bounds + step).max()), lambda: bounds + step,
                                        torch.device("cuda"))
            assert splits == 1 and isinstance(work, FakeTensor)
            if not plans or plans[-1] is not layer.decode_work:
                plans.append(layer.decode_work)
            # no cache's last item longer than 1.5 chunks
            assert (bounds + step - layer.decode_work.cover).max() <= layer.decode_work.chunk // 2
    # a 64-entry chunk: after a replan, no cache outgrows its items by half a chunk for 32
    # steps, whatever the number of caches
    assert plans[-1].chunk == 64 and 300 // 64 <= len(plans) <= 300 // 32 + 1
    layer.heads = type("Heads", (), {"pages": [[]] * 4})()
    splits, work = _decode_work(layer, 3000, lambda: bounds, torch.device("cpu"))
    assert work is None and splits == _cpu_decode_splits(3000, 4)  # even splits on the CPU


def test_cpu_decode_splits_share_the_threads_evenly(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert _cpu_decode_splits(708, 3) == 4  # one sequence's 3 KV heads: 12 tasks for 2 threads
    assert _cpu_decode_splits(100, 3) == 1  # no split under 64 entries
    assert _cpu_decode_splits(10**6, 1) == 12
    assert _cpu_decode_splits(5000, 96) == 1  # a batch brings tasks enough
    assert _cpu_decode_splits(0, 3) == 1


def recount_evictable(heads, seen):
    """Evictable entries per cache from the device state (what kv_evict_round counts)."""
    lengths = heads.lengths.cpu().numpy()
    newest = seen - 1 - heads.h_offset
    keep = (heads.flags.cpu().numpy() & 8) != 0
    out = (~keep) & (newest[:, None] - heads.pos.cpu().numpy() >= heads.h_window[:, None])
    return (out & (np.arange(heads.pos.shape[1]) < lengths[:, None])).sum(1)


def run_steps(policy, steps, delay=0, check=None):
    model, cache, mask = prefilled(policy)
    cache._class_log.delay = delay
    tokens = step_tokens(steps, mask.shape[0], torch.Generator().manual_seed(1))
    out = []
    with torch.no_grad():
        for t in range(steps):
            mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], dim=1)
            out.append(model(tokens[t], attention_mask=mask, **cache_arg(cache),
                             use_cache=True).logits)
            if check is not None:
                check(cache)
    return cache, torch.cat(out, 1)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_host_mirror_equals_device_lengths_on_cpu(policy):
    def exact(cache):
        for layer in cache.layers:
            heads = layer.heads
            lengths = heads.lengths.numpy()
            assert (heads.m_seen == layer.seen).all()
            np.testing.assert_array_equal(heads.m_len, lengths)
            np.testing.assert_array_equal(heads.m_evictable, recount_evictable(heads, layer.seen))
            # exactly the pages the entries fill, as before the mirror existed
            np.testing.assert_array_equal(heads.npages, -(-lengths // cache.page_rows))

    cache, _ = run_steps(policy, 30, check=exact)
    layer = cache.layers[1]
    real = layer.seen - layer.heads.h_offset
    if policy == "full":
        np.testing.assert_array_equal(layer.heads.m_len, real)
    else:  # the policies really evicted during the steps
        assert (layer.heads.m_len < real).all()
    stats = cache.stats()
    assert stats["kept_bytes"] == cache.pool.used_bytes("kv")


@pytest.mark.parametrize("delay", [1, 4])
def test_host_mirror_with_classes_in_flight_bounds_then_catches_up(delay):
    # As on a GPU, the decode tokens' classes reach the host `delay` steps late: meanwhile the
    # mirror bounds every length and holds enough pages; the device computes exactly what it
    # computes when the host knows everything at once.
    def bounded(cache):
        for layer in cache.layers:
            heads = layer.heads
            lengths = heads.lengths.numpy()
            assert (heads.bound(layer.seen) >= lengths).all()
            assert (heads.npages * cache.page_rows >= lengths).all()
            assert (heads.m_seen >= layer.seen - delay).all()

    lagged, got = run_steps("fastgen", 30, delay=delay, check=bounded)
    prompt_only, want = run_steps("fastgen", 30)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    stats = lagged.stats()  # settles: the mirror is exact again and extra pages are back
    assert stats == {**prompt_only.stats(), "profile_seconds": stats["profile_seconds"]}
    for a, b in zip(lagged.layers, prompt_only.layers):
        np.testing.assert_array_equal(a.heads.m_len, b.heads.lengths.numpy())
        assert [len(p) for p in a.heads.pages] == [len(p) for p in b.heads.pages]


def test_reordered_batch_keeps_the_mirror_exact():
    model, cache, mask = prefilled("fastgen", lengths=(40, 31, 25))
    with torch.no_grad():
        for t in range(8):
            if t == 4:
                cache.batch_select_indices([2, 0])  # drop a sequence, swap the others
                mask = mask[[2, 0]]
            mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], dim=1)
            model(torch.randint(2, VOCAB, (mask.shape[0], 1)), attention_mask=mask,
                  **cache_arg(cache), use_cache=True)
            for layer in cache.layers:
                np.testing.assert_array_equal(layer.heads.m_len, layer.heads.lengths.numpy())
    assert len(cache.layers[0].heads.pages) == 2 * cache.num_kv_heads
    assert cache.stats()["kept_bytes"] == cache.pool.used_bytes("kv")


def test_multi_token_step_resyncs_the_mirror():
    model, cache, mask = prefilled("h2o")
    with torch.no_grad():
        for n in (3, 1, 2, 1):
            mask = torch.cat([mask, torch.ones(mask.shape[0], n, dtype=mask.dtype)], dim=1)
            model(torch.randint(2, VOCAB, (2, n)), attention_mask=mask, **cache_arg(cache),
                  use_cache=True)
            for layer in cache.layers:
                np.testing.assert_array_equal(layer.heads.m_len, layer.heads.lengths.numpy())
                np.testing.assert_array_equal(layer.heads.m_evictable,
                                              recount_evictable(layer.heads, layer.seen))
    cache.stats()


# ---- (3) CUDA: index errors and a CUDA graph ----------------------------------------------------

def ragged_case(device):
    """Two sequences x two KV heads over a pool of 8 pages of 4 rows."""
    kv_rows = torch.randn(32, 16, device=device)
    table = torch.tensor([[0, 1, 2], [3, 4, 0], [5, 0, 0], [6, 7, 0]], dtype=torch.int32,
                         device=device)
    lengths = torch.tensor([9, 6, 3, 8], dtype=torch.int32, device=device)
    q = torch.randn(2, 4, 8, device=device)
    return q, kv_rows, table, lengths


def clear_index_errors(device):
    if torch.device(device).type == "cuda":
        ops.index_error_word(device).zero_()


@pytest.mark.parametrize("argument", ["page_table", "lengths"])
def test_bad_decode_index_is_an_error_or_skipped_and_reported(device, argument):
    q, kv_rows, table, lengths = ragged_case(device)
    bad_table, bad_lengths = table.clone(), lengths.clone()
    if argument == "page_table":
        bad_table[1, 1] = 99  # cache 1 (sequence 0) reads page 99 of an 8-page pool
    else:
        bad_lengths[1] = 1000
    call = lambda: ops.kv_ragged_decode(q, kv_rows, bad_table, bad_lengths, 4, 0.5)  # noqa: E731
    if device == "cpu":  # always checked on the host
        with pytest.raises(IndexError, match=f"{argument} must lie in"):
            call()
        return
    clear_index_errors(device)
    with ops.checked_indices(), pytest.raises(IndexError, match=f"{argument} must lie in"):
        call()
    before = kv_rows.clone()
    out, lse, scores = call()  # returns without reading the values on the host
    torch.cuda.synchronize()
    assert torch.equal(kv_rows, before)
    assert torch.isfinite(out).all() and torch.isfinite(scores).all()
    # sequence 1 (caches 2 and 3) is untouched by the bad index
    want = kv_ragged_decode_reference(q, kv_rows, table, lengths, 4, 0.5)
    torch.testing.assert_close(out[1], want[0][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores[2:], want[2][2:], rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError, match=f"kv_ragged_decode: {argument}"):
        ops.raise_index_errors(device)
    ops.raise_index_errors(device)  # read and cleared


def test_bad_evict_lengths_are_an_error_or_skipped_and_reported(device):
    caches, cap = 4, 10
    pos = torch.arange(caches * cap, device=device).view(caches, cap).clone()
    score = torch.rand(caches, cap, device=device)
    flags = torch.zeros(caches, cap, dtype=torch.uint8, device=device)
    lengths = torch.tensor([10, 25, 7, 3], device=device)  # cache 1: past its capacity
    rest = (torch.zeros(caches, 0, device=device), torch.full((caches,), 100, device=device),
            torch.zeros(caches, dtype=torch.int64, device=device),
            torch.ones(caches, dtype=torch.int64, device=device),
            torch.zeros(caches, dtype=torch.bool, device=device))
    args = [pos, score, flags, lengths, *rest]
    if device == "cpu":
        with pytest.raises(IndexError, match="lengths must lie in"):
            ops.kv_evict_round(*args)
        return
    clear_index_errors(device)
    with ops.checked_indices(), pytest.raises(IndexError, match="lengths must lie in"):
        ops.kv_evict_round(*args)
    want_args = [t.clone() for t in args]
    want_args[3][1] = 0  # the reference of the good caches: cache 1 as if empty
    want_moves = kv_evict_round_reference(*want_args)
    snapshot = [t.clone() for t in args[:4]]
    moves = ops.kv_evict_round(*args)
    torch.cuda.synchronize()
    assert moves[1].tolist() == [-1, -1]
    for t, before in zip(args[:4], snapshot):
        assert torch.equal(t[1], before[1])  # the bad cache is left alone
    good = [0, 2, 3]
    torch.testing.assert_close(moves[good], want_moves[good], rtol=0, atol=0)
    for t, w in zip(args[:3], want_args[:3]):
        torch.testing.assert_close(t[good], w[good], rtol=0, atol=0)
    with pytest.raises(IndexError, match="kv_evict_round: lengths"):
        ops.raise_index_errors(device)


def host_mirror(cache):
    return [(layer.seen, [len(p) for p in layer.heads.pages],
             [getattr(layer.heads, n).tolist() for n in ("m_len", "m_evictable", "m_seen")])
            for layer in cache.layers]


def twin_caches(policy, device, page_rows=4, max_tokens=256):
    """One model, two caches prefilled on the same padded prompt."""
    model = tiny_llama(device)
    ids, mask = prompt_batch((40, 31))
    caches = []
    for _ in range(2):
        cache = FastGenCache(model, StubTokenizer(), page_rows=page_rows, max_tokens=max_tokens,
                             **POLICIES[policy])
        with torch.no_grad():
            model(ids.to(device), attention_mask=mask.to(device), **cache_arg(cache),
                  use_cache=True)
        caches.append(cache)
    return model, caches, mask.to(device)


def eager_steps(model, cache, mask, tokens):
    """Decode steps as users call them (mask grown by one column per step)."""
    out = []
    with torch.no_grad():
        for t in range(tokens.shape[0]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out.append(model(tokens[t], attention_mask=mask, **cache_arg(cache),
                             use_cache=True).logits)
    return out, mask


class GraphStep:
    """A decode step as a captured graph sees it: static token ids, positions and mask, the
    positions advanced on the device by the step itself. ``capture=True`` (CUDA) records one
    step into a CUDA graph; each ``__call__`` then replays it (else runs it eagerly)."""

    def __init__(self, model, cache, mask, capture=False):
        self.model, self.cache = model, cache
        device = mask.device
        self.ids = torch.zeros(mask.shape[0], 1, dtype=torch.long, device=device)
        self.positions = torch.full((1, 1), cache.get_seq_length(), dtype=torch.long,
                                    device=device)
        self.mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)  # never read
        self.graph = None
        if capture:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()

    def _step(self):
        with torch.no_grad():
            logits = self.model(self.ids, attention_mask=self.mask, position_ids=self.positions,
                                **cache_arg(self.cache), use_cache=True).logits
        self.positions.add_(1)
        return logits

    def __call__(self, token):
        self.ids.copy_(token)
        if self.graph is None:
            return self._step().clone()
        self.graph.replay()
        return self.logits.clone()


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_graph_steps_equal_eager_steps_step_after_step(device, policy):
    # One capture replayed for every step (on the CPU the steps inside graph_steps run eagerly:
    # the same code with the host doing nothing between them) against eager steps on a twin.
    model, (eager, graphed), mask = twin_caches(policy, device)
    tokens = step_tokens(24, 2, torch.Generator().manual_seed(3)).to(device)
    warm, steps = 2, 18
    want, mask_after = eager_steps(model, eager, mask, tokens[:warm + steps])
    eager_steps(model, graphed, mask, tokens[:warm])  # warm-up: error word, workspaces
    if device == "cuda":
        torch.cuda.synchronize()
    with graphed.graph_steps(steps + 1):  # the capture itself runs no step on a GPU
        pool_pages = graphed.pool.used_pages
        seen = [layer.seen for layer in graphed.layers]
        step = GraphStep(model, graphed, torch.cat([mask, torch.ones_like(mask[:, :warm])], 1),
                         capture=device == "cuda")
        got = [step(tokens[warm + t]) for t in range(steps)]
        # the host did nothing a replay skips: no page, no position
        assert graphed.pool.used_pages == pool_pages
        assert [layer.seen for layer in graphed.layers] == seen
    for t in range(steps):
        torch.testing.assert_close(got[t], want[warm + t], rtol=1e-5, atol=1e-5,
                                   msg=f"step {t}")
    # On exit the host knows what the device did: the mirror, the pages and the classes.
    assert host_mirror(graphed) == host_mirror(eager)
    for a, b in zip(graphed.layers, eager.layers):
        assert torch.equal(a.heads.lengths, b.heads.lengths)
        for c, n in enumerate(b.heads.lengths.tolist()):
            for name in ("pos", "flags"):
                assert torch.equal(getattr(a.heads, name)[c, :n], getattr(b.heads, name)[c, :n])
    assert graphed._class_log.known == eager._class_log.known
    width = min(graphed._class_log.by_pos.shape[1], eager._class_log.by_pos.shape[1])
    np.testing.assert_array_equal(graphed._class_log.by_pos[:, :width],
                                  eager._class_log.by_pos[:, :width])
    assert graphed.stats()["kept_bytes"] == eager.stats()["kept_bytes"]
    # and eager steps carry on from there exactly as on the twin
    more = step_tokens(4, 2, torch.Generator().manual_seed(4)).to(device)
    after_eager, _ = eager_steps(model, eager, mask_after, more)
    after_graph, _ = eager_steps(model, graphed, mask_after, more)
    for a, b in zip(after_graph, after_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ops.raise_index_errors()


class OpTrace(TorchDispatchMode):
    """Each op a step dispatches, with its tensors' shapes and dtypes and its other arguments:
    what a CUDA graph bakes in (the tensors' values are what it replays on)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    @staticmethod
    def _describe(value):
        if isinstance(value, torch.Tensor):
            return ("T", tuple(value.shape), value.dtype)
        if isinstance(value, (list, tuple)):
            return tuple(OpTrace._describe(v) for v in value)
        return repr(value)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append((str(func), self._describe(args),
                         self._describe(tuple(sorted(kwargs.items())))))
        return func(*args, **kwargs)


def traced_steps(cache, model, mask, tokens, inside):
    step = GraphStep(model, cache, mask)
    traces = []
    context = cache.graph_steps(tokens.shape[0]) if inside else contextlib.nullcontext()
    with context:
        for t in range(tokens.shape[0]):
            if not inside:  # as users call it: positions from the cache, the mask grown
                step.mask = torch.cat([step.mask, torch.ones_like(step.mask[:, :1])], 1)
                step.positions.fill_(cache.get_seq_length())
            token = tokens[t]
            with OpTrace() as trace:
                step(token)
            traces.append(trace.ops)
    return traces


@pytest.mark.parametrize("policy", ["fastgen", "full"])
def test_graph_steps_dispatch_the_same_ops_every_step(policy):
    # What makes one capture valid for every step, shown without a GPU: inside graph_steps each
    # step dispatches the same ops on tensors of the same shapes with the same other arguments.
    # Outside it the steps differ (the host's position is an argument, the mask grows, pages are
    # allocated as caches grow), which is why a capture there is refused.
    model, (outside, inside), mask = twin_caches(policy, "cpu")
    tokens = step_tokens(12, 2, torch.Generator().manual_seed(5))
    same = traced_steps(inside, model, mask, tokens, inside=True)
    assert len(same[0]) > 50
    for t, trace in enumerate(same[1:], 1):
        assert trace == same[0], f"step {t} dispatched different ops than step 0"
    differ = traced_steps(outside, model, mask, tokens, inside=False)
    assert any(trace != differ[0] for trace in differ[1:])


def pages_bits(cache):
    return cache.pool.storage.view(torch.int32).view(cache.pool.num_pages, -1)


def test_graph_steps_past_the_reservation_raise_and_touch_no_other_page():
    model, (cache, _), mask = twin_caches("full", "cpu")  # "full" grows every step
    owned = {p for layer in cache.layers for pages in layer.heads.pages for p in pages}
    tokens = step_tokens(12, 2, torch.Generator().manual_seed(6))
    with pytest.raises(RuntimeError, match=r"graph_steps\(2\): 12 decode steps ran"):
        with cache.graph_steps(2):
            reserved = {p for layer in cache.layers for pages in layer.heads.pages
                        for p in pages}
            others = sorted(set(range(cache.pool.num_pages)) - reserved)
            # (bits: free pages hold whatever torch.empty left there, NaN included)
            before = pages_bits(cache)[others].clone()
            step = GraphStep(model, cache, mask)
            for t in range(12):
                step(tokens[t])
    assert torch.equal(pages_bits(cache)[others], before)
    assert owned <= reserved
    for layer in cache.layers:  # each cache stopped at the room it had
        heads = layer.heads
        assert (heads.lengths.numpy() <= heads.npages * cache.page_rows).all()
        assert heads.m_len.tolist() == heads.lengths.tolist()
    assert cache.stats()["kept_bytes"] == cache.pool.used_bytes("kv")
    # the cache stays consistent (if no longer faithful): later steps run
    eager_steps(model, cache, torch.cat([mask, torch.ones_like(mask[:, :12])], 1),
                step_tokens(2, 2))
    assert cache.stats()["kept_bytes"] == cache.pool.used_bytes("kv")


def test_graph_steps_refusals_name_the_problem():
    model, (cache, fresh), mask = twin_caches("h2o", "cpu")
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="steps must be a positive int"):
            with cache.graph_steps(bad):
                pass
    unused = FastGenCache(model, StubTokenizer(), page_rows=4, max_tokens=64, policy="h2o",
                          budget=12)
    with pytest.raises(RuntimeError, match="prefill"):
        with unused.graph_steps(4):
            pass
    state = host_mirror(cache)
    with cache.graph_steps(4):
        with pytest.raises(RuntimeError, match="already inside"):
            with cache.graph_steps(4):
                pass
        with pytest.raises(RuntimeError, match="stats"):
            cache.stats()
        with pytest.raises(RuntimeError, match="reordering"):
            cache.batch_select_indices([1, 0])
        with pytest.raises(RuntimeError, match="one-token decode steps"), torch.no_grad():
            model(torch.randint(2, VOCAB, (2, 3)), position_ids=torch.arange(3)[None] + 40,
                  **cache_arg(cache), use_cache=True)
    assert host_mirror(cache) == state  # nothing ran
    # a reservation the pool cannot hold is refused and leaves the cache as it was
    used = cache.pool.used_pages
    with pytest.raises(fastllm.memory.PoolExhaustedError, match="graph_steps: no room"):
        with cache.graph_steps(10_000):
            pass
    assert cache.pool.used_pages == used and host_mirror(cache) == state
    assert all(layer.graph is None for layer in cache.layers) and cache._graph is None


@pytest.mark.parametrize("policy", ["fastgen", "h2o"])
def test_graph_steps_on_fake_cuda_read_no_device_data(policy):
    # The steps inside graph_steps, as a replay runs them: on fake CUDA tensors, failing on any
    # read or host copy of device data, with the host state unchanged by every step.
    model, cache, mask = prefilled(policy)
    steps = 6
    tokens = step_tokens(steps, mask.shape[0])
    inside = cache.graph_steps(steps)
    inside.__enter__()  # never exited: that reads the device (the step counters)
    state = host_mirror(cache)
    used = cache.pool.used_pages
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        model.to("cuda")
        move_state(cache, "cuda")
        graph = cache._graph
        graph.classes = graph.classes.to("cuda")
        for layer in cache.layers:
            layer.graph.seen = layer.graph.seen.to("cuda")
            layer.graph.capacity = layer.graph.capacity.to("cuda")
        step = GraphStep(model, cache, mask.to("cuda"))
        for t in range(steps):
            with NoDeviceToHost():
                logits = step(tokens[t].to("cuda"))
    assert isinstance(logits, FakeTensor) and logits.shape == (2, 1, VOCAB)
    assert host_mirror(cache) == state and cache.pool.used_pages == used
    cache.release()  # inside graph_steps too: the exit then has nothing to read
    inside.__exit__(None, None, None)
    assert cache._graph is None and cache.pool.used_pages == 0


@pytest.mark.skipif(not (fastllm.build_info()["cuda"] and torch.cuda.is_available()),
                    reason="needs a GPU and fastllm's CUDA kernels")
def test_capture_outside_graph_steps_is_refused():
    model, cache, mask = prefilled("h2o", device="cuda")
    eager_steps(model, cache, mask, step_tokens(2, 2).cuda())
    torch.cuda.synchronize()
    graph, refused = torch.cuda.CUDAGraph(), None
    with torch.cuda.graph(graph):
        try:  # caught inside, so the capture itself ends cleanly
            GraphStep(model, cache, mask)(torch.ones(2, 1, dtype=torch.long, device="cuda"))
        except RuntimeError as error:
            refused = error
    assert refused is not None and "inside cache.graph_steps" in str(refused)


@pytest.mark.skipif(not (fastllm.build_info()["cuda"] and torch.cuda.is_available()),
                    reason="needs a GPU and fastllm's CUDA kernels")
@pytest.mark.parametrize("policy", ["fastgen", "h2o", "full"])
def test_cuda_decode_steps_do_not_synchronise(policy):
    # What the fake-tensor test proves of the Python layer, checked by PyTorch on a real GPU:
    # decode steps (page allocations included: 4-entry pages) make no synchronising call.
    model, cache, mask = prefilled(policy, device="cuda")
    steps = 12
    tokens = step_tokens(steps, 2).cuda()
    masks = [torch.cat([mask, torch.ones(2, t + 1, dtype=mask.dtype)], 1).cuda()
             for t in range(steps)]
    with torch.no_grad():
        model(tokens[0], attention_mask=masks[0], **cache_arg(cache), use_cache=True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for t in range(1, steps):
                model(tokens[t], attention_mask=masks[t], **cache_arg(cache), use_cache=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    stats = cache.stats()  # synchronises: the mirror agrees with the device (checked inside)
    assert stats["kept_bytes"] == cache.pool.used_bytes("kv")
    ops.raise_index_errors()


# ---- (4) the CUDA kernels are built --------------------------------------------------------------

@pytest.mark.skipif(not fastllm.build_info()["cuda"], reason="fastllm built without CUDA")
def test_kv_cuda_kernels_are_built():
    # csrc/kv/kv_cuda.cu compiled and registered (the CPU-only machines build CUDA too).
    for op in ("kv_attention_scores", "kv_policy_recovery", "kv_ragged_decode", "kv_evict_round",
               "kv_decode_step"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastllm::{op}", "CUDA"), op
