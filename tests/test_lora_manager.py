"""AdapterStore / AdapterManager / LoRALinear on a tiny random Llama: PEFT loading and its errors,
batches and their errors, LRU eviction, prefetch, pool exhaustion, merge/unmerge, statistics."""

import json

import pytest
import torch
from torch import nn

from fastllm.lora import AdapterManager
from fastllm.memory import PoolExhaustedError
from fastllm.nn import LoRALinear

transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=136,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def random_adapter(model, rank, targets=TARGETS, scale=0.05):
    """A PEFT-format state dict (keys as save_pretrained writes them) with random A and B."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, module.in_features) * scale
            state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(module.out_features, rank) * scale
    return state


def naive_forward(model, manager_adapters, names, input_ids):
    """Per sequence: merge its adapter's delta into a copy of the weights, run, collect logits."""
    outs = []
    for i, name in enumerate(names):
        if name is None:
            outs.append(model(input_ids[i:i + 1]).logits)
            continue
        state, config = manager_adapters[name]
        backup = {}
        r = config["r"]
        scaling = config["lora_alpha"] / (r ** 0.5 if config.get("use_rslora") else r)
        with torch.no_grad():
            for key, a in state.items():
                if ".lora_A." not in key:
                    continue
                module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
                b = state[key.replace("lora_A", "lora_B")]
                linear = model.get_submodule(module)
                backup[module] = linear.weight.clone()
                linear.weight += scaling * b @ a
            outs.append(model(input_ids[i:i + 1]).logits)
            for module, weight in backup.items():
                model.get_submodule(module).weight.copy_(weight)
    return torch.cat(outs)


@pytest.fixture
def setup():
    model = tiny_llama()
    reference = tiny_llama()
    reference.load_state_dict(model.state_dict())
    adapters = {
        "r2": (random_adapter(model, 2), {"r": 2, "lora_alpha": 4}),
        "r8": (random_adapter(model, 8, TARGETS[:3]), {"r": 8, "lora_alpha": 8, "use_rslora": True,
                                                        "target_modules": TARGETS[:3]}),
        "r32": (random_adapter(model, 32, ["v_proj", "down_proj"]), {"r": 32, "lora_alpha": 16}),
    }
    manager = AdapterManager(model, max_rank=32, num_pages=64, page_size=4096)
    for name, (state, config) in adapters.items():
        manager.load(name, state, config)
    return model, reference, manager, adapters


def test_linears_replaced_and_base_untouched_outside_batch(setup):
    model, reference, manager, _ = setup
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 * 7
    assert all(not m.weight.requires_grad for m in wrapped)
    ids = torch.randint(0, 96, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    manager.close()
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


@pytest.mark.parametrize("names", [["r2", None, "r8", "r32", "r2"], ["r32"], [None, None]])
def test_mixed_batch_matches_merged_weights(setup, names):
    model, reference, manager, adapters = setup
    ids = torch.randint(0, 96, (len(names), 9))
    with torch.no_grad():
        expected = naive_forward(reference, adapters, names, ids)
        with manager.batch(names):
            prefill = model(ids).logits
        torch.testing.assert_close(prefill, expected, rtol=1e-4, atol=1e-4)
        if any(names):  # the adapters change the output, so the test above can fail
            assert (prefill - reference(ids).logits).abs().max() > 1e-2


def test_unknown_names_and_bad_batches(setup):
    model, _, manager, _ = setup
    with pytest.raises(KeyError, match=r"unknown adapter\(s\) \['nope'\]; loaded adapters: "
                                       r"\['r2', 'r32', 'r8'\]"):
        with manager.batch(["r2", "nope"]):
            pass
    with pytest.raises(RuntimeError, match="was given 2 adapter names but the model got a batch of 3"):
        with manager.batch(["r2", "r8"]), torch.no_grad():
            model(torch.randint(0, 96, (3, 4)))
    assert manager._active is None  # the failed block left no batch behind


def test_load_errors_name_the_tensor(setup):
    model, reference, manager, _ = setup
    state = random_adapter(reference, 4)
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    state[key] = torch.randn(135, 4)
    with pytest.raises(ValueError, match=rf"tensor '{key}' has shape \[135, 4\], expected \[out, r\] = \[136, 4\]"):
        manager.load("bad", state, {"r": 4, "lora_alpha": 8})
    state = random_adapter(reference, 4)
    with pytest.raises(ValueError, match=r"lora_A.weight' has shape \[4, 64\], expected \[r, in\] = \[8, 64\]"):
        manager.load("bad", state, {"r": 8, "lora_alpha": 8})
    state["base_model.model.lm_head.lora_A.weight"] = torch.randn(4, 64)
    with pytest.raises(ValueError, match=r"tensor 'base_model.model.lm_head.lora_A.weight' targets module 'lm_head'"):
        manager.load("bad", state, {"r": 4})
    with pytest.raises(ValueError, match=r"above max_rank=32"):
        manager.load("big", random_adapter(reference, 48), {"r": 48})
    with pytest.raises(ValueError, match=r"outside the adapter's target_modules"):
        manager.load("bad", random_adapter(reference, 4), {"r": 4, "target_modules": ["q_proj"]})
    assert manager.adapters == ["r2", "r32", "r8"]  # nothing half-registered


def test_peft_directory_and_rank_pattern(setup, tmp_path):
    model, reference, manager, adapters = setup
    safetensors = pytest.importorskip("safetensors.torch")
    state = random_adapter(reference, 4)
    # rank_pattern / alpha_pattern: v_proj gets rank 6 and its own alpha
    for key in list(state):
        if ".v_proj." in key:
            shape = (6, 64) if "lora_A" in key else (state[key].shape[0], 6)
            state[key] = torch.randn(shape) * 0.05
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"v_proj": 6},
              "alpha_pattern": {"v_proj": 3}, "target_modules": TARGETS, "fan_in_fan_out": False}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    safetensors.save_file(state, str(tmp_path / "adapter_model.safetensors"))
    manager.load("dir", tmp_path)
    ids = torch.randint(0, 96, (2, 5))
    with torch.no_grad():
        with manager.batch(["dir", None]):
            got = model(ids).logits
        # reference: merge by hand with per-module scaling
        for key in state:
            if ".lora_A." not in key:
                continue
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            scaling = 3 / 6 if "v_proj" in module else 8 / 4
            reference.get_submodule(module).weight += scaling * state[key.replace("lora_A", "lora_B")] @ state[key]
        expected = reference(ids[:1]).logits
    torch.testing.assert_close(got[:1], expected, rtol=1e-4, atol=1e-4)


def test_lru_eviction_prefetch_stats_and_exhaustion(setup):
    model, reference, manager, adapters = setup
    store = manager.store
    pages = {name: store.host[name].buffer.shape[0] for name in manager.adapters}
    ids = torch.randint(0, 96, (2, 4))
    # Make the pool hold exactly the two largest adapters: shrink it by reserving pages.
    reserve = manager.pool.alloc(manager.pool.free_pages - pages["r2"] - pages["r32"], "other")
    with torch.no_grad():
        with manager.batch(["r2", "r32"]):
            model(ids)
        assert store.stats()["misses"] == 2 and store.stats()["resident"] == 2
        with manager.batch(["r8", "r32"]):  # r2 (least recently used, not in the batch) goes
            out = model(ids).logits
        stats = store.stats()
        assert stats["hits"] == 1 and stats["misses"] == 3 and stats["evictions"] >= 1
        assert "r2" not in store.resident and "r8" in store.resident
        assert stats["pages_used"] == sum(store.resident[n].page_ids.numel() for n in store.resident)
        assert stats["bytes_moved"] == sum(store.host[n].nbytes for n in ["r2", "r32", "r8"])
        # every adapter at once does not fit: a clear error, and nothing breaks
        with pytest.raises(PoolExhaustedError, match=r"adapter 'r\w+' needs \d+ pages"):
            with manager.batch(["r2", "r8", "r32"]):
                pass
        assert manager._active is None
        with manager.batch(["r8", "r32"]):
            again = model(ids).logits
        torch.testing.assert_close(again, out, rtol=0, atol=0)
        expected = naive_forward(reference, adapters, ["r8", "r32"], ids)
        torch.testing.assert_close(again, expected, rtol=1e-4, atol=1e-4)
        # prefetch (synchronous on CPU) makes the next batch a hit
        manager.prefetch(["r2"])
        hits = store.stats()["hits"]
        with manager.batch(["r2", None]):
            model(ids)
        assert store.stats()["hits"] == hits + 1
    manager.pool.free(reserve)


def test_merge_and_unmerge(setup):
    model, reference, manager, adapters = setup
    ids = torch.randint(0, 96, (2, 6))
    before = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        with manager.batch(["r8", "r8"]):
            batched = model(ids).logits
        manager.merge("r8")
        with pytest.raises(RuntimeError, match="merged into the base weights"):
            with manager.batch(["r2"]):
                pass
        merged = model(ids).logits
        torch.testing.assert_close(merged, batched, rtol=1e-4, atol=1e-4)
        manager.unmerge()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=1e-6)


def test_unload_frees_pages(setup):
    model, _, manager, _ = setup
    with manager.batch(["r32"]), torch.no_grad():
        model(torch.randint(0, 96, (1, 3)))
    used = manager.stats()["pages_used"]
    manager.unload("r32")
    assert manager.stats()["pages_used"] < used
    assert "r32" not in manager.adapters
    with pytest.raises(KeyError, match="loaded adapters"):
        manager.unload("r32")


def test_register_many_adapters_is_cheap(setup):
    import time
    model, reference, manager, _ = setup
    state = random_adapter(reference, 2, ["q_proj", "v_proj"])
    begin = time.perf_counter()
    for i in range(300):
        manager.load(f"many{i}", state, {"r": 2, "lora_alpha": 2})
    per_adapter = (time.perf_counter() - begin) / 300
    assert len(manager.adapters) == 303
    assert per_adapter < 0.02  # same rank pattern: the packing plan is shared


def test_training_gradients_flow_to_input(setup):
    model, _, manager, _ = setup
    ids = torch.randint(0, 96, (2, 5))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    with manager.batch(["r2", "r8"]):
        loss = model(inputs_embeds=embeds).logits.square().mean()
    loss.backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


def test_mixed_batch_on_each_device(device):
    # The same mixed batch on every device present (CUDA when there is a GPU), against the
    # merged-weights reference on CPU; prefetch goes through the side stream on CUDA.
    model = tiny_llama()
    reference = tiny_llama()
    reference.load_state_dict(model.state_dict())
    adapters = {"r4": (random_adapter(model, 4), {"r": 4, "lora_alpha": 8}),
                "r16": (random_adapter(model, 16, TARGETS[4:]), {"r": 16, "lora_alpha": 4})}
    model.to(device)
    manager = AdapterManager(model, max_rank=16, num_pages=32, page_size=2048, device=device)
    for name, (state, config) in adapters.items():
        manager.load(name, state, config)
    names = ["r16", None, "r4", "r16"]
    ids = torch.randint(0, 96, (4, 6))
    manager.prefetch(["r4", "r16"])
    with torch.no_grad():
        with manager.batch(names):
            got = model(ids.to(device)).logits.cpu()
        expected = naive_forward(reference, adapters, names, ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert manager.stats()["hits"] == 2 and manager.stats()["misses"] == 0


def test_store_packing_round_trip_across_page_boundaries():
    # Rows of 40, 24 and 56 elements in pages of 100: runs break at page ends and leave gaps, the
    # packing is one torch.cat per adapter, and B arrives transposed. Every module's A and B must
    # read back exactly (bf16 weights into an fp32 pool: converted once), and no row may straddle
    # a page.
    from fastllm.lora.store import AdapterStore, ModuleSpec, ModuleWeights
    from fastllm.memory import PagePool

    specs = [ModuleSpec("q", 40, 24), ModuleSpec("v", 40, 56), ModuleSpec("o", 24, 40)]
    store = AdapterStore(PagePool(64, 100, torch.float32, "cpu"), specs, max_rank=8)
    adapters = {}
    for name, ranks, dtype in [("a", (3, 8, 1), torch.float32), ("b", (8, 0, 5), torch.bfloat16),
                               ("c", (3, 8, 1), torch.float32)]:
        adapters[name] = {s.name: ModuleWeights(torch.randn(r, s.in_features).to(dtype),
                                                torch.randn(s.out_features, r).to(dtype), 0.5)
                          for s, r in zip(specs, ranks) if r}
        store.register(name, adapters[name])
    for name, weights in adapters.items():
        host = store.host[name]
        for i, spec in enumerate(specs):
            got = store.weights(name, spec.name)
            if spec.name not in weights:
                assert got is None
                continue
            assert torch.equal(got.a, weights[spec.name].a.float())
            assert torch.equal(got.b, weights[spec.name].b.float())
            r = weights[spec.name].a.shape[0]
            for kind, width in ((0, spec.in_features), (1, spec.out_features)):
                starts = host.plan.rows[i, kind, :r]
                assert ((starts % 100) + width <= 100).all()


def test_projections_sharing_an_input_share_one_shrink():
    # q/k/v (and gate/up) read the same hidden states: one multi-slice shrink serves them, and the
    # logits equal those of a shrink per projection.
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls[func.name()] += 1
            return func(*args, **(kwargs or {}))

    model = tiny_llama()
    adapter = random_adapter(model, 4)
    manager = AdapterManager(model, max_rank=8, num_pages=64, page_size=4096)
    manager.load("all", adapter, {"r": 4, "lora_alpha": 8})
    ids = torch.randint(0, 96, (2, 5))
    assert len(manager.fused_groups) == 4  # (q, k, v) and (gate, up) in each of 2 layers
    with torch.no_grad():
        with manager.batch(["all", None]):
            counter = CountOps()
            with counter:
                fused = model(ids).logits
        assert counter.calls["fastllm::lora_shrink"] == 2 * 4  # qkv, o, gate/up, down per layer
        assert counter.calls["fastllm::lora_expand"] == 2 * 7
        manager.fused_groups = []
        with manager.batch(["all", None]):
            separate = model(ids).logits
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
