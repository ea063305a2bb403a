"""Data parallelism for every GaLore mode: ``galore_ddp(model, optimizer)``.

DistributedDataParallel all-reduces ``.grad`` while backward runs and finishes when backward
returns. Two GaLore modes do not fit that: ``GaLoreLinear`` hands the optimizer a low-rank gradient
that is not ``.grad``, and the layer-wise mode steps each weight from its gradient hook, before
DDP's reduction has happened. For the parameters concerned the optimizer does the reduction
itself (``REDUCE_GROUP`` on the parameter), at the moment it uses the gradient: the low-rank
gradient on steps that do not refresh the projector (r/m of the full gradient's bytes), the full
one on refresh steps and for parameters without a projector. DDP is told to ignore exactly
those parameters and keeps the rest.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .galore import REDUCE_GROUP, _GaLoreBase

__all__ = ["galore_ddp"]


def galore_ddp(model: nn.Module, optimizer: _GaLoreBase, process_group=None, **ddp_kwargs):
    """Data-parallel ``model`` trained by the GaLore ``optimizer``, in any mode.

    Use it in place of ``DistributedDataParallel(model, **ddp_kwargs)`` (after
    ``init_process_group`` and after building the optimizer on ``model``'s parameters):

    * normal mode with ``nn.Linear``: plain DDP, returned as is;
    * ``fastllm.nn.GaLoreLinear`` weights in a GaLore group (normal or layer-wise mode): the
      optimizer all-reduces their gradient in ``step()`` (low-rank on non-refresh steps);
    * layer-wise mode: every parameter of the optimizer is averaged in its hook before it steps.

    Parameters the optimizer reduces are broadcast from rank 0 of ``process_group`` now (DDP does
    the same for its own). Returns the DDP module, or ``model`` itself (its parameters and
    buffers broadcast once) when the optimizer reduces every trainable parameter, since DDP
    refuses a module with nothing left to reduce; buffers are then not re-broadcast at each
    forward as DDP would.

    A single-process group here; under ``torchrun`` every rank runs the same lines:

    >>> import os, tempfile, torch.distributed as dist
    >>> store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    >>> dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    >>> model = nn.Sequential(fastllm.nn.GaLoreLinear(16, 16))
    >>> opt = fastllm.optim.GaLoreAdamW([{"params": [model[0].weight], "rank": 4},
    ...                                  {"params": [model[0].bias]}])
    >>> ddp = fastllm.optim.galore_ddp(model, opt)
    >>> type(ddp).__name__            # DDP keeps the bias, the optimizer reduces the weight
    'DistributedDataParallel'
    >>> ddp(torch.randn(4, 16)).sum().backward()
    >>> opt.step()
    >>> dist.destroy_process_group()
    """
    from ..nn.galore_linear import GaLoreLinear

    if not isinstance(model, nn.Module):
        raise TypeError(f"galore_ddp: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("galore_ddp: model is already DistributedDataParallel; pass the module "
                        "itself")
    if not isinstance(optimizer, _GaLoreBase):
        raise TypeError("galore_ddp: optimizer must be a fastllm GaLore optimizer, got "
                        f"{type(optimizer).__name__}")
    managed = {p: group for group in optimizer.param_groups for p in group["params"]}
    names = {p: name for name, p in model.named_parameters()}
    missing = [p for p in managed if p not in names]
    if missing:
        raise ValueError(f"galore_ddp: {len(missing)} of the optimizer's parameters are not "
                         "parameters of model")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("galore_ddp: call torch.distributed.init_process_group first")
    if optimizer.layerwise:
        reduced = [p for p in managed if p.requires_grad]
    else:
        galore_linear = {m.weight for m in model.modules() if isinstance(m, GaLoreLinear)}
        reduced = [p for p, group in managed.items()
                   if "rank" in group and p in galore_linear and p.requires_grad]
    src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
    with torch.no_grad():
        for p in reduced:
            setattr(p, REDUCE_GROUP, process_group if process_group is not None
                    else dist.group.WORLD)
            dist.broadcast(p.data, src=src, group=process_group)
    reduced_set = set(reduced)
    rest = [p for p in model.parameters() if p.requires_grad and p not in reduced_set]
    if not rest:
        with torch.no_grad():
            for b in model.buffers():
                dist.broadcast(b, src=src, group=process_group)
        return model
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, [names[p] for p in reduced])
    return nn.parallel.DistributedDataParallel(model, process_group=process_group, **ddp_kwargs)
