"""The transformers Trainer recipe: ``Trainer(..., optimizers=(GaLoreAdamW(galore_param_groups(
model, ...)), None))``, normal and layer-wise (with the Trainer's gradient accumulation), on a tiny
random Llama; a run interrupted at a checkpoint and resumed through the Trainer ends with the same
parameters and losses as the uninterrupted run."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastllm.optim import GaLoreAdamW, galore_param_groups  # noqa: E402

STEPS, SAVE_AT, GAP = 8, 4, 3


class _Tokens(torch.utils.data.Dataset):
    def __init__(self):
        # Counting sequences from random starts: learnable in a few steps.
        g = torch.Generator().manual_seed(0)
        starts = torch.randint(0, 128, (64, 1), generator=g)
        self.ids = (starts + torch.arange(16)) % 128

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model():
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _trainer(out_dir, layerwise):
    model = _model()
    accumulation = 2 if layerwise else 1
    # Layer-wise: the weights step inside backward and their gradients are freed there, so
    # the Trainer's step()/zero_grad() find nothing to do and gradient clipping cannot apply.
    opt = GaLoreAdamW(galore_param_groups(model, rank=8, update_proj_gap=GAP), lr=1e-2,
                      weight_decay=0.01, layerwise=layerwise, accumulation_steps=accumulation)
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=STEPS, save_steps=SAVE_AT, logging_steps=1,
        per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
        lr_scheduler_type="constant", max_grad_norm=0.0 if layerwise else 1.0,
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0)
    return transformers.Trainer(model=model, args=args, train_dataset=_Tokens(),
                                optimizers=(opt, None)), model, opt


def _losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


@pytest.mark.parametrize("layerwise", [False, True], ids=["normal", "layerwise"])
def test_trainer_resume_matches_uninterrupted(tmp_path, layerwise):
    torch.set_num_threads(1)
    trainer, model, opt = _trainer(tmp_path / "full", layerwise)
    start = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    final = [p.detach().clone() for p in model.parameters()]
    losses = _losses(trainer)
    opt.remove_hooks()
    assert len(losses) == STEPS and losses[STEPS] < losses[1]
    assert max(float((a - b).norm() / b.norm()) for a, b in zip(final, start)) > 1e-3
    # The projector refreshes (steps 0, 3, 6) are part of the saved and resumed state.
    assert any("proj_left" in s or "proj_right" in s for s in opt.state.values())

    checkpoint = tmp_path / "full" / f"checkpoint-{SAVE_AT}"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert state["state"], "the optimizer checkpoint is empty"

    resumed, model2, opt2 = _trainer(tmp_path / "full", layerwise)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    opt2.remove_hooks()
    for a, b in zip(model2.parameters(), final):
        assert torch.equal(a.detach(), b)
    resumed_losses = _losses(resumed)
    for step in range(SAVE_AT + 1, STEPS + 1):
        assert resumed_losses[step] == losses[step]
