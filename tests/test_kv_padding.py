"""FastGenCache on padded batches (real SmolLM2-135M): left padding through model.generate, right
padding and holes in a plain forward loop, pads never stored, per-sequence batch invariance of
FastGen's decisions, and the masks it refuses."""

import pytest
import torch

from fastllm.kv import FastGenCache
from helpers import cache_arg

pytestmark = pytest.mark.real_model

OFFSETS = (0, 3000, 9000)


def prompts(tokenizer, text, lengths):
    return [tokenizer(text[o:o + 2000], return_tensors="pt").input_ids[0, :n]
            for o, n in zip(OFFSETS, lengths)]


def pad(seqs, pad_id, side="left"):
    """Batch of token ids and 0/1 attention mask, padded on ``side`` (or per-row sides)."""
    width = max(s.shape[0] for s in seqs)
    sides = side if isinstance(side, (list, tuple)) else [side] * len(seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, (s, where) in enumerate(zip(seqs, sides)):
        if where == "left":
            ids[i, width - s.shape[0]:], mask[i, width - s.shape[0]:] = s, 1
        else:
            ids[i, :s.shape[0]], mask[i, :s.shape[0]] = s, 1
    return ids, mask


def pad_id(tokenizer):
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def test_left_padded_generate_full_matches_each_prompt_alone(smollm2, shakespeare):
    from transformers import DynamicCache

    model, tokenizer = smollm2
    seqs = prompts(tokenizer, shakespeare, (21, 34, 9))
    ids, mask = pad(seqs, pad_id(tokenizer))
    cache = FastGenCache(model, tokenizer, policy="full")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **cache_arg(cache), max_new_tokens=6,
                             do_sample=False, pad_token_id=pad_id(tokenizer))
        for i, s in enumerate(seqs):
            alone = model.generate(s[None], **cache_arg(DynamicCache(config=model.config)),
                                   max_new_tokens=6, do_sample=False,
                                   pad_token_id=pad_id(tokenizer))
            assert out[i, ids.shape[1]:].tolist() == alone[0, s.shape[0]:].tolist(), i
    stats = cache.stats()
    real = [s.shape[0] + 5 for s in seqs]  # the last generated token is never fed back
    assert stats["sequence_tokens"] == real
    # pads take no entry and no page: a full cache of exactly the real tokens
    layers, hkv = model.config.num_hidden_layers, model.config.num_key_value_heads
    assert stats["kept_entries"] == stats["full_entries"] == layers * hkv * sum(real)
    # full_bytes is the dense size of those tokens; kept_bytes the whole pages holding them
    assert stats["full_bytes"] == stats["full_entries"] * stats["entry_bytes"]
    assert stats["kept_bytes"] == cache.pool.used_bytes("kv")
    assert 0 <= stats["kept_bytes"] - stats["full_bytes"] < layers * hkv * len(seqs) * cache.pool.page_bytes
    for layer in cache.layers:
        for c in range(len(seqs) * hkv):
            n = int(layer.heads.lengths[c])
            assert sorted(layer.heads.pos[c, :n].tolist()) == list(range(real[c // hkv]))
    cache.release()
    assert cache.pool.used_pages == 0


def test_padded_forward_logits_equal_dynamic_cache(smollm2, shakespeare):
    # Left padding, right padding and a hole, in one batch, in a plain forward loop: prompt
    # logits on real positions, then single-token and multi-token steps on top.
    from transformers import DynamicCache

    model, tokenizer = smollm2
    seqs = prompts(tokenizer, shakespeare, (17, 26, 20))
    ids, mask = pad(seqs, pad_id(tokenizer), side=["left", "right", "right"])
    mask[2, 5:8] = 0  # a hole inside the third prompt
    steps = [torch.tensor([[11], [12], [13]]), torch.tensor([[14, 15, 16]] * 3)]

    def run(cache):
        outs = []
        m = mask
        with torch.no_grad():
            outs.append(model(ids, attention_mask=m, **cache_arg(cache), use_cache=True).logits)
            for step in steps:
                m = torch.cat([m, torch.ones(3, step.shape[1], dtype=m.dtype)], dim=1)
                outs.append(model(step, attention_mask=m, **cache_arg(cache),
                                  use_cache=True).logits)
        return outs

    got = run(FastGenCache(model, tokenizer, policy="full"))
    want = run(DynamicCache(config=model.config))
    real = mask.bool()
    torch.testing.assert_close(got[0][real], want[0][real], rtol=1e-4, atol=1e-4)
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_fastgen_padded_batch_is_batch_invariant(smollm2, shakespeare):
    model, tokenizer = smollm2
    seqs = prompts(tokenizer, shakespeare, (72, 40, 55))
    ids, mask = pad(seqs, pad_id(tokenizer))
    batch = FastGenCache(model, tokenizer, recovery=0.9, page_rows=8)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **cache_arg(batch), max_new_tokens=3,
                             do_sample=False, pad_token_id=pad_id(tokenizer))
    stats = batch.stats()
    assert stats["kept_bytes"] == batch.pool.used_bytes("kv") == stats["pages"] * batch.pool.page_bytes
    assert stats["kept_bytes"] < stats["full_bytes"]
    hkv = model.config.num_key_value_heads
    for i, s in enumerate(seqs):
        alone = FastGenCache(model, tokenizer, recovery=0.9, page_rows=8)
        with torch.no_grad():
            single = model.generate(s[None], **cache_arg(alone), max_new_tokens=3,
                                    do_sample=False, pad_token_id=pad_id(tokenizer))
        assert out[i, ids.shape[1]:].tolist() == single[0, s.shape[0]:].tolist()
        want = alone.stats()["policies"]
        got = [layer[i * hkv:(i + 1) * hkv] for layer in stats["policies"]]
        assert got == want, i
        # the same kept token positions, head by head
        for lb, la in zip(batch.layers, alone.layers):
            for h in range(hkv):
                n = int(la.heads.lengths[h])
                assert sorted(lb.heads.pos[i * hkv + h, :n].tolist()) == \
                    sorted(la.heads.pos[h, :n].tolist())
        alone.release()
    batch.release()
    assert batch.pool.used_pages == 0


def test_masks_it_cannot_honour_are_clear_errors(smollm2, shakespeare):
    model, tokenizer = smollm2
    seqs = prompts(tokenizer, shakespeare, (12, 8))
    ids, mask = pad(seqs, pad_id(tokenizer))
    token = torch.tensor([[11], [12]])

    def prefilled():
        cache = FastGenCache(model, tokenizer, policy="full")
        with torch.no_grad():
            model(ids, attention_mask=mask, **cache_arg(cache), use_cache=True)
        return cache

    moved = mask.clone()
    moved[0, 0] = 0
    cases = [
        (torch.cat([mask, torch.tensor([[1], [0]])], 1), "padding inside the new tokens"),
        (torch.cat([moved, torch.ones(2, 1, dtype=mask.dtype)], 1), "pads different past tokens"),
        # no mask: transformers builds a causal one, which claims the unstored pads are visible
        (None, "pads different past tokens"),
        # all ones claims the unstored pads are visible (fastllm always has transformers build
        # the mask: skipping it would read the padding mask on the host every step)
        (torch.ones(2, ids.shape[1] + 1, dtype=mask.dtype), "pads different past tokens"),
    ]
    for step_mask, match in cases:
        cache = prefilled()
        with pytest.raises(ValueError, match=match), torch.no_grad():
            model(token, attention_mask=step_mask, **cache_arg(cache), use_cache=True)
        cache.release()
    cache = FastGenCache(model, tokenizer, policy="full")
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="sequence 1 of the batch is all padding"), torch.no_grad():
        model(ids, attention_mask=empty, **cache_arg(cache), use_cache=True)
    cache.release()
    # a non-causal pattern (here: a real query seeing a future key) is refused, not approximated
    vis = torch.ones(1, 4, 4, dtype=torch.bool).tril()
    vis[0, 1, 3] = True
    with pytest.raises(ValueError, match="sequence 0, query 1 sees key 3"):
        FastGenCache._check_causal_padding(vis, torch.ones(1, 4, dtype=torch.bool), 0)
    vis = torch.ones(1, 4, 4, dtype=torch.bool).tril()
    vis[0, 3, 0] = False  # a real query that does not see an earlier real key
    with pytest.raises(ValueError, match="query 3 does not see key 0"):
        FastGenCache._check_causal_padding(vis, torch.ones(1, 4, dtype=torch.bool), 0)
