"""GaLoreLinear: the projected weight gradient straight from backward, same training as nn.Linear;
and a small Llama-style model pretrained on real text with GaLore against AdamW."""

import pytest
import torch
from torch import nn

from fastllm.nn import GaLoreLinear, to_galore_linear
from fastllm.optim import GaLoreAdamW, GaLoreAdamW8bit, galore_param_groups


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 48)
        self.down = nn.Linear(48, 32)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def make_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 5, 32, generator=g), torch.randn(4, 5, 32, generator=g))
            for _ in range(n)]


def run(model, opt, data, accumulation=1, check=None):
    for i in range(0, len(data), accumulation):
        for x, y in data[i:i + accumulation]:
            (((model(x) - y) ** 2).mean() / accumulation).backward()
        if check:
            check(i // accumulation)
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_galore_linear_trains_like_linear(proj_type, cls, accumulation):
    torch.manual_seed(0)
    base = MLP()
    # 10 steps, refreshes at 0 and 5: a later refresh would take the SVD of a gradient that
    # differs in the last bits, and near-equal singular values at the rank cut turn that into a
    # visibly different subspace (true of any two GEMM orders, not a defect of either).
    data = make_data(10 * accumulation)
    results = []
    for fused in (False, True):
        model = MLP()
        model.load_state_dict(base.state_dict())
        if fused:
            assert to_galore_linear(model) == 2
        opt = cls(galore_param_groups(model, rank=8, update_proj_gap=5, proj_type=proj_type),
                  lr=1e-2, weight_decay=0.01)
        full_grad_steps = []

        def check(step):
            if fused:
                full_grad_steps.append(model.up.weight.grad is not None)

        run(model, opt, data, accumulation, check)
        results.append([p.detach().clone() for p in model.parameters()])
        if fused:
            # The full m x n gradient exists only on the refresh steps (0 and 5).
            assert full_grad_steps == [s % 5 == 0 for s in range(10)]
    # 8-bit codes can flip at a rounding boundary on last-bit differences: 1% of one lr step.
    tol = 1e-5 if cls is GaLoreAdamW else 1e-4
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_galore_linear_layerwise():
    torch.manual_seed(1)
    base = MLP()
    data = make_data(8)
    results = []
    for fused in (False, True):
        model = MLP()
        model.load_state_dict(base.state_dict())
        if fused:
            to_galore_linear(model)
        opt = GaLoreAdamW(galore_param_groups(model, rank=8, update_proj_gap=3), lr=1e-2,
                          layerwise=True, accumulation_steps=2)
        run(model, opt, data, 2)
        assert {s["step"] for s in opt.state.values()} == {4}
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_galore_linear_is_a_linear():
    linear = nn.Linear(7, 5)
    module = GaLoreLinear.from_linear(linear)
    assert module.weight is linear.weight and isinstance(module, nn.Linear)
    x = torch.randn(3, 7, requires_grad=True)
    torch.testing.assert_close(module(x), linear(x))
    # Without an optimizer's projector the backward is the ordinary one.
    torch.autograd.gradcheck(lambda x, w, b: GaLoreLinear.from_linear(_with(w, b))(x),
                             (x.double().detach().requires_grad_(),
                              linear.weight.double().detach().requires_grad_(),
                              linear.bias.double().detach().requires_grad_()))


def _with(weight, bias):
    linear = nn.Linear(weight.shape[1], weight.shape[0]).double()
    del linear.weight, linear.bias
    linear.weight, linear.bias = weight, bias
    return linear


def _char_llama(vocab):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=176,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config)


def test_llama_pretraining_on_shakespeare_galore_close_to_adamw(shakespeare):
    # A tiny Llama on character tokens of real text: GaLore (rank d/4 on every projection, scale
    # 0.25 as in the paper, the same lr) ends within a few percent of AdamW's loss (mean of the
    # last 10 steps) after the same 100 steps on the same batches.
    chars = sorted(set(shakespeare))
    ids = torch.tensor([chars.index(c) for c in shakespeare[:40000]])
    steps, batch, seq = 100, 8, 32
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, ids.numel() - seq - 1, (steps, batch), generator=g)
    torch.manual_seed(0)
    base = _char_llama(len(chars))
    losses = {}
    for name in ("adamw", "galore"):
        model = _char_llama(len(chars))
        model.load_state_dict(base.state_dict())
        if name == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        else:
            opt = GaLoreAdamW(galore_param_groups(model, rank=16, update_proj_gap=20, scale=0.25),
                              lr=1e-2)
        tail = []
        for step in range(steps):
            x = torch.stack([ids[s:s + seq + 1] for s in starts[step]])
            loss = model(input_ids=x[:, :-1], labels=x[:, 1:]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step >= steps - 10:
                tail.append(loss.item())
        losses[name] = sum(tail) / len(tail)
    start = torch.log(torch.tensor(float(len(chars)))).item()
    # both actually learned (AdamW ends at 0.751 of the start on transformers 5.x's init)
    assert losses["adamw"] < 0.8 * start
    assert abs(losses["galore"] - losses["adamw"]) / losses["adamw"] < 0.05, losses
