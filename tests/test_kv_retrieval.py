"""The retrieval suite (bench/kv_retrieval.py): its cases hold what they ask for, the splits do
not share fillers or cases, and a cache filled by the shared-prefill replay equals one filled
by a forward (real SmolLM2-135M, one short prompt)."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))

pytest.importorskip("transformers")
import kv_retrieval as suite  # noqa: E402
from helpers import cache_arg  # noqa: E402

pytestmark = pytest.mark.real_model


def test_cases_hold_their_answers_at_their_lengths(smollm2):
    _, tokenizer = smollm2
    dev = suite.build_split(tokenizer, "dev", {500: 1})
    held = suite.build_split(tokenizer, "heldout", {500: 1})
    assert [c["task"] for c in dev] == list(suite.TASKS)
    for case in dev + held:
        tokens = len(case["context"]) + len(case["question"])
        assert tokens <= 500 and (case["task"] == "cwe" or tokens == 500)
        context = tokenizer.decode(case["context"])
        for answer in case["answers"]:
            assert answer in context, (case["task"], answer)
        assert not any(a in tokenizer.decode(case["question"]) for a in case["answers"]
                       if case["task"] != "vartrack")
    assert {c["filler"] for c in held} <= {"records", "wordlist"}
    assert not {c["filler"] for c in dev} & {"records"}
    assert not {tuple(c["answers"]) for c in dev} & {tuple(c["answers"]) for c in held}


@torch.no_grad()
def test_replayed_prefill_equals_a_forward(smollm2):
    model, tokenizer = smollm2
    case = suite.build_split(tokenizer, "dev", {500: 1})[0]
    ids = torch.tensor([case["context"][:160]])
    prefill = suite.SharedPrefill(model, tokenizer, ids)
    step = torch.tensor([[case["question"][0]]])
    for name, kwargs in (("fastgen", {}), ("adakv", {"budget": 0.6})):
        replayed = prefill.cache(model, tokenizer, name, kwargs)
        direct = suite.make_cache(model, tokenizer, name, kwargs)
        logits = model(ids, **cache_arg(direct), use_cache=True).logits[:, -1]
        torch.testing.assert_close(logits, prefill.logits)
        a, b = replayed.stats(), direct.stats()
        assert a["policies"] == b["policies"] and a["kept_bytes"] == b["kept_bytes"]
        out_a = model(step, **cache_arg(replayed), use_cache=True).logits
        out_b = model(step, **cache_arg(direct), use_cache=True).logits
        torch.testing.assert_close(out_a, out_b)
        replayed.release()
        direct.release()
    prefill.release()
