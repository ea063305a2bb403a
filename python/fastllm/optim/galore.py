"""GaLore optimizers: Adam (fp32 or 8-bit moments) and Adafactor in a low-rank gradient subspace.

Drop-in for galore-torch: parameter groups carrying ``rank`` are projected, with galore-torch's keys
``update_proj_gap``, ``scale`` and ``proj_type``; other groups are ordinary (AdamW/Adafactor).
Per projected weight the state is plain tensors (projectors, moments, 8-bit codes), so
``state_dict()`` loads with ``torch.load(weights_only=True)`` and a resumed run is bit-identical.

Extra group keys (all optional): ``svd`` (``"full"``, galore-torch's, or ``"randomized"``: a seeded
randomized range finder, much cheaper), ``svd_oversample`` and ``svd_niter`` for it,
``reproject_moments`` (carry the first moment into the new subspace at a refresh instead of keeping
it as galore-torch does), ``proj_dtype`` (``"float32"`` or ``"bfloat16"``: storage of the projector),
``check_finite`` (skip a step whose gradient is not finite, default True).

Host synchronisation: on CUDA a step that does not refresh the projector reads nothing back from
the device. The finiteness check is then decided on the device (the step's kernels receive a
``found_inf`` flag and leave the weight and moments unchanged when it is set), so the warning for
a skipped step is deferred: it is given at the parameter's next refresh step, or when you call
:meth:`skipped_steps <GaLoreAdamW.skipped_steps>`; and a skipped step still counts in the
parameter's ``step`` (bias correction and the refresh schedule run on, which the host cannot
avoid without reading the flag). On CPU the check stays on the host: the warning comes at once
and a skipped step does not count. Refresh steps synchronise on every device: the SVD
(``torch.linalg.svd`` checks its convergence on the host) and the finiteness checks of the
gradient and of the new projector.
"""

from __future__ import annotations

import math
import re
import warnings
import zlib
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from .._reference.galore import (PROJ_TYPES, dequantize_blockwise_reference,
                                 projection_sides, quantize_blockwise_reference)
from .._ops import galore as _ops
from . import _galore_sharded as _sharded

__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor", "galore_param_groups"]

_PROJ_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_GALORE_DEFAULTS = dict(update_proj_gap=200, scale=0.25, proj_type="std", svd="full",
                        svd_oversample=8, svd_niter=2, reproject_moments=False,
                        proj_dtype="float32", check_finite=True)

# Attributes a projected weight carries between backward and step (see fastllm.nn.GaLoreLinear
# and the layer-wise mode): the accumulated low-rank gradient, and the projector the next backward
# may project with (None when the next step refreshes and needs the full gradient).
LOWRANK_GRAD = "_galore_lowrank_grad"
NEXT_PROJECTOR = "_galore_projector"
# Set by fastllm.optim.galore_ddp on the parameters whose gradients the optimizer all-reduces
# itself (DDP is told to ignore them): the process group to average over.
REDUCE_GROUP = "_galore_reduce_group"


def _average(t: Tensor, process_group) -> Tensor:
    """All-reduce ``t`` in place to the mean over ``process_group``."""
    import torch.distributed as dist
    dist.all_reduce(t, group=process_group)
    return t.div_(dist.get_world_size(process_group))


def data_parallel_unhandled() -> bool:
    """Whether this process is one of several in torch.distributed (where a gradient that DDP
    does not all-reduce would silently differ between ranks)."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GaLoreNumericalWarning(RuntimeWarning):
    """A projector refresh or a step was skipped because of a non-finite gradient or an SVD that
    did not converge.

    On CPU the warning comes at the step itself, and the skipped step changes nothing:

    >>> import warnings
    >>> w = nn.Parameter(torch.ones(8, 8))
    >>> opt = fastllm.optim.GaLoreAdamW([{"params": [w], "rank": 2}])
    >>> w.grad = torch.full((8, 8), float("nan"))
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     opt.step()
    >>> [type(c.message).__name__ for c in caught], torch.equal(w, torch.ones(8, 8))
    (['GaLoreNumericalWarning'], True)
    """


def _param_label(group: dict, index: int, group_index: int) -> str:
    names = group.get("param_names")
    name = names[index] if names else f"#{index}"
    return f"parameter {name} (group {group_index})"


def _randomized_svd(matrix: Tensor, rank: int, oversample: int, niter: int,
                    generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Leading ``rank`` left and right singular vectors by a randomized range finder with ``niter``
    power iterations (Halko et al.), seeded so a resumed run draws the same projector."""
    m, n = matrix.shape
    k = min(rank + oversample, m, n)
    omega = torch.randn(n, k, generator=generator, device=matrix.device, dtype=matrix.dtype)
    q = torch.linalg.qr(matrix @ omega).Q
    for _ in range(niter):
        q = torch.linalg.qr(matrix.t() @ q).Q
        q = torch.linalg.qr(matrix @ q).Q
    u_small, _, vh = torch.linalg.svd(q.t() @ matrix, full_matrices=False)
    return (q @ u_small)[:, :rank], vh[:rank]


class _GaLoreBase(torch.optim.Optimizer):
    """Projector management, validation, layer-wise stepping; subclasses do the update."""

    def __init__(self, params, defaults: dict, layerwise: bool, accumulation_steps: int):
        super().__init__(params, defaults)
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        self.layerwise = layerwise
        self.accumulation_steps = accumulation_steps
        self._micro_batches: dict[Tensor, int] = {}
        # Steps skipped on the device for a non-finite gradient and not yet reported, per
        # parameter: an int32 device counter (reading it synchronises, so it waits).
        self._skipped: dict[Tensor, Tensor] = {}
        self._hooks = []
        # FSDP2 (DTensor) parameters: their shard layout, and the rank that runs each SVD.
        self._shard_info: dict = {}
        self._owners: dict = {}
        for gi, group in enumerate(self.param_groups):
            if "rank" in group:
                self._validate_galore_group(group, gi)
        if layerwise:
            self._install_layerwise_hooks()

    # ---- validation ------------------------------------------------------------------------------

    def _validate_galore_group(self, group: dict, gi: int) -> None:
        for key, value in _GALORE_DEFAULTS.items():
            group.setdefault(key, value)
        if group["proj_type"] not in PROJ_TYPES:
            raise ValueError(f"GaLore group {gi}: unknown proj_type {group['proj_type']!r}; "
                             f"expected one of {', '.join(PROJ_TYPES)}")
        if group["svd"] not in ("full", "randomized"):
            raise ValueError(f"GaLore group {gi}: svd must be 'full' or 'randomized', got "
                             f"{group['svd']!r}")
        if group["proj_dtype"] not in _PROJ_DTYPES:
            raise ValueError(f"GaLore group {gi}: proj_dtype must be one of "
                             f"{list(_PROJ_DTYPES)}, got {group['proj_dtype']!r}")
        if not isinstance(group["update_proj_gap"], int) or group["update_proj_gap"] < 1:
            raise ValueError(f"GaLore group {gi}: update_proj_gap must be a positive int, got "
                             f"{group['update_proj_gap']!r}")
        rank = group["rank"]
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"GaLore group {gi}: rank must be a positive int, got {rank!r}")
        for i, p in enumerate(group["params"]):
            label = _param_label(group, i, gi)
            if p.dim() != 2:
                raise ValueError(f"GaLore: {label} has shape {tuple(p.shape)}; only 2-D weights "
                                 "can be projected, put it in a group without 'rank'")
            if rank > min(p.shape):
                raise ValueError(f"GaLore: rank {rank} exceeds min(m, n) = {min(p.shape)} for "
                                 f"{label} of shape {tuple(p.shape)}")
            if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise TypeError(f"GaLore: {label} has dtype {p.dtype}; expected float32, "
                                "float16 or bfloat16")

    # ---- projectors ------------------------------------------------------------------------------

    def _group_of(self, p: Tensor) -> tuple[dict, int, int]:
        for gi, group in enumerate(self.param_groups):
            for i, q in enumerate(group["params"]):
                if q is p:
                    return group, gi, i
        raise KeyError("parameter is not managed by this optimizer")

    def _svd(self, grad: Tensor, group: dict, state: dict, step: int):
        matrix = grad.float()
        if group["svd"] == "full":
            u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
            return u[:, :group["rank"]], vh[:group["rank"]]
        generator = torch.Generator(device=matrix.device)
        generator.manual_seed(state["svd_seed"] * 1_000_003 + step)
        return _randomized_svd(matrix, group["rank"], group["svd_oversample"], group["svd_niter"],
                               generator)

    def _refresh_projector(self, p: Tensor, grad: Tensor, group: dict, state: dict, step: int,
                           label: str) -> bool:
        """Recompute the projector from ``grad``; on failure keep the old one. Returns whether a
        projector is available."""
        new = self._compute_projector(tuple(p.shape), grad, group, state, step, label)
        if new is None:
            return "proj_left" in state or "proj_right" in state
        self._install_projector(state, group, *new)
        return True

    def _compute_projector(self, shape: tuple[int, int], grad: Tensor, group: dict, state: dict,
                           step: int, label: str, stacklevel: int = 5):
        """``(left, right)`` from the SVD of the full gradient ``grad`` (``None`` for an unused
        side), or ``None`` (with a warning) when the gradient or the SVD is not finite."""
        if group["check_finite"] and not bool(torch.isfinite(grad).all()):
            warnings.warn(f"GaLore: non-finite gradient for {label} at step {step}: "
                          "keeping the previous projector", GaLoreNumericalWarning,
                          stacklevel=stacklevel)
            return None
        try:
            u, vh = self._svd(grad, group, state, step)
        except (torch.linalg.LinAlgError, RuntimeError) as error:
            warnings.warn(f"GaLore: SVD failed for {label} at step {step} ({error}): keeping the "
                          "previous projector", GaLoreNumericalWarning, stacklevel=stacklevel)
            return None
        if not (bool(torch.isfinite(u).all()) and bool(torch.isfinite(vh).all())):
            warnings.warn(f"GaLore: SVD returned non-finite vectors for {label} at step {step}: "
                          "keeping the previous projector", GaLoreNumericalWarning,
                          stacklevel=stacklevel)
            return None
        use_left, use_right = projection_sides(shape, group["proj_type"])
        dtype = _PROJ_DTYPES[group["proj_dtype"]]
        new_left = u.to(dtype).contiguous() if use_left else None
        new_right = vh.to(dtype).contiguous() if use_right else None
        return new_left, new_right

    def _install_projector(self, state: dict, group: dict, new_left, new_right) -> None:
        has_old = "proj_left" in state or "proj_right" in state
        if group["reproject_moments"] and has_old and self._has_moments(state):
            self._reproject_moments(state, new_left, new_right)
        if new_left is not None:
            state["proj_left"] = new_left
        if new_right is not None:
            state["proj_right"] = new_right

    @staticmethod
    def _transition(state: dict, new_left, new_right) -> tuple[Tensor | None, Tensor | None]:
        c_left = (new_left.float().t() @ state["proj_left"].float()
                  if new_left is not None else None)
        c_right = (state["proj_right"].float() @ new_right.float().t()
                   if new_right is not None else None)
        return c_left, c_right

    @staticmethod
    def _apply_transition(x: Tensor, c_left, c_right, square: bool) -> Tensor:
        # The first moment maps linearly into the new basis; the second moment maps through the
        # squared transition, which keeps it non-negative (an estimate, not an identity).
        if c_left is not None:
            x = (c_left.square() if square else c_left) @ x
        if c_right is not None:
            x = x @ (c_right.square() if square else c_right)
        return x

    def _has_moments(self, state: dict) -> bool:
        raise NotImplementedError

    def _reproject_moments(self, state: dict, new_left, new_right) -> None:
        raise NotImplementedError

    @staticmethod
    def _projectors(state: dict) -> tuple[Tensor | None, Tensor | None]:
        return state.get("proj_left"), state.get("proj_right")

    # ---- the step ----------------------------------------------------------------------------

    def _needs_refresh(self, group: dict, state: dict, step: int) -> bool:
        if "rank" not in group:
            return False
        left, right = self._projectors(state)
        return step % group["update_proj_gap"] == 0 or (left is None and right is None)

    @staticmethod
    def _checks_on_device(p: Tensor) -> bool:
        """Whether ``p``'s non-refresh steps decide finiteness on the device (no host sync)."""
        return p.is_cuda

    def _gather_gradient(self, p: Tensor, group: dict, state: dict, step: int, label: str):
        """The gradient to use: ``(grad, grad_is_projected)`` or ``(None, _)`` to skip ``p``."""
        full = p.grad
        low = getattr(p, LOWRANK_GRAD, None)
        process_group = getattr(p, REDUCE_GROUP, None)
        if full is None and low is None:
            return None, False
        if "rank" not in group:
            return (full if process_group is None else _average(full, process_group)), False
        left, right = self._projectors(state)
        if self._needs_refresh(group, state, step):
            if full is None:
                raise RuntimeError(
                    f"GaLore: {label} needs its full gradient at step {step} to refresh the "
                    "projector, but only a low-rank gradient was produced")
            if low is not None:
                # A refresh needs the whole gradient: fold the accumulated low-rank part back.
                back = torch.zeros_like(full, dtype=torch.float32)
                _ops.galore_project_back_(back, low, left, right, alpha=1.0)
                full = full + back.to(full.dtype)
                low = None
            if process_group is not None:
                full = _average(full, process_group)
            if not self._refresh_projector(p, full, group, state, step, label):
                return None, False
            return full, False
        if process_group is not None:
            # Data parallel without DDP's reduction: all-reduce the low-rank gradient, r/m of the
            # full one's bytes (the gradient is linear, so projecting then averaging is the same).
            projected = _ops.galore_project(full, left, right) if full is not None else None
            if low is not None:
                projected = low if projected is None else projected + low
            return _average(projected, process_group), True
        if full is not None and low is not None:
            return _ops.galore_project(full, left, right) + low, True
        if low is not None:
            return low, True
        return full, False

    def _finite_or_warn(self, grad: Tensor, group: dict, step: int, label: str) -> bool:
        # Host check (synchronises on CUDA): CPU tensors, and refresh steps. The sum is one
        # vectorised pass with nothing allocated, where isfinite(grad).all() writes a bool per
        # element and reads it back (on CPU that cost more than the Adam update): a NaN or inf
        # anywhere makes the sum NaN or inf. A finite gradient whose sum overflows (elements
        # near 3e38 / numel, far past where its square overflows Adam's second moment) is
        # skipped too.
        if not group.get("check_finite", True) or bool(torch.isfinite(grad.sum())):
            return True
        warnings.warn(f"GaLore: non-finite gradient for {label} at step {step}: step skipped, "
                      "weights and moments unchanged", GaLoreNumericalWarning, stacklevel=4)
        return False

    def _found_inf(self, p: Tensor, grad: Tensor) -> Tensor:
        """A device flag, set when ``grad`` is not finite, counted for :meth:`skipped_steps`."""
        found_inf = torch.isfinite(grad).all().logical_not()
        counter = self._skipped.get(p)
        if counter is None:
            counter = self._skipped[p] = torch.zeros((), dtype=torch.int32, device=grad.device)
        counter.add_(found_inf)
        return found_inf

    def _report_skipped(self, p: Tensor, label: str, stacklevel: int) -> int:
        counter = self._skipped.pop(p, None)
        count = 0 if counter is None else int(counter)  # synchronises
        if count:
            warnings.warn(f"GaLore: non-finite gradient for {label}: {count} step(s) skipped on "
                          "the device since the last report, weights and moments unchanged "
                          "(each still counted in the step count)", GaLoreNumericalWarning,
                          stacklevel=stacklevel)
        return count

    def skipped_steps(self) -> dict[str, int]:
        """Report the steps skipped on the device (CUDA) for a non-finite gradient since the last
        report: a :class:`GaLoreNumericalWarning` per parameter, and ``{label: count}`` for those
        with any. Synchronises with the device: call it where you would anyway (logging).
        Steps skipped by the host check (CPU, refresh steps) were reported when they happened.
        Counts not yet reported are not part of ``state_dict()``."""
        out = {}
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p in self._skipped:
                    label = _param_label(group, i, gi)
                    count = self._report_skipped(p, label, stacklevel=3)
                    if count:
                        out[label] = count
        return out

    def _publish_projector(self, p: Tensor, group: dict, state: dict) -> None:
        # Tell a GaLoreLinear (or the layer-wise hook) whether the next backward may produce the
        # low-rank gradient directly: only when the next step will not refresh the projector.
        if "rank" not in group or _sharded.is_sharded(p):
            # A sharded weight's GaLoreLinear sees the all-gathered weight, not this DTensor:
            # under FSDP2 it produces the ordinary gradient, which FSDP2 reduce-scatters.
            return
        left, right = self._projectors(state)
        next_step = state.get("step", 0)
        if (left is None and right is None) or next_step % group["update_proj_gap"] == 0:
            setattr(p, NEXT_PROJECTOR, None)
        else:
            setattr(p, NEXT_PROJECTOR, (left, right))

    def _param_state(self, p: Tensor, gi: int, index: int) -> dict:
        """``p``'s state, created on its first step: the step count and the seed of its
        randomized SVDs (from its place in the param groups, so every rank draws the same)."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            state["svd_seed"] = zlib.crc32(f"{gi}/{index}".encode())
        return state

    @torch.no_grad()
    def _step_param(self, p: Tensor, group: dict, gi: int, index: int) -> None:
        if _sharded.is_sharded(p):
            _sharded.step_param(self, p, group, gi, index, _param_label(group, index, gi))
            return
        state = self._param_state(p, gi, index)
        step = state["step"]
        label = _param_label(group, index, gi)
        refresh = self._needs_refresh(group, state, step)
        on_device = self._checks_on_device(p) and not refresh and group.get("check_finite", True)
        if refresh and p in self._skipped:
            self._report_skipped(p, label, stacklevel=5)  # a refresh synchronises anyway
        grad, grad_is_projected = self._gather_gradient(p, group, state, step, label)
        if grad is not None and "rank" in group and not grad_is_projected:
            # Projected first (the step's op would do this same GEMM, bit for bit), so the
            # finiteness check reads the small low-rank gradient instead of a pass over the
            # m x n one: a NaN or inf anywhere in the full gradient makes its row (column) of
            # the projection NaN or inf (IEEE: inf * 0 is NaN, inf - inf is NaN).
            grad = _ops.galore_project(grad, *self._projectors(state))
            grad_is_projected = True
        if grad is not None and on_device:
            # No host sync: the flag goes to the step's kernels, which skip a non-finite step.
            self._update(p, grad, grad_is_projected, group, state, self._found_inf(p, grad))
            state["step"] = step + 1
        elif grad is not None and self._finite_or_warn(grad, group, step, label):
            self._update(p, grad, grad_is_projected, group, state)
            state["step"] = step + 1
        if hasattr(p, LOWRANK_GRAD):
            delattr(p, LOWRANK_GRAD)
        self._publish_projector(p, group, state)

    def _update(self, p: Tensor, grad: Tensor, grad_is_projected: bool, group: dict,
                state: dict, found_inf: Tensor | None = None, *, proj=None, red=None) -> None:
        """One update of ``p``; with ``found_inf`` (a device flag) it must leave ``p`` and the
        state tensors unchanged when the flag is set, without reading it on the host.
        ``proj`` overrides the state's ``(left, right)`` and ``red`` supplies global reductions
        (both for an FSDP2 shard, see ``_galore_sharded``)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One optimizer step over every parameter with a gradient. In layer-wise mode the
        parameters were already stepped from their gradient hooks: this only runs ``closure``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.layerwise:
            return loss
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                self._step_param(p, group, gi, i)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                if hasattr(p, LOWRANK_GRAD):
                    delattr(p, LOWRANK_GRAD)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts every loaded state tensor to its parameter's dtype; ours keep their own
        # (fp32 moments of bf16 weights, int8/uint8 codes, bf16 projectors): restore them.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            for key, value in saved.items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)
        self._micro_batches.clear()
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state:
                    self._publish_projector(p, group, self.state[p])

    # ---- layer-wise mode ---------------------------------------------------------------------

    def _install_layerwise_hooks(self) -> None:
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if _sharded.is_sharded(p):
                    raise ValueError(
                        f"GaLore: layerwise=True with the FSDP2 (DTensor) "
                        f"{_param_label(group, i, gi)}: FSDP2 sets sharded gradients after its "
                        "reduce-scatter, not through the hooks the layer-wise mode steps from; "
                        "use layerwise=False (FSDP2 already frees each unsharded gradient after "
                        "its reduce-scatter)")
                if not p.requires_grad:
                    continue
                hook = self._make_layerwise_hook(group, gi, i)
                self._hooks.append(p.register_post_accumulate_grad_hook(hook))

    def _make_layerwise_hook(self, group: dict, gi: int, index: int):
        def hook(p: Tensor) -> None:
            if getattr(p, REDUCE_GROUP, None) is None and data_parallel_unhandled():
                raise RuntimeError(
                    "GaLore layer-wise mode under torch.distributed: each weight steps from its "
                    "gradient hook, before DistributedDataParallel's all-reduce, so the ranks "
                    "would diverge. Wrap the model with fastllm.optim.galore_ddp(model, "
                    "optimizer) instead of DistributedDataParallel (the optimizer then averages "
                    "each gradient in its hook), or use layerwise=False")
            count = self._micro_batches.get(p, 0) + 1
            if count < self.accumulation_steps:
                self._micro_batches[p] = count
                self._fold_micro_batch(p, group)
                return
            self._micro_batches[p] = 0
            self._step_param(p, group, gi, index)
            p.grad = None
        return hook

    @torch.no_grad()
    def _fold_micro_batch(self, p: Tensor, group: dict) -> None:
        # Between micro-batches a projected weight keeps only its low-rank gradient, unless the
        # coming step refreshes the projector (which needs the whole gradient).
        projector = getattr(p, NEXT_PROJECTOR, None)
        if "rank" not in group or projector is None or p.grad is None:
            return
        low = _ops.galore_project(p.grad, *projector)
        previous = getattr(p, LOWRANK_GRAD, None)
        setattr(p, LOWRANK_GRAD, low if previous is None else previous + low)
        p.grad = None

    def remove_hooks(self) -> None:
        """Detach the layer-wise hooks (the optimizer then no longer steps anything)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # ---- accounting ----------------------------------------------------------------------------

    def state_bytes(self) -> int:
        """Exact bytes of every tensor in the optimizer state (moments, projectors, 8-bit codes
        and scales)."""
        return sum(_local_bytes(v) for s in self.state.values() for v in s.values())


def _local_bytes(v) -> int:
    """Bytes this process holds for a state value (a DTensor's local shard only)."""
    if _sharded.is_sharded(v):
        v = v.to_local()
    return v.numel() * v.element_size() if isinstance(v, Tensor) else 0


def _check_common(lr: float, betas, eps: float, weight_decay: float) -> None:
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"betas must be in [0, 1), got {betas}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


def _contiguous_target(p: Tensor) -> Tensor:
    return p if p.is_contiguous() else p.contiguous()


class GaLoreAdamW(_GaLoreBase):
    """galore-torch's ``GaLoreAdamW`` with a fused step (``fastllm.ops.galore_adam_step``).

    By default it reproduces galore-torch exactly: full SVD refresh every ``update_proj_gap`` steps
    (the first at step 0), moments kept across refreshes, update scaled by ``scale``, then
    decoupled weight decay on the updated weight; groups without ``rank`` are AdamW with the same
    order. Moments are fp32 whatever the weight's dtype.

    Args:
        params: parameters or groups (see :func:`galore_param_groups`).
        lr, betas, eps, weight_decay: Adam hyper-parameters (galore-torch's defaults).
        layerwise: step each parameter from its post-accumulate-grad hook and free its gradient
            right after (``step()`` then does nothing); with ``accumulation_steps = k`` a parameter
            steps once every ``k`` backward passes, and between them a projected weight keeps only
            its low-rank gradient.
        accumulation_steps: micro-batches per optimizer step in layer-wise mode.

    Param-group keys. A group with ``rank`` is projected (2-D weights only, ``rank <= min(m,
    n)``); a group without is plain AdamW. Keys of a projected group and their defaults:
    ``rank`` (required), ``update_proj_gap=200`` (refresh when ``step % gap == 0``, first at step
    0), ``scale=0.25`` (the update's factor), ``proj_type="std"`` (``"std"``, ``"reverse_std"``,
    ``"left"``, ``"right"``, ``"full"``), ``svd="full"`` (or ``"randomized"``, seeded),
    ``svd_oversample=8``, ``svd_niter=2``, ``reproject_moments=False``,
    ``proj_dtype="float32"`` (or ``"bfloat16"``), ``check_finite=True``; every group also takes
    ``lr``, ``betas``, ``eps``, ``weight_decay``.

    On CUDA a non-refresh step reads nothing back from the device; a step skipped for a
    non-finite gradient is reported later (:meth:`skipped_steps`, or the next refresh). See the
    module docstring.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
        >>> groups = fastllm.optim.galore_param_groups(model, rank=8, update_proj_gap=50)
        >>> opt = fastllm.optim.GaLoreAdamW(groups, lr=1e-2, weight_decay=0.01)
        >>> # or by hand: [{"params": others}, {"params": weights, "rank": 8, "svd": "randomized"}]
        >>> x, target = torch.randn(32, 64), torch.randn(32, 8)
        >>> losses = []
        >>> for _ in range(20):
        ...     loss = nn.functional.mse_loss(model(x), target)
        ...     loss.backward()
        ...     opt.step()
        ...     opt.zero_grad()
        ...     losses.append(loss.item())
        >>> losses[-1] < 0.9 * losses[0]
        True
        >>> opt.state[model[0].weight]["exp_avg"].shape      # moments in the rank-8 subspace
        torch.Size([64, 8])
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, *, layerwise: bool = False,
                 accumulation_steps: int = 1):
        _check_common(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay), layerwise, accumulation_steps)

    def _has_moments(self, state: dict) -> bool:
        return "exp_avg" in state

    def _reproject_moments(self, state: dict, new_left, new_right) -> None:
        c_left, c_right = self._transition(state, new_left, new_right)
        state["exp_avg"] = self._apply_transition(state["exp_avg"], c_left, c_right, False)
        state["exp_avg_sq"] = self._apply_transition(state["exp_avg_sq"], c_left, c_right, True)

    def _update(self, p, grad, grad_is_projected, group, state, found_inf=None, *, proj=None,
                red=None) -> None:
        left, right = proj if proj is not None else (
            self._projectors(state) if "rank" in group else (None, None))
        if "exp_avg" not in state:
            shape = grad.shape if (grad_is_projected or "rank" not in group) else \
                _low_shape(p.shape, left, right)
            state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        beta1, beta2 = group["betas"]
        target = _contiguous_target(p)
        _ops.galore_adam_step(target, grad, left, right, state["exp_avg"], state["exp_avg_sq"],
                              grad_is_projected=grad_is_projected, lr=group["lr"], beta1=beta1,
                              beta2=beta2, eps=group["eps"],
                              weight_decay=group["weight_decay"],
                              scale=group["scale"] if "rank" in group else 1.0,
                              step=state["step"] + 1, found_inf=found_inf)
        if target is not p:
            p.copy_(target)


def _low_shape(shape, left, right) -> tuple[int, int]:
    return (left.shape[1] if left is not None else shape[0],
            right.shape[0] if right is not None else shape[1])


class GaLoreAdamW8bit(GaLoreAdamW):
    """:class:`GaLoreAdamW` with blockwise 8-bit moments (``fastllm.ops.galore_adam8bit_step``):
    int8/uint8 codes plus one fp32 absmax per 256 elements, for projected and ordinary parameters
    alike. No bitsandbytes needed. Projectors default to bfloat16 storage here (``proj_dtype``).
    For an ``m x n`` weight with shorter side ``s`` and longer side ``l``, the state at rank
    ``r`` is ``2 s r`` bytes of projector plus ``2 r l (1 + 4/256)`` of moments, against
    AdamW's ``8 m n``: at rank ``s/4``, ``6.35% + s / (16 l)`` of AdamW's, 12.6% for a square
    weight (as below), under 12% once ``l >= 1.11 s`` (8.7% for a 576 x 1536 MLP weight).

    >>> _ = torch.manual_seed(0)
    >>> def state_bytes(optimizer_class):
    ...     w = nn.Parameter(torch.randn(256, 256))
    ...     opt = optimizer_class([{"params": [w], "rank": 64}])
    ...     w.grad = torch.randn(256, 256)
    ...     opt.step()
    ...     return opt.state_bytes()
    >>> adamw = 2 * 256 * 256 * 4                    # torch.optim.AdamW's two fp32 moments
    >>> from fastllm.optim import GaLoreAdamW, GaLoreAdamW8bit
    >>> state_bytes(GaLoreAdamW) / adamw, state_bytes(GaLoreAdamW8bit) / adamw
    (0.375, 0.1259765625)
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, *, layerwise: bool = False,
                 accumulation_steps: int = 1, proj_dtype: str = "bfloat16"):
        params = list(params)
        if params and isinstance(params[0], dict):
            params = [dict(g) for g in params]
            for g in params:
                if "rank" in g:
                    g.setdefault("proj_dtype", proj_dtype)
        super().__init__(params, lr, betas, eps, weight_decay, layerwise=layerwise,
                         accumulation_steps=accumulation_steps)

    def _has_moments(self, state: dict) -> bool:
        return "exp_avg_codes" in state

    def _reproject_moments(self, state: dict, new_left, new_right) -> None:
        c_left, c_right = self._transition(state, new_left, new_right)
        shape = state["low_shape"]
        for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            values = dequantize_blockwise_reference(state[f"{name}_codes"],
                                                    state[f"{name}_absmax"], signed).view(shape)
            values = self._apply_transition(values, c_left, c_right, not signed)
            codes, absmax = quantize_blockwise_reference(values, signed)
            state[f"{name}_codes"], state[f"{name}_absmax"] = codes, absmax

    def _update(self, p, grad, grad_is_projected, group, state, found_inf=None, *, proj=None,
                red=None) -> None:
        left, right = proj if proj is not None else (
            self._projectors(state) if "rank" in group else (None, None))
        if "exp_avg_codes" not in state:
            shape = tuple(grad.shape) if (grad_is_projected or "rank" not in group) else \
                _low_shape(p.shape, left, right)
            numel = math.prod(shape)
            blocks = -(-numel // _ops.QUANT_BLOCK)
            state["low_shape"] = torch.tensor(shape, dtype=torch.int64)
            state["exp_avg_codes"] = torch.zeros(numel, dtype=torch.int8, device=p.device)
            state["exp_avg_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
            state["exp_avg_sq_codes"] = torch.zeros(numel, dtype=torch.uint8, device=p.device)
            state["exp_avg_sq_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        beta1, beta2 = group["betas"]
        target = _contiguous_target(p)
        _ops.galore_adam8bit_step(
            target, grad, left, right, state["exp_avg_codes"], state["exp_avg_absmax"],
            state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"],
            grad_is_projected=grad_is_projected, lr=group["lr"], beta1=beta1, beta2=beta2,
            eps=group["eps"], weight_decay=group["weight_decay"],
            scale=group["scale"] if "rank" in group else 1.0, step=state["step"] + 1,
            found_inf=found_inf)
        if target is not p:
            p.copy_(target)

    def state_bytes(self) -> int:
        # low_shape is bookkeeping (two int64), not optimizer memory that scales with the model.
        return sum(_local_bytes(v) for s in self.state.values() for k, v in s.items()
                   if k != "low_shape")


class GaLoreAdafactor(_GaLoreBase):
    """galore-torch's ``GaLoreAdafactor``: Hugging Face Adafactor (factored second moment,
    relative step size, update clipping) run on the projected gradient, the update
    back-projected and scaled with ``fastllm.ops.galore_project_back_`` (weight decay, applied
    before the update as Adafactor does, folded into the same GEMM when its factor is known on
    the host; with ``scale_parameter`` it depends on the weight's RMS, which stays on the device,
    and is then applied in its own pass). No host sync in a non-refresh step on CUDA.

    >>> _ = torch.manual_seed(0)
    >>> w = nn.Parameter(torch.randn(64, 32))
    >>> opt = fastllm.optim.GaLoreAdafactor([{"params": [w], "rank": 8}])  # relative step size
    >>> before = w.detach().clone()
    >>> w.grad = torch.randn(64, 32)
    >>> opt.step()
    >>> state = opt.state[w]
    >>> state["exp_avg_sq_row"].shape, state["exp_avg_sq_col"].shape  # factored, rank-8 space
    (torch.Size([64]), torch.Size([8]))
    >>> torch.linalg.matrix_rank(w.detach() - before, rtol=1e-4).item()   # a rank-8 update
    8
    """

    def __init__(self, params, lr: float | None = None, eps=(1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8,
                 beta1: float | None = None, weight_decay: float = 0.0,
                 scale_parameter: bool = True, relative_step: bool = True,
                 warmup_init: bool = False, *, layerwise: bool = False,
                 accumulation_steps: int = 1):
        if lr is not None and relative_step:
            raise ValueError("GaLoreAdafactor: lr must be None with relative_step=True")
        if warmup_init and not relative_step:
            raise ValueError("GaLoreAdafactor: warmup_init=True requires relative_step=True")
        super().__init__(params, dict(lr=lr, eps=tuple(eps), clip_threshold=clip_threshold,
                                      decay_rate=decay_rate, beta1=beta1,
                                      weight_decay=weight_decay, scale_parameter=scale_parameter,
                                      relative_step=relative_step, warmup_init=warmup_init),
                         layerwise, accumulation_steps)

    def _has_moments(self, state: dict) -> bool:
        return "exp_avg_sq_row" in state or "exp_avg_sq" in state

    def _reproject_moments(self, state: dict, new_left, new_right) -> None:
        # Factored statistics do not rotate; only the first moment (if any) moves with the basis.
        if "exp_avg" in state:
            c_left, c_right = self._transition(state, new_left, new_right)
            state["exp_avg"] = self._apply_transition(state["exp_avg"], c_left, c_right, False)

    @staticmethod
    def _rms(t: Tensor) -> Tensor:
        return t.norm(2) / (t.numel() ** 0.5)

    def _update(self, p, grad, grad_is_projected, group, state, found_inf=None, *, proj=None,
                red=None) -> None:
        # No host sync: the parameter scale (hence lr) stays a device tensor, and with found_inf
        # every state update is selected on the device (torch.where) instead of skipped on the
        # host.
        left, right = proj if proj is not None else (
            self._projectors(state) if "rank" in group else (None, None))
        if "rank" in group and not grad_is_projected:
            grad = _ops.galore_project(grad, left, right)
        grad = grad.float()
        factored = grad.dim() >= 2
        if not self._has_moments(state):
            if group["beta1"] is not None:
                state["exp_avg"] = torch.zeros_like(grad)
            if factored:
                state["exp_avg_sq_row"] = torch.zeros(grad.shape[:-1], device=grad.device)
                state["exp_avg_sq_col"] = torch.zeros(grad.shape[:-2] + grad.shape[-1:],
                                                      device=grad.device)
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
        ok = None if found_inf is None else found_inf.logical_not()
        t = state["step"] + 1
        p32 = p.float()
        rel_step = group["lr"]
        if group["relative_step"]:
            min_step = 1e-6 * t if group["warmup_init"] else 1e-2
            rel_step = min(min_step, 1.0 / math.sqrt(t))
        lr = rel_step
        if group["scale_parameter"]:
            # max(eps, rms(p)) * rel_step in float64, as with a Python float, but on the device.
            rms_p = self._rms(p32) if red is None else red.rms_param(p32)
            lr = rms_p.double().clamp(min=group["eps"][1]) * rel_step
        beta2t = 1.0 - math.pow(t, group["decay_rate"])
        update = grad.square() + group["eps"][0]
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            _ema_(row, beta2t, update.mean(dim=-1), 1.0 - beta2t, ok)
            col_mean = update.mean(dim=-2) if red is None else red.mean_rows(update)
            _ema_(col, beta2t, col_mean, 1.0 - beta2t, ok)
            row_mean = row.mean(dim=-1, keepdim=True) if red is None else red.mean_vector(row)
            r_factor = (row / row_mean).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            update = (r_factor * c_factor).mul_(grad)
        else:
            _ema_(state["exp_avg_sq"], beta2t, update, 1.0 - beta2t, ok)
            update = state["exp_avg_sq"].rsqrt().mul_(grad)
        rms_update = self._rms(update) if red is None else red.rms_low(update)
        update.div_((rms_update / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if group["beta1"] is not None:
            _ema_(state["exp_avg"], group["beta1"], update, 1.0 - group["beta1"], ok)
            update = state["exp_avg"]
        decay = 1.0 if group["weight_decay"] == 0 else 1.0 - group["weight_decay"] * lr
        if ok is not None:
            update = torch.where(ok, update, 0.0)
            if isinstance(decay, Tensor) or decay != 1.0:  # never bool() of a tensor
                decay = torch.where(ok, decay, 1.0)
        if "rank" in group:
            target = _contiguous_target(p)
            beta = decay
            if isinstance(decay, Tensor):
                # galore_project_back_ takes its beta from the host: scale on the device first.
                target.copy_((target.float() * decay).to(target.dtype))
                beta = 1.0
            _ops.galore_project_back_(target, update, left, right, alpha=-group["scale"],
                                      beta=beta)
            if target is not p:
                p.copy_(target)
        else:
            p.copy_((p32 * decay - update).to(p.dtype))


def _ema_(dst: Tensor, beta: float, value: Tensor, alpha: float, ok: Tensor | None) -> None:
    """``dst = beta * dst + alpha * value`` in place; with ``ok`` (a device bool) only when it is
    set (selected on the device, nothing read back)."""
    if ok is None:
        dst.mul_(beta).add_(value, alpha=alpha)
    else:
        dst.copy_(torch.where(ok, dst.mul(beta).add_(value, alpha=alpha), dst))


# ---- parameter groups ----------------------------------------------------------------------------

def galore_param_groups(model: nn.Module, target_modules: str | Iterable[str] = "all-linear",
                        rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25,
                        proj_type: str = "std", exclude: Iterable[str] = ("lm_head",),
                        **galore_options) -> list[dict]:
    """Split ``model``'s trainable parameters into a GaLore group and a regular group.

    Args:
        target_modules: ``"all-linear"`` (the weight of every ``nn.Linear`` except those named in
            ``exclude``, like Hugging Face's option), a list of module names (matching a full
            name or its last components, e.g. ``"q_proj"`` or ``"mlp.up_proj"``), or a regular
            expression searched in each module name.
        rank, update_proj_gap, scale, proj_type, **galore_options: the GaLore group's keys.

    Returns ``[{"params": regular}, {"params": galore, "rank": ..., ...}]`` with named
    parameters, so errors and state dicts name each weight; empty groups are left out.

    >>> model = nn.ModuleDict({"q_proj": nn.Linear(16, 16), "norm": nn.LayerNorm(16),
    ...                        "lm_head": nn.Linear(16, 32)})
    >>> regular, galore = fastllm.optim.galore_param_groups(model, rank=4)
    >>> [name for name, _ in galore["params"]], galore["rank"], galore["update_proj_gap"]
    (['q_proj.weight'], 4, 200)
    >>> sorted(name for name, _ in regular["params"])
    ['lm_head.bias', 'lm_head.weight', 'norm.bias', 'norm.weight', 'q_proj.bias']
    >>> opt = fastllm.optim.GaLoreAdamW([regular, galore], lr=1e-3)
    """
    if isinstance(target_modules, str) and target_modules != "all-linear":
        pattern = re.compile(target_modules)
        wanted = lambda name, module: bool(pattern.search(name))  # noqa: E731
    elif isinstance(target_modules, str):
        excluded = set(exclude)
        wanted = lambda name, module: (isinstance(module, nn.Linear)  # noqa: E731
                                       and name.split(".")[-1] not in excluded)
    else:
        targets = list(target_modules)
        wanted = lambda name, module: any(name == t or name.endswith("." + t)  # noqa: E731
                                          for t in targets)
    galore_ids = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name and isinstance(weight, nn.Parameter) and weight.dim() == 2 and wanted(name, module):
            galore_ids.add(id(weight))
    if not galore_ids:
        raise ValueError(f"galore_param_groups: target_modules={target_modules!r} matched no "
                         "2-D weight in the model")
    galore, regular = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (galore if id(p) in galore_ids else regular).append((name, p))
    groups = []
    if regular:
        groups.append({"params": regular})
    groups.append({"params": galore, "rank": rank, "update_proj_gap": update_proj_gap,
                   "scale": scale, "proj_type": proj_type, **galore_options})
    return groups
