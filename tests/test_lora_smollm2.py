"""The real model: SmolLM2-135M with several PEFT adapters of different ranks on all seven
projections; fastllm's mixed batch must give PEFT's `adapter_names` logits and generations."""

import copy

import pytest
import torch

from fastllm.lora import AdapterManager

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "r4": dict(r=4, lora_alpha=8),
    "r16": dict(r=16, lora_alpha=16, use_rslora=True),
    "r64": dict(r=64, lora_alpha=32),
    "qv8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
}
PROMPTS = ["The capital of France is", "Once upon a time,", "def fibonacci(n):",
           "To make bread you need", "The quick brown fox", "Water boils at"]


@pytest.fixture(scope="module")
def adapters(smollm2, tmp_path_factory):
    """PEFT model with four adapters (random A and B), saved in PEFT format; and our manager on a
    separate copy of the model with the same adapters loaded from those directories."""
    model, tokenizer = smollm2
    torch.manual_seed(1234)
    peft_model = None
    for name, options in ADAPTERS.items():
        options = dict(options)
        config = peft.LoraConfig(target_modules=options.pop("target_modules", TARGETS),
                                 lora_dropout=0.0, **options)
        if peft_model is None:
            peft_model = peft.get_peft_model(copy.deepcopy(model), config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    with torch.no_grad():
        for param_name, param in peft_model.named_parameters():
            if "lora_A" in param_name or "lora_B" in param_name:
                param.normal_(0, 0.03)  # lora_B is zero at init: randomise so adapters matter
    peft_model.eval()
    root = tmp_path_factory.mktemp("peft")
    peft_model.save_pretrained(root, selected_adapters=list(ADAPTERS))
    ours = copy.deepcopy(model)
    manager = AdapterManager(ours, max_rank=64, num_pages=520)
    for name in ADAPTERS:
        manager.load(name, root / name)
    yield peft_model, ours, manager, tokenizer
    manager.close()


def encode(tokenizer, prompts):
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer(prompts, return_tensors="pt", padding=True)


def test_logits_equal_peft_mixed_batch(adapters):
    peft_model, ours, manager, tokenizer = adapters
    names = ["r4", None, "r64", "qv8", "r16", "r4"]
    batch = encode(tokenizer, PROMPTS)
    with torch.no_grad():
        peft_logits = peft_model(**batch, adapter_names=[n or "__base__" for n in names]).logits
        with manager.batch(names):
            our_logits = ours(**batch).logits
        base_logits = ours(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(our_logits[mask], peft_logits[mask], rtol=1e-4, atol=2e-4)
    # every adapter moved the logits of its sequence; the base sequence stayed the base model
    moved = (our_logits - base_logits).abs().amax(dim=(1, 2))
    assert (moved[[0, 2, 3, 4, 5]] > 1e-2).all()
    assert moved[1] == 0


def test_generate_mixed_batch_equals_peft(adapters):
    peft_model, ours, manager, tokenizer = adapters
    names = ["r64", "qv8", None, "r16"]
    batch = encode(tokenizer, PROMPTS[:4])
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        expected = peft_model.generate(**batch, adapter_names=[n or "__base__" for n in names],
                                       **kwargs)
        with manager.batch(names):
            got = ours.generate(**batch, **kwargs)
    assert torch.equal(got, expected)
    assert manager.stats()["resident"] >= 3
