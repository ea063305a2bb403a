"""fastllm.kv.profile's result type (Profile / HeadChoice) on a tiny random Llama: every head's
choice matches what a FastGenCache run on the same prompt keeps, the old nested-dict form is
still available, and bad arguments are refused by name."""

from __future__ import annotations

import dataclasses
import types
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastllm.kv import FastGenCache, HeadChoice, Profile, cache_keyword, profile  # noqa: E402

VOCAB = 96
TEXT = "Profiles pick, per head, what to keep. Specials, punctuation; windows and heavy hitters!"


class StubTokenizer:
    all_special_ids = [0, 1]

    def __len__(self):
        return VOCAB

    def __call__(self, text, return_tensors=None):
        return types.SimpleNamespace(input_ids=torch.tensor([[2 + ord(c) % (VOCAB - 2)
                                                              for c in text]]))

    def batch_decode(self, ids):
        return ["." if i[0] % 5 == 0 else f" w{i[0]}" for i in ids]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=136,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def deprecations_are_errors():
    with warnings.catch_warnings():
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.simplefilter("error", category)
        yield


def test_profile_matches_a_cache_run(model, deprecations_are_errors):
    # recovery=0.5 lets the random model's heads take cheaper policies than "full".
    result = profile(model, StubTokenizer(), TEXT, recovery=0.5, page_rows=4, progress=False)
    cache = FastGenCache(model, StubTokenizer(), recovery=0.5, page_rows=4)
    ids = StubTokenizer()(TEXT).input_ids
    with torch.no_grad():
        model(ids, **{cache_keyword(model): cache}, use_cache=True)
    expected = cache.stats()["policies"]
    policies = [layer.heads.policies for layer in cache.layers]
    cache.release()

    assert isinstance(result, Profile)
    assert result.tokens == ids.shape[1] and len(result) == result.num_layers == 3
    assert result.to_dicts() == expected
    assert len(result.heads) == 3 * 2
    for layer_idx, layer in enumerate(result.by_layer):
        assert [c.kv_head for c in layer] == [0, 1]
        for choice, policy in zip(layer, policies[layer_idx]):
            assert isinstance(choice, HeadChoice) and choice.layer == layer_idx
            assert (choice.sinks, choice.window, choice.heavy, choice.grows) == \
                (policy.sinks, policy.window, policy.heavy, policy.grow)
            assert choice.kept_share == choice.kept / result.tokens
    assert result[1] is result.by_layer[1] and list(result) == list(result.by_layer)
    kept = sum(d["kept"] for layer in expected for d in layer)
    assert result.kept_share == pytest.approx(kept / (result.tokens * 6))
    names = [d["policy"] for layer in expected for d in layer]
    assert result.counts() == {p: names.count(p) for p in set(names)}
    assert list(result.counts().values()) == sorted(result.counts().values(), reverse=True)
    assert result.profile_seconds > 0
    assert any(c.policy != "full" and c.window > 0 for c in result.heads), \
        "every head kept everything: the policy fields were not exercised"


def test_summary_and_repr(model):
    result = profile(model, StubTokenizer(), TEXT, policy="h2o", budget=8, page_rows=4,
                     progress=False)
    lines = result.summary().splitlines()
    assert str(result) == result.summary()
    assert lines[0].startswith(f"KV-head profile of {result.tokens} tokens: 3 layers x 2 KV heads")
    assert lines[1].split() == ["layer", "head", "0", "head", "1"]
    share = f"{8 / result.tokens:.0%}"
    assert lines[2].split() == ["0", "h2o", share, "h2o", share]
    assert len(lines) == 2 + 3 + 1 and lines[-1] == "heads per policy: h2o 6"
    assert repr(result).startswith(f"Profile(tokens={result.tokens}, layers=3, heads=6, ")
    assert "counts={'h2o': 6}" in repr(result)


def test_head_choice_is_frozen_and_old_indexing_warns(model):
    result = profile(model, StubTokenizer(), TEXT, page_rows=4, progress=False)
    choice = result[0][0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        choice.kept = 0
    with pytest.warns(DeprecationWarning, match=r"choice\.policy"):
        assert result[0][0]["policy"] == choice.policy
    with pytest.warns(DeprecationWarning, match=r"choice\.kept"):
        assert choice["kept"] == choice.kept
    with pytest.raises(KeyError):
        choice["window"]
    assert choice.to_dict() == {"policy": choice.policy, "kept": choice.kept}


def test_profile_releases_its_pages_and_hooks(model, monkeypatch):
    pool_users = []
    original = FastGenCache.release

    def release(self):
        pool_users.append(self.pool)
        original(self)

    monkeypatch.setattr(FastGenCache, "release", release)
    profile(model, StubTokenizer(), TEXT, page_rows=4, progress=False)
    assert pool_users and pool_users[0].free_pages == pool_users[0].num_pages
    assert not model.get_input_embeddings()._forward_pre_hooks
    assert not any(block._forward_hooks for block in model.model.layers)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"text": ""}, ValueError, "text must be a non-empty str"),
    ({"text": 3}, ValueError, "text must be a non-empty str"),
    ({"progress": "yes"}, TypeError, "fastllm.kv.profile: progress must be True, False or None"),
    ({"policy": "lru"}, ValueError, "policy must be one of"),
])
def test_profile_argument_errors(model, kwargs, error, match):
    args = {"text": TEXT, **kwargs}
    with pytest.raises(error, match=match):
        profile(model, StubTokenizer(), args.pop("text"), page_rows=4, **args)


def test_profile_progress_reports_the_layers(model, capsys):
    profile(model, StubTokenizer(), TEXT, page_rows=4, progress=True)
    err = capsys.readouterr().err
    assert "profiling KV heads" in err and "3/3" in err
    profile(model, StubTokenizer(), TEXT, page_rows=4, progress=False)
    assert capsys.readouterr().err == ""
