"""Bad input at the adapter entry points, tried as a new user would (issue 21): each mistake is
refused with an error naming the argument, the accepted range and the value, and leaves the
manager as it was. (The ops' rejections are in tests/test_<capability>_ops.py and the property
tests; sparsify's and SparseMLP's in tests/test_sparse_api.py; the page pool's in
tests/test_memory_page_pool.py; untrusted files in tests/test_untrusted_files.py.)"""

from __future__ import annotations

import pytest
import torch

from test_faults import VOCAB, adapter_state, tiny_llama

from fastllm.lora import AdapterManager, AdapterStore, ModuleSpec, ModuleWeights
from fastllm.memory import PagePool


@pytest.fixture
def served():
    model = tiny_llama()
    manager = AdapterManager(model, max_rank=8, num_pages=64, page_size=1024)
    manager.load("a", adapter_state(model, 4, seed=1), {"r": 4, "lora_alpha": 8})
    yield model, manager
    manager.close()


def logits(model, manager, names, ids):
    with manager.batch(names), torch.no_grad():
        return model(ids).logits


def test_a_second_adapter_under_a_loaded_name_is_refused_unless_replace(served):
    model, manager = served
    ids = torch.randint(2, VOCAB, (1, 5))
    first = logits(model, manager, ["a"], ids)
    other = adapter_state(model, 2, seed=2)
    with pytest.raises(ValueError, match=r"an adapter named 'a' is already loaded; unload it "
                                         r"first or pass replace=True"):
        manager.load("a", other, {"r": 2, "lora_alpha": 2})
    assert torch.equal(logits(model, manager, ["a"], ids), first)  # the first one is still there
    manager.load("a", other, {"r": 2, "lora_alpha": 2}, replace=True)
    assert not torch.equal(logits(model, manager, ["a"], ids), first)
    assert manager.adapters == ["a"]
    with pytest.raises(TypeError, match=r"replace must be a bool, got 'yes'"):
        manager.load("b", other, {"r": 2, "lora_alpha": 2}, replace="yes")
    with pytest.raises(ValueError, match=r"name must be a non-empty str, got ''"):
        manager.load("", other, {"r": 2, "lora_alpha": 2})


def test_a_state_dict_without_lora_alpha_is_refused(served):
    model, manager = served
    state = adapter_state(model, 4, seed=3)
    for config in (None, {}, {"r": 4}):
        with pytest.raises(ValueError, match=r"config has no lora_alpha for module .* pass "
                                             r"config=\{'r': 4, 'lora_alpha': \.\.\.\}"):
            manager.load("b", state, config)
    # an alpha_pattern that covers every module is enough
    manager.load("b", state, {"r": 4, "alpha_pattern": {"q_proj": 4, "v_proj": 4,
                                                         "down_proj": 4}})
    assert manager.adapters == ["a", "b"]


@pytest.mark.parametrize("config, pattern", [
    ({"r": 0, "lora_alpha": 1}, r"config\['r'\] must be a positive int, got 0"),
    ({"r": 4.0, "lora_alpha": 1}, r"config\['r'\] must be a positive int, got 4.0"),
    ({"r": 4, "lora_alpha": "8"}, r"config\['lora_alpha'\] must be a finite number, got '8'"),
    ({"r": 4, "lora_alpha": float("nan")},
     r"config\['lora_alpha'\] must be a finite number, got nan"),
    ({"r": 4, "lora_alpha": 8, "rank_pattern": [4]},
     r"config\['rank_pattern'\] must be a dict"),
    ([("r", 4)], r"config must be a dict \(the LoRA config\) or None, got list"),
])
def test_config_values_are_checked(served, config, pattern):
    model, manager = served
    with pytest.raises((ValueError, TypeError), match=pattern):
        manager.load("b", adapter_state(model, 4, seed=4), config)
    assert manager.adapters == ["a"]


def test_the_rank_cap_is_named():
    model = tiny_llama()
    for bad in (0, 300, 2.5, True):
        with pytest.raises(ValueError, match=rf"max_rank must be an int in \[1, 256\], got "
                                             rf"{bad!r}"):
            AdapterManager(model, max_rank=bad, num_pages=8, page_size=1024)
    assert "1..256" in AdapterManager.__doc__
    manager = AdapterManager(model, max_rank=256, num_pages=600, page_size=1024)
    with pytest.raises(ValueError, match=r"has rank 300, above max_rank=256 "
                                         r"\(AdapterManager\(max_rank=...\) accepts 1..256\)"):
        manager.load("big", adapter_state(model, 300, seed=5), {"r": 300, "lora_alpha": 300})
    manager.load("ok", adapter_state(model, 256, seed=6), {"r": 256, "lora_alpha": 256})
    manager.close()


def test_more_adapter_names_than_sequences_fails_before_any_layer_runs(served):
    model, manager = served
    ran = []
    hook = model.model.embed_tokens.register_forward_hook(lambda *args: ran.append(1))
    try:
        for names, batch in ((["a", None, "a"], 2), (["a"], 3)):
            with pytest.raises(RuntimeError, match=rf"was given {len(names)} adapter names but "
                                                   rf"the model got a batch of {batch} sequences"):
                with manager.batch(names), torch.no_grad():
                    model(torch.randint(2, VOCAB, (batch, 4)))
            assert ran == []  # refused in the model's pre-hook, not deep inside a layer
            assert manager._active is None
        with manager.batch(["a", None]), torch.no_grad():  # and inputs_embeds are checked too
            with pytest.raises(RuntimeError, match="was given 2 adapter names"):
                model(inputs_embeds=torch.randn(3, 4, 32))
    finally:
        hook.remove()


def test_batch_arguments_are_checked(served):
    model, manager = served
    with pytest.raises(TypeError, match="adapter_names must be a sequence of names"):
        with manager.batch("a"):
            pass
    with pytest.raises(KeyError, match=r"unknown adapter\(s\) \['zz'\]; loaded adapters: \['a'\]"):
        with manager.batch(["zz"]):
            pass
    with pytest.raises(ValueError, match="adapter_names is empty"):
        with manager.batch([]):
            pass
    with pytest.raises(TypeError, match=r"adapter names must be str or None, got \[3\]"):
        with manager.batch(["a", 3]):
            pass
    with manager.batch(["a"]):
        with pytest.raises(RuntimeError, match="a batch is already active in this thread"):
            with manager.batch(["a"]):
                pass
    assert manager._active is None and manager.store._in_use == set()


@pytest.mark.parametrize("scaling", [float("nan"), float("inf"), -float("inf"), "2.0", True])
def test_the_store_refuses_a_scaling_that_is_not_a_finite_number(scaling):
    # AdapterManager.load checks lora_alpha; a store used directly gets its scaling checked too.
    store = AdapterStore(PagePool(8, 64, torch.float32, "cpu"), [ModuleSpec("q", 16, 16)],
                         max_rank=4)
    weights = {"q": ModuleWeights(torch.randn(2, 16), torch.randn(16, 2), scaling)}
    with pytest.raises(ValueError, match=rf"AdapterStore.register\('a'\): module q's scaling "
                                         rf"must be a finite number, got {scaling!r}"):
        store.register("a", weights)
    assert store.names() == []
    store.register("a", {"q": ModuleWeights(torch.randn(2, 16), torch.randn(16, 2), 0.5)})
    assert store.weights("a", "q").scaling == 0.5
