"""GaLore steps for FSDP2-sharded parameters (``torch.distributed.fsdp.fully_shard``: each
parameter a DTensor sharded along dim 0 over a 1-D mesh; the gradient is sharded the same way,
already reduce-scattered and averaged by FSDP2).

The rule for what lives where (docs/galore.md, "FSDP2"):

* Projector: replicated (every rank holds the whole ``left`` m x r / ``right`` r x n). On a refresh
  step the owner of the matrix (round-robin over the sharded GaLore matrices in parameter-group
  order) gathers the full gradient, runs the SVD and broadcasts the result. So one rank does each
  SVD (the SVD cost is spread over the ranks instead of repeated on all of them), every rank
  holds bit-identical projectors, and no rank holds more than one full gradient at a time.
* Moments: sharded along dim 0 with the weight when the projected gradient keeps the weight's
  rows, i.e. only the right side is projected (``G right^T``, m x r: each rank projects its own
  rows, no communication) and for parameters without a projector; replicated when the left side
  is projected (``left^T G``, r x n or r x r: the row dimension is summed away, so the ranks
  all-reduce their partial products ``left[rows]^T G[rows]``, then every rank runs the same
  elementwise update, and back-projects into its rows with ``left[rows]``).
* 8-bit codes follow the moments; their per-block absmax is kept per rank, padded to the largest
  shard's block count, so its global length is ``world * blocks`` (a checkpoint resumes at the
  same world size).

Sharded state tensors are DTensors (``Shard(0)`` on the parameter's mesh), so
``torch.distributed.checkpoint`` and ``get_optimizer_state_dict`` save each rank's part; replicated
ones are plain tensors, equal on every rank. Steps skipped for a non-finite gradient are decided
together (an all-reduce of the flag), so the ranks never diverge.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch import Tensor

from .._reference.galore import projection_sides
from .._ops import galore as _ops

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch without distributed
    DTensor = None

# Keys whose tensors shard with the weight's rows when the projected gradient keeps them.
_ROW_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_sq_row")
_CODE_KEYS = ("exp_avg_codes", "exp_avg_sq_codes")
_ABSMAX_KEYS = ("exp_avg_absmax", "exp_avg_sq_absmax")


def is_sharded(p) -> bool:
    return DTensor is not None and isinstance(p, DTensor)


class ShardInfo:
    """Where ``p``'s local rows sit in the global weight, and how its state is laid out."""

    def __init__(self, p, group: dict, label: str):
        mesh = p.device_mesh
        if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise NotImplementedError(
                f"GaLore: {label} is a DTensor with placements {tuple(p.placements)} on a "
                f"{mesh.ndim}-D mesh; only FSDP2's layout (Shard(0) on a 1-D mesh) is supported")
        self.mesh = mesh
        self.group = mesh.get_group()
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.shape = tuple(p.shape)
        rows = self.shape[0]
        # torch.chunk's split, as FSDP2 and DTensor use: ceil(rows / world) rows per rank.
        self.chunk = -(-rows // self.world)
        self.row0 = min(rows, self.rank * self.chunk)
        self.row1 = min(rows, self.row0 + self.chunk)
        local = tuple(p.to_local().shape)
        if local[0] != self.row1 - self.row0:
            raise RuntimeError(f"GaLore: {label}'s local shard has {local[0]} rows, expected "
                               f"{self.row1 - self.row0} (torch.chunk's split of {rows})")
        self.projected = "rank" in group
        if self.projected:
            use_left, use_right = projection_sides(self.shape, group["proj_type"])
            r = group["rank"]
            self.low_sharded = not use_left
            self.low_global = (r if use_left else rows, r if use_right else self.shape[1])
        else:
            use_left = use_right = False
            self.low_sharded = True
            self.low_global = self.shape
        self.use_left, self.use_right = use_left, use_right
        if self.low_sharded:
            self.low_local = (self.row1 - self.row0,) + tuple(self.low_global[1:])
        else:
            self.low_local = tuple(self.low_global)
        # Blocks of the 8-bit format on the largest shard: every rank pads to it.
        per_row = math.prod(self.low_global[1:]) if len(self.low_global) > 1 else 1
        self.max_blocks = -(-self.chunk * per_row // _ops.QUANT_BLOCK) if self.low_sharded else 0

    # ---- state layout -------------------------------------------------------------------------

    def _shard(self, local: Tensor, global_shape) -> Tensor:
        global_shape = torch.Size(global_shape)
        stride = torch.empty(global_shape, device="meta").stride()
        return DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False,
                                  shape=global_shape, stride=stride)

    def wrap(self, key: str, value):
        """The stored form of a local state tensor."""
        if not isinstance(value, Tensor) or not self.low_sharded or key == "low_shape":
            return value
        if key in _ROW_KEYS:
            return self._shard(value, (self.low_global[0],) + tuple(value.shape[1:]))
        if key in _CODE_KEYS:
            return self._shard(value.view(self.low_local), self.low_global)
        if key in _ABSMAX_KEYS:
            padded = value.new_zeros(self.max_blocks)
            padded[:value.numel()] = value
            return self._shard(padded, (self.world * self.max_blocks,))
        return value

    def unwrap(self, key: str, value):
        """The local tensor a kernel works on (sharing storage with the stored form)."""
        if is_sharded(value):
            local = value.to_local()
            if key in _CODE_KEYS:
                return local.view(-1)
            if key in _ABSMAX_KEYS:
                return local[:-(-math.prod(self.low_local) // _ops.QUANT_BLOCK)]
            return local
        if key == "low_shape":
            return torch.tensor(self.low_local, dtype=torch.int64)
        return value

    def local_state(self, state: dict) -> dict:
        return {k: self.unwrap(k, v) for k, v in state.items()}

    def store(self, state: dict, local: dict, before: dict) -> None:
        """Write back the entries of ``local`` that the update created or replaced."""
        for key, value in local.items():
            if key == "low_shape" and isinstance(value, Tensor):
                state[key] = torch.tensor(self.low_global, dtype=torch.int64)
            elif key not in before or value is not before[key]:
                state[key] = self.wrap(key, value)


class Reduce:
    """Global reductions of a row-sharded tensor, for Adafactor's statistics."""

    def __init__(self, info: ShardInfo):
        self.info = info

    def _sum(self, t: Tensor) -> Tensor:
        dist.all_reduce(t, group=self.info.group)
        return t

    def mean_rows(self, x: Tensor) -> Tensor:
        """Mean over dim -2 (the sharded rows of the low-rank gradient)."""
        if not self.info.low_sharded:
            return x.mean(dim=-2)
        return self._sum(x.sum(dim=-2)) / self.info.low_global[0]

    def mean_vector(self, row: Tensor) -> Tensor:
        """Mean of a vector over the sharded rows, keepdim."""
        if not self.info.low_sharded:
            return row.mean(dim=-1, keepdim=True)
        return self._sum(row.sum(dim=-1, keepdim=True)) / self.info.low_global[0]

    def rms_low(self, t: Tensor) -> Tensor:
        if not self.info.low_sharded:
            return t.norm(2) / (t.numel() ** 0.5)
        return self._sum(t.square().sum()).sqrt() / (math.prod(self.info.low_global) ** 0.5)

    def rms_param(self, t: Tensor) -> Tensor:
        return self._sum(t.square().sum()).sqrt() / (math.prod(self.info.shape) ** 0.5)


def _info(opt, p, group: dict, label: str) -> ShardInfo:
    info = opt._shard_info.get(p)
    if info is None:
        info = opt._shard_info[p] = ShardInfo(p, group, label)
    return info


def _owner(opt, p, info: ShardInfo) -> int:
    """Round-robin over the sharded GaLore matrices, in parameter-group order."""
    if not opt._owners:
        index = 0
        for group in opt.param_groups:
            if "rank" not in group:
                continue
            for q in group["params"]:
                if is_sharded(q):
                    opt._owners[q] = index % info.world
                    index += 1
    return opt._owners[p]


def _full_gradient_on(owner: int, grad_local: Tensor, info: ShardInfo) -> Tensor | None:
    """The full gradient on ``owner`` (group rank), ``None`` elsewhere."""
    rows = grad_local.shape[0]
    padded = grad_local
    if rows != info.chunk:
        padded = grad_local.new_zeros((info.chunk,) + tuple(grad_local.shape[1:]))
        padded[:rows] = grad_local
    padded = padded.contiguous()
    dst = dist.get_global_rank(info.group, owner)
    if info.rank == owner:
        parts = [torch.empty_like(padded) for _ in range(info.world)]
        dist.gather(padded, parts, dst=dst, group=info.group)
        return torch.cat(parts)[:info.shape[0]]
    dist.gather(padded, None, dst=dst, group=info.group)
    return None


def _broadcast_projector(new, owner: int, info: ShardInfo, group: dict, device):
    """The owner's ``(left, right)`` (or ``None`` for a failed refresh) on every rank."""
    src = dist.get_global_rank(info.group, owner)
    ok = torch.tensor([0 if new is None else 1], dtype=torch.int32, device=device)
    dist.broadcast(ok, src=src, group=info.group)
    if not int(ok):
        return None
    from .galore import _PROJ_DTYPES
    dtype = _PROJ_DTYPES[group["proj_dtype"]]
    r, (m, n) = group["rank"], info.shape
    out = []
    for used, shape, index in ((info.use_left, (m, r), 0), (info.use_right, (r, n), 1)):
        if not used:
            out.append(None)
            continue
        t = new[index] if info.rank == owner else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(t, src=src, group=info.group)
        out.append(t)
    return tuple(out)


def _all_finite(t: Tensor, info: ShardInfo, check: bool) -> bool:
    if not check:
        return True
    bad = torch.isfinite(t.sum()).logical_not().to(torch.int32).reshape(1)  # as _finite_or_warn
    # A replicated low-rank gradient is already the all-reduced sum, so a NaN or inf on any rank
    # reached every rank; a row-sharded one was checked on this rank's rows only.
    if info.low_sharded:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=info.group)
    return not bool(bad)  # a host read: under FSDP2 every step synchronises here, CUDA included


@torch.no_grad()
def step_param(opt, p, group: dict, gi: int, index: int, label: str) -> None:
    """One optimizer step of the sharded parameter ``p`` (every rank calls it, in the same
    order: it runs collectives)."""
    from .galore import GaLoreNumericalWarning

    info = _info(opt, p, group, label)
    if p.grad is None:
        return
    state = opt._param_state(p, gi, index)
    step = state["step"]
    w_local = p.to_local()
    g_local = p.grad.to_local() if is_sharded(p.grad) else p.grad
    local = info.local_state(state)
    before = dict(local)
    if info.projected:
        if opt._needs_refresh(group, state, step):
            owner = _owner(opt, p, info)
            full = _full_gradient_on(owner, g_local, info)
            new = None
            if full is not None:
                new = opt._compute_projector(info.shape, full, group, state, step, label,
                                             stacklevel=6)
            del full
            new = _broadcast_projector(new, owner, info, group, w_local.device)
            if new is not None:
                opt._install_projector(local, group, *new)
            elif "proj_left" not in local and "proj_right" not in local:
                info.store(state, local, before)
                return  # no projector yet: the single-process path skips this step too
        left, right = local.get("proj_left"), local.get("proj_right")
        left_rows = left[info.row0:info.row1] if left is not None else None
        low = _ops.galore_project(g_local, left_rows, right)
        if not info.low_sharded:
            dist.all_reduce(low, group=info.group)
        grad, projected = low, True
        target_left = left_rows
    else:
        grad, projected, target_left, right = g_local, False, None, None
    if _all_finite(grad, info, group.get("check_finite", True)):
        opt._update(w_local, grad, projected, group, local, proj=(target_left, right),
                    red=Reduce(info))
        local["step"] = step + 1
    elif info.rank == 0:
        warnings.warn(f"GaLore: non-finite gradient for {label} at step {step}: step skipped on "
                      "every rank, weights and moments unchanged", GaLoreNumericalWarning,
                      stacklevel=5)
    info.store(state, local, before)
