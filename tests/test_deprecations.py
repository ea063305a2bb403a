"""fastllm's own calls into transformers and torch raise no deprecation warnings.

Every warning category a library uses for "this name is going away" is an error here, so a rename
upstream (transformers 5.2x renamed ``past_key_values`` to ``cache``) fails this test instead of
printing a warning on every call of a user's model that the user cannot silence.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastllm.kv import FastGenCache, cache_keyword, profile  # noqa: E402

VOCAB = 96


class StubTokenizer:
    """What FastGenCache and profile ask of a tokenizer."""

    all_special_ids = [0, 1]

    def __len__(self):
        return VOCAB

    def __call__(self, text, return_tensors=None):
        ids = torch.tensor([[2 + (ord(c) % (VOCAB - 2)) for c in text]])
        return types.SimpleNamespace(input_ids=ids)

    def batch_decode(self, ids):
        return ["." if i[0] % 5 == 0 else f" w{i[0]}" for i in ids]


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=136,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def deprecations_are_errors():
    with warnings.catch_warnings():
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.simplefilter("error", category)
        yield


def test_profile_passes_the_cache_by_the_current_keyword(deprecations_are_errors):
    model = tiny_llama()
    table = profile(model, StubTokenizer(), "a short prompt, profiled once.", page_rows=4)
    assert len(table) == model.config.num_hidden_layers


def test_cache_keyword_is_the_one_the_model_accepts(deprecations_are_errors):
    model = tiny_llama()
    key = cache_keyword(model)
    assert key in ("cache", "past_key_values")
    cache = FastGenCache(model, StubTokenizer(), page_rows=4)
    ids = StubTokenizer()("prefill then one decode step").input_ids
    with torch.no_grad():
        model(ids, **{key: cache}, use_cache=True)
        model(ids[:, :1], **{key: cache}, use_cache=True)
    assert cache.get_seq_length() == ids.shape[1] + 1
    cache.release()


def test_cache_keyword_of_an_object_without_a_signature_is_the_old_name():
    assert cache_keyword(types.SimpleNamespace(forward=object())) == "past_key_values"
    assert cache_keyword(types.SimpleNamespace(forward=lambda ids, past_key_values=None: ids)) \
        == "past_key_values"
    assert cache_keyword(types.SimpleNamespace(forward=lambda ids, cache=None: ids)) == "cache"
