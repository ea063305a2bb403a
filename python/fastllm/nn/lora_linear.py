"""LoRALinear: an nn.Linear whose output gets the running batch's LoRA adapters added in place."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LoRALinear(nn.Module):
    """Drop-in replacement for an ``nn.Linear`` serving many LoRA adapters at once.

    The base layer is kept as is (``self.base``, frozen). Outside a batch set up by an
    :class:`~fastllm.lora.AdapterManager` (``with manager.batch(names): ...``) the module is
    exactly the base layer. Inside one, every sequence of the batch gets its own adapter (or none),
    applied by the paged ``lora_shrink`` / ``lora_expand`` kernels straight from the page pool.

    Args:
        base: the ``nn.Linear`` to wrap; its weight and bias are frozen, never copied.
        manager: the :class:`~fastllm.lora.AdapterManager` that owns the adapters.
        index: this module's id in the manager's row tables.

    Examples:
        >>> from collections import OrderedDict
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(OrderedDict(q_proj=nn.Linear(16, 16)))
        >>> manager = fastllm.lora.AdapterManager(model, ["q_proj"], max_rank=4, num_pages=8,
        ...                                       page_size=64)
        >>> model.q_proj
        LoRALinear(
          in_features=16, out_features=16, index=0
          (base): Linear(in_features=16, out_features=16, bias=True)
        )
        >>> a, b = torch.randn(4, 16), torch.randn(16, 4)
        >>> manager.load("fr", {"q_proj.lora_A.weight": a, "q_proj.lora_B.weight": b},
        ...              {"lora_alpha": 8})                  # scaling alpha / r = 2
        >>> x = torch.randn(2, 3, 16)                           # 2 sequences of 3 tokens
        >>> base = model.q_proj.base(x)
        >>> torch.equal(model(x), base)                         # outside a batch: the base layer
        True
        >>> with manager.batch(["fr", None]):                   # "fr" on sequence 0 only
        ...     y = model(x)
        >>> torch.allclose(y[0], base[0] + 2 * x[0] @ a.T @ b.T, atol=1e-5)
        True
        >>> torch.equal(y[1], base[1])
        True
        >>> manager.close()                                     # the nn.Linear is back
        >>> type(model.q_proj).__name__
        'Linear'
    """

    def __init__(self, base: nn.Linear, manager=None, index: int = -1) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        # Not a submodule: the manager holds the model, not the other way round.
        object.__setattr__(self, "_manager", manager)
        self._index = index

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.base.weight, self.base.bias)
        state = None if self._manager is None else self._manager._active
        if state is None:
            return y
        return state.apply(self._index, x, y)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, index={self._index}"
