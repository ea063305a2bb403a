"""GaLoreLinear: an ``nn.Linear`` whose backward hands GaLore the projected weight gradient.

The weight gradient of a linear layer is ``G = dY^T X`` (out x in, summed over tokens). GaLore only
ever uses ``left^T G right^T``; computed as ``(dY left)^T (X right^T)`` it costs two thin GEMMs
(``2 T r (m + n)`` FLOPs instead of ``2 T m n``) and the m x n gradient is never allocated. The
optimizer publishes, after each step, the projector the next backward may use; on the steps that
refresh the projector it publishes none and this layer produces the ordinary full gradient.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..optim.galore import LOWRANK_GRAD, NEXT_PROJECTOR, REDUCE_GROUP, data_parallel_unhandled

__all__ = ["GaLoreLinear", "to_galore_linear"]


class _GaLoreLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x)
        # The Parameter object itself (not an unpacked saved copy): the low-rank gradient and
        # the optimizer's published projector are attributes of it.
        ctx.weight = weight
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (x,) = ctx.saved_tensors
        weight = ctx.weight
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        grad_bias = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            projector = getattr(weight, NEXT_PROJECTOR, None)
            if projector is None:
                grad_weight = dy.t() @ x2
            else:
                if getattr(weight, REDUCE_GROUP, None) is None and data_parallel_unhandled():
                    raise RuntimeError(
                        "GaLoreLinear under torch.distributed: its weight gradient is produced "
                        "low-rank, which DistributedDataParallel does not all-reduce, so the "
                        "ranks would diverge. Wrap the model with fastllm.optim.galore_ddp(model, "
                        "optimizer) instead of DistributedDataParallel (the optimizer then "
                        "all-reduces the low-rank gradient), or use nn.Linear")
                left, right = projector
                a = dy @ left.to(dy.dtype) if left is not None else dy
                b = x2 @ right.to(x2.dtype).t() if right is not None else x2
                low = (a.t() @ b).float()
                previous = getattr(weight, LOWRANK_GRAD, None)
                # Returning None still runs the weight's post-accumulate-grad hooks (with
                # .grad None), which is how the layer-wise mode sees this micro-batch.
                setattr(weight, LOWRANK_GRAD, low if previous is None else previous.add_(low))
        return grad_x, grad_weight, grad_bias


class GaLoreLinear(nn.Linear):
    """Drop-in for ``nn.Linear`` (same parameters, same forward). Its weight gradient is produced
    already projected when a GaLore optimizer (``fastllm.optim.GaLoreAdamW`` and friends, normal or
    layer-wise mode) has published a projector for the next step; otherwise it is the usual
    ``weight.grad``. Under data parallelism wrap the model with ``fastllm.optim.galore_ddp``
    (plain DistributedDataParallel only all-reduces ``.grad``, and this layer refuses to run
    under it); under FSDP2 it produces the ordinary gradient.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> layer = fastllm.nn.GaLoreLinear(32, 16)
        >>> opt = fastllm.optim.GaLoreAdamW([{"params": [layer.weight], "rank": 4}])
        >>> layer(torch.randn(8, 32)).sum().backward()    # step 0 refreshes: full gradient
        >>> tuple(layer.weight.grad.shape)
        (16, 32)
        >>> opt.step(); opt.zero_grad()
        >>> layer(torch.randn(8, 32)).sum().backward()    # now produced already projected
        >>> layer.weight.grad is None
        True
        >>> opt.step()                                      # uses the rank-4 gradient
    """

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return _GaLoreLinearFunction.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "GaLoreLinear":
        """A GaLoreLinear sharing ``linear``'s parameters (no copy).

        >>> linear = nn.Linear(8, 4)
        >>> layer = fastllm.nn.GaLoreLinear.from_linear(linear)
        >>> x = torch.ones(1, 8)
        >>> layer.weight is linear.weight, torch.equal(layer(x), linear(x))
        (True, True)
        """
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight = linear.weight
        module.bias = linear.bias
        return module


def to_galore_linear(model: nn.Module, target_modules: str | Iterable[str] = "all-linear",
                     exclude: Iterable[str] = ("lm_head",)) -> int:
    """Replace matching ``nn.Linear`` modules of ``model`` in place by GaLoreLinear (same
    parameters); ``target_modules`` as in ``fastllm.optim.galore_param_groups``. Returns the count.

    >>> model = nn.ModuleDict({"up": nn.Linear(8, 8), "lm_head": nn.Linear(8, 4)})
    >>> fastllm.nn.to_galore_linear(model)          # every nn.Linear but lm_head
    1
    >>> type(model["up"]).__name__, type(model["lm_head"]).__name__
    ('GaLoreLinear', 'Linear')
    """
    excluded = set(exclude)
    if isinstance(target_modules, str) and target_modules != "all-linear":
        pattern = re.compile(target_modules)
        wanted = lambda name: bool(pattern.search(name))  # noqa: E731
    elif isinstance(target_modules, str):
        wanted = lambda name: name.split(".")[-1] not in excluded  # noqa: E731
    else:
        targets = list(target_modules)
        wanted = lambda name: any(name == t or name.endswith("." + t) for t in targets)  # noqa
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and wanted(full):
                setattr(module, child_name, GaLoreLinear.from_linear(child))
                replaced += 1
    return replaced
