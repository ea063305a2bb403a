"""Where a model's MLPs are (Llama-family ``mlp`` modules, OPT's fc1/fc2 on the layer), the
sparse views installed over them, and the activations collected from them for calibration."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._progress import Progress, check_progress
from ..nn.sparse_mlp import SparseMLP



# ---- finding MLPs --------------------------------------------------------------------------------


@dataclass

class _Site:
    """Where one MLP lives: Llama family `layer.mlp`, or OPT's fc1/activation_fn/fc2 on the layer."""
    layer: nn.Module
    kind: str  # "llama" or "opt"

    @property
    def mlp_like(self) -> nn.Module:
        return self.layer.mlp if self.kind == "llama" else self.layer

    @property
    def input_module(self) -> nn.Module:
        # The module whose first positional input is the MLP input.
        if self.kind == "llama":
            return self.layer.mlp
        fc1 = self.layer.fc1
        return fc1 if not isinstance(fc1, SparseMLP) else fc1


def find_mlps(model: nn.Module) -> list[_Site]:
    """The model's MLPs in layer order (dense or already sparsified).

    >>> import transformers
    >>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    ...     vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...     num_attention_heads=4))
    >>> sites = fastllm.sparse.find_mlps(model)
    >>> len(sites) == model.config.num_hidden_layers, sites[0].kind
    (True, 'llama')
    >>> sites[1].mlp_like is model.model.layers[1].mlp
    True
    """
    sites = []
    for module in model.modules():
        mlp = getattr(module, "mlp", None)
        if isinstance(mlp, nn.Module) and (isinstance(mlp, SparseMLP) or all(
                hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))):
            sites.append(_Site(module, "llama"))
        elif all(hasattr(module, n) for n in ("fc1", "fc2", "activation_fn")):
            sites.append(_Site(module, "opt"))
    if not sites:
        raise TypeError(f"fastllm.sparse: found no Llama-style (gate/up/down) or OPT-style "
                        f"(fc1/fc2) MLP in {type(model).__name__}")
    return sites


def _dense_mlp(site: _Site) -> nn.Module:
    """The dense module a SparseMLP wraps (or the dense MLP itself)."""
    if site.kind == "llama":
        return site.layer.mlp.wrapped if isinstance(site.layer.mlp, SparseMLP) else site.layer.mlp
    return site.layer.fc1.wrapped if isinstance(site.layer.fc1, SparseMLP) else site.layer


def _make_view(site: _Site) -> SparseMLP:
    """A SparseMLP over the site's dense weights (not installed), for computing hidden values."""
    if site.kind == "llama":
        return SparseMLP(_dense_mlp(site))
    fc1, fc2, act = _opt_parts(site)
    holder = nn.Module()
    holder.fc1, holder.fc2, holder.activation_fn = fc1, fc2, act
    return SparseMLP(holder)


def _opt_parts(site: _Site):
    if isinstance(site.layer.fc1, SparseMLP):
        return site.layer.fc1._opt_restore
    return site.layer.fc1, site.layer.fc2, site.layer.activation_fn


# ---- dense activations ---------------------------------------------------------------------------


def collect_mlp_data(model: nn.Module, ids: Tensor, fn, batch_size: int = 4, *,
                     progress: bool | None = None) -> list:
    """Run the dense model on ``ids`` and call ``fn(layer_index, view, x)`` on each MLP input.

    ``view`` is a :class:`SparseMLP` over that layer's dense weights (``view.dense_hidden(x)``
    gives the hidden values). Returns a per-layer list of lists of ``fn``'s results.
    ``progress`` reports the batches run (True, False, or None: only when stderr is a terminal).

    The mean ``|h|`` of every MLP's hidden neurons over the calibration tokens:

    >>> import transformers
    >>> _ = torch.manual_seed(0)
    >>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    ...     vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...     num_attention_heads=4)).eval()
    >>> ids = torch.randint(64, (4, 32))               # calibration token ids
    >>> per_layer = fastllm.sparse.collect_mlp_data(
    ...     model, ids, lambda i, view, x: view.dense_hidden(x).abs().mean(0), batch_size=2)
    >>> len(per_layer), len(per_layer[0]), per_layer[0][0].shape   # layers, batches, neurons
    (2, 2, torch.Size([128]))
    >>> means = [torch.stack(chunks).mean(0) for chunks in per_layer]
    """
    show = check_progress(progress, "fastllm.sparse.collect_mlp_data")
    check_token_ids(ids, "collect_mlp_data", "ids")
    check_positive_int(batch_size, "collect_mlp_data", "batch_size")
    with Progress(_batch_count(ids, batch_size), "collecting MLP inputs", show,
                  unit="batch") as bar:
        return _collect(model, ids, fn, batch_size, bar)


def _batch_count(ids: Tensor, batch_size: int) -> int:
    """Forward passes ``_collect`` makes over ``ids`` (0 without ids)."""
    if ids is None:
        return 0
    return -(-int(ids.shape[0]) // batch_size)


@torch.no_grad()
def _collect(model: nn.Module, ids: Tensor, fn, batch_size: int, bar: Progress) -> list:
    """``collect_mlp_data``, one step of ``bar`` per batch."""
    was_sparse = any(isinstance(m, SparseMLP) for m in model.modules())
    saved = densify(model) if was_sparse else None
    sites = find_mlps(model)
    views = [_make_view(s) for s in sites]
    results: list[list] = [[] for _ in sites]
    handles = []
    for i, site in enumerate(sites):
        module = site.layer.mlp if site.kind == "llama" else site.layer.fc1

        def hook(_m, args, i=i):
            x = args[0].reshape(-1, args[0].shape[-1])
            results[i].append(fn(i, views[i], x))
        handles.append(module.register_forward_pre_hook(hook))
    try:
        device = next(model.parameters()).device
        for start in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[start:start + batch_size].to(device), use_cache=False)
            bar.update()
    finally:
        for h in handles:
            h.remove()
        if saved is not None:
            _reinstall(model, saved)
    return results


# ---- threshold mode ------------------------------------------------------------------------------


def check_sparsity(sparsity, where: str) -> None:
    """A sparsity (the share of neurons skipped), or a list with one per layer, each in [0, 1]."""
    values = sparsity if isinstance(sparsity, (list, tuple)) else [sparsity]
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"fastllm.sparse.{where}: sparsity must be a number in [0, 1] (the "
                             f"share of neurons skipped), or a list of them, got {value!r}")


def check_token_ids(ids, where: str, name: str = "calibration_ids") -> None:
    """Calibration token ids: a 2-D integer tensor ``[batch, seq]`` with at least one token
    (a float or 1-D tensor would otherwise fail deep inside the model's embedding)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"fastllm.sparse.{where}: {name} must be a 2-D integer tensor of token "
                        f"ids [batch, seq], got {type(ids).__name__}")
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype.is_complex \
            or ids.dtype == torch.bool or ids.numel() == 0:
        raise ValueError(f"fastllm.sparse.{where}: {name} must be a 2-D integer tensor of token "
                         f"ids [batch, seq] with at least one token, got {ids.dtype} of shape "
                         f"{tuple(ids.shape)}")


def check_positive_int(value, where: str, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"fastllm.sparse.{where}: {name} must be an int >= {minimum}, "
                         f"got {value!r}")


def _per_layer(value, n_layers: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n_layers:
            raise ValueError(f"fastllm.sparse: {name} has {len(value)} entries for {n_layers} layers")
        return list(value)
    return [value] * n_layers


# ---- predictors ----------------------------------------------------------------------------------


def _model_identity(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "") or ""
    sites = find_mlps(model)
    first = _make_view(sites[0])
    return {
        "model_name": str(name),
        "model_type": str(getattr(config, "model_type", type(model).__name__)),
        "hidden_size": int(first.up_w.shape[1]),
        "n_neurons": int(first.n_neurons),
        "n_layers": len(sites),
    }


# ---- swapping modules ----------------------------------------------------------------------------


def _install(site: _Site, sparse: SparseMLP) -> None:
    if site.kind == "llama":
        site.layer.mlp = sparse
    else:
        sparse._opt_restore = (site.layer.fc1, site.layer.fc2, site.layer.activation_fn)
        site.layer.fc1, site.layer.fc2, site.layer.activation_fn = sparse, nn.Identity(), nn.Identity()


def _reinstall(model: nn.Module, saved: list) -> None:
    for site, sparse in zip(find_mlps(model), saved):
        _install(site, sparse)


def densify(model: nn.Module) -> list[SparseMLP]:
    """Put every original dense MLP back (the same module objects); returns the removed ones.

    >>> import transformers
    >>> _ = torch.manual_seed(0)
    >>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    ...     vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...     num_attention_heads=4)).eval()
    >>> ids = torch.randint(64, (4, 32))               # calibration token ids
    >>> dense = model(ids).logits
    >>> _ = fastllm.sparse.sparsify(model, 0.5, mode="oracle")
    >>> removed = fastllm.sparse.densify(model)      # the SparseMLPs it took out
    >>> len(removed), type(model.model.layers[0].mlp).__name__
    (2, 'LlamaMLP')
    >>> torch.equal(model(ids).logits, dense)        # the original modules, unchanged
    True
    """
    removed = []
    for site in find_mlps(model):
        if site.kind == "llama" and isinstance(site.layer.mlp, SparseMLP):
            removed.append(site.layer.mlp)
            site.layer.mlp = site.layer.mlp.wrapped
        elif site.kind == "opt" and isinstance(site.layer.fc1, SparseMLP):
            sparse = site.layer.fc1
            removed.append(sparse)
            site.layer.fc1, site.layer.fc2, site.layer.activation_fn = sparse._opt_restore
    return removed
