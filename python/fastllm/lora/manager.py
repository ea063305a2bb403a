"""AdapterManager: serve many LoRA adapters of mixed ranks from one Hugging Face model.

    manager = AdapterManager(model)                  # q/k/v/o/gate/up/down -> LoRALinear
    manager.load("fr", "/path/to/peft/adapter")      # or a state dict
    with manager.batch(["fr", None, "de"]):          # one name per sequence; None = base model
        logits = model(input_ids).logits             # or model.generate(...)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import numbers
import re
import threading
import warnings
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .._host import to_device
from .._optional import require
from .._ops.lora import PATH_AUTO, lora_expand, lora_sgmv_chunks, lora_sgmv_plan, lora_shrink, \
    sm_count
from ..memory import PagePool
from ..memory.page_pool import lora_page_waste
from ..nn.lora_linear import LoRALinear
from .store import AdapterStore, ModuleSpec, ModuleWeights

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The largest max_rank an AdapterManager accepts: the largest rank the kernels are tested at.
MAX_RANK = 256

# Share of free memory (device memory on CUDA, available RAM on CPU) a pool takes by default.
DEFAULT_POOL_SHARE = 0.10
DEFAULT_PAGE_ELEMENTS = 1 << 16

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<kind>[AB])"
                  r"(?:\.(?P<adapter>[^.]+))?\.weight$")


class _BatchState:
    """Everything the LoRA kernels need for one batch, built once per :meth:`AdapterManager.batch`
    (row tables, ranks, scalings) and once per input shape (token -> adapter map, SGMV plan and
    its tensor-core chunks), on the host and copied to the device without blocking. A forward
    call only launches kernels: nothing here reads device memory, so a decode step can be
    captured in a CUDA graph."""

    def __init__(self, manager: "AdapterManager", seq_adapter: Tensor, adapters: int, rows: Tensor,
                 ranks: Tensor, scalings: Tensor, module_rank: list[int]) -> None:
        self.pool = manager.pool.storage
        self.device = manager.device
        self.batch_size = seq_adapter.numel()
        self.seq_adapter = seq_adapter  # CPU int32, one entry per sequence
        self.adapters = adapters
        self.entries = [None] * len(module_rank)
        if rows is not None:
            # One copy per table, then per-module views (unbind): contiguous without a copy each.
            per_module = zip(rows[:, 0:1].contiguous().unbind(0),
                             rows[:, 1:2].contiguous().unbind(0),
                             ranks.unsqueeze(1).contiguous().unbind(0),
                             scalings.unsqueeze(1).contiguous().unbind(0))
            self.entries = [entry if top else None
                            for entry, top in zip(per_module, module_rank)]
        # Projections that read the same input (q/k/v, gate/up) share one multi-slice shrink: the
        # first of them to run computes h for all, the others take their slice of it.
        self.group_of: list[tuple[int, int] | None] = [None] * len(module_rank)
        self.group_tables: list[tuple[Tensor, Tensor, frozenset]] = []
        for members in manager.fused_groups:
            members = [i for i in members if self.entries[i] is not None]
            if len(members) < 2:
                continue
            a_rows = torch.stack([self.entries[i][0][0] for i in members])
            group_ranks = torch.stack([self.entries[i][2][0] for i in members])
            for position, i in enumerate(members):
                self.group_of[i] = (len(self.group_tables), position)
            self.group_tables.append((a_rows, group_ranks, frozenset(members)))
        # (group, input, its version, h, members still to read h): one slot, since a group's
        # projections run back to back; cleared once all have read it, so no input outlives it.
        self._shared_h: tuple | None = None
        self._tokens: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    def tokens(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(token_adapter, sgmv_order, sgmv_tiles, sgmv_chunks) on the device for an input shaped
        like x."""
        if x.shape[0] != self.batch_size:
            raise RuntimeError(f"AdapterManager.batch was given {self.batch_size} adapter names but "
                               f"the model got a batch of {x.shape[0]} sequences")
        per_sequence = x.numel() // (x.shape[-1] * self.batch_size) if x.shape[-1] else 1
        entry = self._tokens.get(per_sequence)
        if entry is None:
            if self.device.type == "cuda" and torch.cuda.is_available() \
                    and torch.cuda.is_current_stream_capturing():
                # A copy captured here would read a pinned staging block that is recycled
                # after capture: replays would see stale ids.
                raise RuntimeError(
                    f"AdapterManager: the first call with {per_sequence} tokens per sequence ran "
                    "inside CUDA-graph capture; run that shape once eagerly in the same batch "
                    "before capturing")
            ids = self.seq_adapter.repeat_interleave(per_sequence)
            order, tiles = lora_sgmv_plan(ids, self.adapters)
            # Built on every device (a few host microseconds) so the CPU ops check them too.
            chunks = lora_sgmv_chunks(tiles, sms=sm_count(self.device))
            entry = tuple(to_device(t, self.device) for t in (ids, order, tiles, chunks))
            self._tokens[per_sequence] = entry
        return entry

    def apply(self, index: int, x: Tensor, y: Tensor) -> Tensor:
        entry = self.entries[index]
        if entry is None:
            return y
        a_rows, b_rows, ranks, scalings = entry
        if x.dtype != self.pool.dtype:
            raise TypeError(f"LoRALinear: input dtype {x.dtype} differs from the adapter pool's "
                            f"{self.pool.dtype}; create the AdapterManager after casting the model")
        ids, order, tiles, chunks = self.tokens(x)
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y2 = y.view(-1, y.shape[-1])
        # BGMV or SGMV: the kernels choose from the call's tokens and the plan's tiles.
        path = PATH_AUTO
        autograd = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
        shrink = lora_shrink if autograd else torch.ops.fastllm.lora_shrink.default
        group = self.group_of[index]
        plan = (order, tiles, chunks)
        if group is None:
            h = shrink(x2, self.pool, a_rows, ranks, ids, path, *plan)
        else:
            h = self._group_h(group, index, x, x2, shrink, ids, path, plan)
        if autograd:
            return lora_expand(y2, h, self.pool, b_rows, ranks, scalings, ids, [y2.shape[1]], path,
                               *plan).view_as(y)
        torch.ops.fastllm.lora_expand.default(y2, h, self.pool, b_rows, ranks, scalings, ids,
                                              [y2.shape[1]], path, *plan)
        return y

    def _group_h(self, group, index, x, x2, shrink, ids, path, plan) -> Tensor:
        gid, position = group
        slot = self._shared_h
        if slot is None or slot[0] != gid or slot[1] is not x or slot[2] != x._version \
                or index not in slot[4]:
            a_rows, ranks, members = self.group_tables[gid]
            h = shrink(x2, self.pool, a_rows, ranks, ids, path, *plan)
            slot = (gid, x, x._version, h, set(members))
        slot[4].discard(index)
        self._shared_h = slot if slot[4] else None
        return slot[3][position:position + 1]


class AdapterManager:
    """Replace a model's target linears by :class:`~fastllm.nn.LoRALinear` and serve adapters.

    Args:
        model: a Hugging Face transformers model (Llama family: the default targets are
            q/k/v/o/gate/up/down projections). Modified in place; :meth:`close` restores it.
        target_modules: last components of the module names to wrap (``nn.Linear`` only).
        max_rank: the largest adapter rank accepted, 1..256 (``MAX_RANK``, the largest rank the
            kernels are tested at); loading an adapter of a higher rank raises ``ValueError``
            ("... has rank 300, above max_rank=64").
        num_pages: pool size in pages. Default: ``DEFAULT_POOL_SHARE`` (10%) of the free memory of
            ``device`` (device memory on CUDA, available RAM on CPU), and at least enough for one
            adapter of ``max_rank`` on every target.
        device: where the pool lives. Default: the model's device.
        page_size: elements per page (default 65536, or the widest row if larger).
        pool: use an existing :class:`~fastllm.memory.PagePool` (e.g. one shared with a KV cache)
            instead of creating one; its dtype must be the model's.

    Threads: one thread runs the model (``batch`` and the forwards inside it); other threads may
    ``load``, ``unload`` (adapters outside the running batch), ``prefetch`` and read ``stats``
    meanwhile (the store's bookkeeping runs under the pool's lock; the running batch's adapters
    are never evicted or replaced). A second thread opening a batch, or calling the model while
    another thread's batch is open, is refused with a ``RuntimeError``.

    Examples:
        Two adapters of different ranks, one per sequence of the batch, against PEFT's formula
        ``base(x) + alpha / r * B A x``:

        >>> from collections import OrderedDict
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(OrderedDict(q_proj=nn.Linear(16, 16), v_proj=nn.Linear(16, 8)))
        >>> manager = fastllm.lora.AdapterManager(model, ["q_proj", "v_proj"], max_rank=8,
        ...                                       num_pages=16, page_size=64)
        >>> a2, b2 = torch.randn(2, 16), torch.randn(16, 2)
        >>> a8, b8 = torch.randn(8, 16), torch.randn(16, 8)
        >>> manager.load("small", {"q_proj.lora_A.weight": a2, "q_proj.lora_B.weight": b2},
        ...              {"lora_alpha": 2})          # rank 2 on q_proj only
        >>> manager.load("large", {"q_proj.lora_A.weight": a8, "q_proj.lora_B.weight": b8},
        ...              {"lora_alpha": 16})         # rank 8
        >>> manager.adapters
        ['large', 'small']
        >>> x = torch.randn(2, 1, 16)
        >>> with torch.no_grad():
        ...     base = model.q_proj.base(x)
        ...     with manager.batch(["small", "large"]):
        ...         q = model.q_proj(x)
        >>> torch.allclose(q[0], base[0] + x[0] @ a2.T @ b2.T, atol=1e-5)
        True
        >>> torch.allclose(q[1], base[1] + 2 * x[1] @ a8.T @ b8.T, atol=1e-5)
        True
        >>> stats = manager.stats()
        >>> stats["registered"], stats["resident"], stats["misses"]
        (2, 2, 2)
        >>> manager.merge("large")                  # into the base weights: no kernels run
        >>> torch.allclose(model.q_proj(x)[1], q[1], atol=1e-5)
        True
        >>> manager.close()                         # unmerged, the nn.Linear modules are back
        >>> torch.allclose(model.q_proj(x), base, atol=1e-6)
        True
    """

    def __init__(self, model: nn.Module, target_modules: Sequence[str] = LLAMA_TARGETS,
                 max_rank: int = 64, num_pages: int | None = None,
                 device: torch.device | str | None = None, page_size: int | None = None,
                 pool: PagePool | None = None) -> None:
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) \
                or not 1 <= max_rank <= MAX_RANK:
            raise ValueError(f"AdapterManager: max_rank must be an int in [1, {MAX_RANK}], got "
                             f"{max_rank!r}")
        targets = set(target_modules)
        found = [(name, module) for name, module in model.named_modules()
                 if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
        if not found:
            raise ValueError(f"AdapterManager: no nn.Linear named {sorted(targets)} in the model")
        parameter = next(model.parameters())
        self.model = model
        self.dtype = parameter.dtype
        self.device = torch.device(device) if device is not None else parameter.device
        specs = [ModuleSpec(name, module.in_features, module.out_features) for name, module in found]
        widest = max(max(s.in_features, s.out_features) for s in specs)
        if pool is None:
            page_size = page_size or max(DEFAULT_PAGE_ELEMENTS, -(-widest // 8) * 8)
            if num_pages is None:
                num_pages = self._default_pages(specs, max_rank, page_size)
            pool = PagePool(num_pages, page_size, self.dtype, self.device)
        elif pool.dtype != self.dtype:
            raise TypeError(f"AdapterManager: pool dtype {pool.dtype} differs from the model's "
                            f"{self.dtype}")
        else:
            _check_shared_page_size(pool, specs, max_rank)
        self.pool = pool
        self.store = AdapterStore(pool, specs, max_rank)
        self.max_rank = max_rank
        self.target_modules = tuple(target_modules)
        self._active: _BatchState | None = None
        # The thread that opened the running batch (set before its adapters load).
        self._opening: int | None = None
        self._merged: str | None = None
        self.fused_groups = _fused_groups(specs)
        self._originals = []
        # Checks each model call against the open batch before any layer runs.
        self._call_hook = model.register_forward_pre_hook(self._check_call, with_kwargs=True)
        for index, (name, module) in enumerate(found):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear(module, self, index))
            self._originals.append((parent, child, module))

    def _default_pages(self, specs, max_rank, page_size) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        one_adapter = sum(max_rank * (s.in_features + s.out_features) for s in specs)
        minimum = -(-one_adapter // page_size) + len(specs) + 1
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return max(minimum, int(DEFAULT_POOL_SHARE * free) // (page_size * element))

    # ---- adapters --------------------------------------------------------------------------------

    def load(self, name: str, source, config: Mapping | None = None, replace: bool = False) -> None:
        """Register adapter ``name`` from a PEFT directory (``adapter_config.json`` +
        ``adapter_model.safetensors``) or a PEFT-style state dict with its LoRA config as a dict
        (``config``; for a directory, entries that override the file's).

        The config must give ``lora_alpha`` (a state dict does not record the scaling, and a
        guess would silently change the adapter's effect); the rank comes from the tensors when
        it has no ``r``. A name already loaded is refused unless ``replace=True`` (the old adapter
        must not be in the running batch). Ranks above ``max_rank`` are refused.

        Honours ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``,
        ``target_modules`` and ``fan_in_fan_out`` (which PEFT itself ignores for ``nn.Linear``
        layers; so do we, with the same warning). Raises ``ValueError`` naming the tensor when one
        has the wrong shape or targets a module this manager does not wrap; nothing is registered
        then.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"AdapterManager.load: name must be a non-empty str, got {name!r}")
        if not isinstance(replace, bool):
            raise TypeError(f"AdapterManager.load: replace must be a bool, got {replace!r}")
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"AdapterManager.load({name!r}): config must be a dict (the LoRA "
                            f"config) or None, got {type(config).__name__}")
        # Before reading any file: a clash is refused cheaply (and again at registration).
        self.store._check_new_name(name, replace)
        if isinstance(source, (str, os.PathLike)):
            state, file_config = _read_peft_dir(pathlib.Path(source))
            config = {**file_config, **(config or {})}
        elif isinstance(source, Mapping):
            state = source
            config = dict(config or {})
        else:
            raise TypeError(f"AdapterManager.load: source must be a PEFT directory or a state "
                            f"dict, got {type(source).__name__}")
        self.store.register(name, self._module_weights(name, state, config), replace=replace)

    def unload(self, name: str) -> None:
        """Forget an adapter and free its pages."""
        if self._merged == name:
            raise RuntimeError(f"AdapterManager.unload: {name!r} is merged; unmerge() first")
        self.store.unregister(name)

    @property
    def adapters(self) -> list[str]:
        return self.store.names()

    def prefetch(self, names: Iterable[str | None]) -> None:
        """Start loading the adapters a coming batch will use (side CUDA stream on GPUs)."""
        self.store.prefetch([n for n in names if n is not None])

    def stats(self) -> dict:
        """Hits, misses, evictions, bytes moved host -> pool, pages used by adapters, ..."""
        return self.store.stats()

    def _module_weights(self, name: str, state: Mapping, config: Mapping) -> dict:
        if config.get("use_dora"):
            raise ValueError(f"AdapterManager.load({name!r}): DoRA adapters are not supported")
        if config.get("fan_in_fan_out"):
            warnings.warn(f"AdapterManager.load({name!r}): fan_in_fan_out=True but the targets are "
                          "nn.Linear; ignoring it, as PEFT does", stacklevel=3)
        _check_config(name, config)
        targets = config.get("target_modules")
        pairs: dict[str, dict[str, tuple[str, Tensor]]] = {}
        for key, tensor in state.items():
            match = _KEY.match(key)
            if match is None:
                raise ValueError(f"AdapterManager.load({name!r}): tensor {key!r} is not a LoRA A/B "
                                 "weight (only lora_A / lora_B weights are supported)")
            module = match["module"]
            if module not in self.store.module_index:
                raise ValueError(f"AdapterManager.load({name!r}): tensor {key!r} targets module "
                                 f"{module!r}, which is not one of the wrapped modules "
                                 f"({', '.join(self.target_modules)})")
            if targets is not None and not _matches_targets(module, targets):
                raise ValueError(f"AdapterManager.load({name!r}): tensor {key!r} is for module "
                                 f"{module!r}, outside the adapter's target_modules {targets}")
            pairs.setdefault(module, {})[match["kind"]] = (key, tensor)
        weights = {}
        for module, pair in pairs.items():
            if set(pair) != {"A", "B"}:
                key = next(iter(pair.values()))[0]
                raise ValueError(f"AdapterManager.load({name!r}): tensor {key!r} has no matching "
                                 f"lora_{'B' if 'A' in pair else 'A'} weight")
            (a_key, a), (b_key, b) = pair["A"], pair["B"]
            for key, tensor in ((a_key, a), (b_key, b)):
                if not isinstance(tensor, Tensor) or tensor.dim() != 2:
                    raise ValueError(f"AdapterManager.load({name!r}): tensor {key!r} must be a 2-D "
                                     f"tensor, got "
                                     f"{getattr(tensor, 'shape', type(tensor).__name__)}")
                if not tensor.is_floating_point():
                    raise ValueError(f"AdapterManager.load({name!r}): tensor {key!r} has dtype "
                                     f"{tensor.dtype}; LoRA weights must be floating point")
                if not bool(torch.isfinite(tensor).all()):
                    raise ValueError(f"AdapterManager.load({name!r}): tensor {key!r} holds "
                                     "non-finite values (inf or nan)")
            spec = self.store.modules[self.store.module_index[module]]
            rank = _pattern_value(module, config.get("rank_pattern"), config.get("r", a.shape[0]))
            alpha = _pattern_value(module, config.get("alpha_pattern"), config.get("lora_alpha"))
            if tuple(a.shape) != (rank, spec.in_features):
                raise ValueError(f"AdapterManager.load({name!r}): tensor {a_key!r} has shape "
                                 f"{list(a.shape)}, expected [r, in] = [{rank}, {spec.in_features}]")
            if tuple(b.shape) != (spec.out_features, rank):
                raise ValueError(f"AdapterManager.load({name!r}): tensor {b_key!r} has shape "
                                 f"{list(b.shape)}, expected [out, r] = [{spec.out_features}, "
                                 f"{rank}]")
            if rank > self.max_rank:
                raise ValueError(f"AdapterManager.load({name!r}): tensor {a_key!r} has rank {rank}, "
                                 f"above max_rank={self.max_rank} (AdapterManager(max_rank=...) "
                                 f"accepts 1..{MAX_RANK})")
            if alpha is None:
                raise ValueError(
                    f"AdapterManager.load({name!r}): config has no lora_alpha for module "
                    f"{module!r} (the scaling is lora_alpha / r and a state dict does not record "
                    f"it); pass config={{'r': {rank}, 'lora_alpha': ...}}, got config keys "
                    f"{sorted(config)}")
            scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
            weights[module] = ModuleWeights(a.detach(), b.detach(), scaling)
        return weights

    # ---- batches ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self, adapter_names: Sequence[str | None], keep: Iterable[str | None] = ()):
        """Apply ``adapter_names[i]`` to sequence ``i`` of every forward inside the block
        (``None``: base model), as PEFT's ``adapter_names`` argument does. Loads missing adapters
        into the pool, evicting least-recently-used ones that this batch does not use.

        ``keep``: adapters not to evict while the block runs although this call does not apply
        them (a serving loop running a new request's prompt alone keeps the adapters of the
        sequences decoding beside it; ``None`` entries are ignored). A KV cache sharing the pool
        that runs short of pages takes those of the other adapters, least recently used first.
        Building a batch costs a few host microseconds per adapter: a serving loop calls it for
        every step, as sequences join and leave.

        CUDA graphs: capture inside the block, after one eager call of the captured shape (it
        builds that shape's token map and SGMV plan). A graph reads this batch's tables, which are
        freed when the block exits: capture again for every batch."""
        if self._active is not None:
            raise RuntimeError(self._busy("AdapterManager.batch"))
        if self._merged is not None:
            raise RuntimeError(f"AdapterManager.batch: adapter {self._merged!r} is merged into the "
                               "base weights; unmerge() first")
        if isinstance(adapter_names, str):
            raise TypeError("AdapterManager.batch: adapter_names must be a sequence of names (one "
                            "per sequence), not a str")
        if isinstance(keep, str):
            raise TypeError("AdapterManager.batch: keep must be an iterable of names, not a str")
        names = list(adapter_names)
        kept = [n for n in dict.fromkeys(keep) if n is not None]
        bad = [n for n in names + kept if n is not None and not isinstance(n, str)]
        if bad:
            raise TypeError(f"AdapterManager.batch: adapter names must be str or None, got "
                            f"{bad[:4]}")
        distinct = [n for n in dict.fromkeys(names) if n is not None]
        unknown = [n for n in distinct if n not in self.store.host]
        if unknown:
            raise KeyError(f"unknown adapter(s) {unknown}; loaded adapters: {self.store.names()}")
        unknown = [n for n in kept if n not in self.store.host]
        if unknown:
            raise KeyError(f"AdapterManager.batch: keep names unknown adapter(s) {unknown}; "
                           f"loaded adapters: {self.store.names()}")
        if not names:
            raise ValueError("AdapterManager.batch: adapter_names is empty")
        with self.pool.lock:
            # Checked and claimed at once: a second thread opening a batch is refused.
            if self._active is not None or self._opening is not None:
                raise RuntimeError(self._busy("AdapterManager.batch"))
            self._opening = threading.get_ident()
        try:
            residents = self.store.acquire(distinct, keep=kept)
        except BaseException:
            self._opening = None
            raise
        try:
            position = {n: i for i, n in enumerate(distinct)}
            seq_adapter = torch.tensor([-1 if n is None else position[n] for n in names],
                                       dtype=torch.int32)
            if distinct:
                rows, ranks, scalings, module_rank = self.store.tables(distinct, residents)
            else:
                rows = ranks = scalings = None
                module_rank = [0] * len(self.store.modules)
            self._active = _BatchState(self, seq_adapter, len(distinct), rows, ranks, scalings,
                                       module_rank)
            yield self
        finally:
            self._active = None
            self._opening = None
            self.store.release()

    def _busy(self, what: str) -> str:
        thread = self._opening
        where = (" in this thread" if thread == threading.get_ident()
                 else f" in thread {thread}" if thread is not None else "")
        return (f"{what}: a batch is already active{where}; one thread runs the model "
                "(batches do not nest and are not shared between threads)")

    def _check_call(self, module, args, kwargs):
        """Forward pre-hook on the model: inside a batch, the call comes from the batch's thread
        and has one sequence per adapter name (refused here, before any layer runs)."""
        state = self._active
        if state is None:
            if self._opening is not None and self._opening != threading.get_ident():
                raise RuntimeError(f"AdapterManager: the model was called from thread "
                                   f"{threading.get_ident()} while thread {self._opening} is "
                                   "opening a batch; one thread runs the model")
            return None
        if self._opening != threading.get_ident():
            raise RuntimeError(f"AdapterManager: the model was called from thread "
                               f"{threading.get_ident()} while thread {self._opening} has a batch "
                               "open; one thread runs the model")
        x = args[0] if args else kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if isinstance(x, Tensor) and x.dim() >= 1 and x.shape[0] != state.batch_size:
            raise RuntimeError(f"AdapterManager.batch was given {state.batch_size} adapter names "
                               f"but the model got a batch of {x.shape[0]} sequences; "
                               "adapter_names needs one entry per sequence")
        return None

    # ---- merging ---------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Add one adapter's ``scaling * B @ A`` into the base weights (then no LoRA kernels run;
        batches are refused until :meth:`unmerge`)."""
        if self._merged is not None:
            raise RuntimeError(f"AdapterManager.merge: {self._merged!r} is already merged")
        if name not in self.store.host:
            raise KeyError(f"unknown adapter {name!r}; loaded adapters: {self.store.names()}")
        self._apply_delta(name, +1.0)
        self._merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapter from the base weights again."""
        if self._merged is None:
            raise RuntimeError("AdapterManager.unmerge: no adapter is merged")
        self._apply_delta(self._merged, -1.0)
        self._merged = None

    def _apply_delta(self, name: str, sign: float) -> None:
        for parent, child, base in self._originals:
            module_name = self.store.modules[getattr(parent, child)._index].name
            w = self.store.weights(name, module_name)
            if w is None:
                continue
            delta = (w.b.double() @ w.a.double()) * (sign * w.scaling)
            base.weight.add_(delta.to(device=base.weight.device, dtype=base.weight.dtype))

    def close(self) -> None:
        """Put the original nn.Linear modules back (unmerging first if needed) and give the
        adapters' pages back to the pool (which may be shared with KV caches or another
        manager)."""
        if self._active is not None or self._opening is not None:
            raise RuntimeError(self._busy("AdapterManager.close"))
        if self._merged is not None:
            self.unmerge()
        for parent, child, base in self._originals:
            setattr(parent, child, base)
        self._originals = []
        if self._call_hook is not None:
            self._call_hook.remove()
            self._call_hook = None
        self.store.close()


def _check_shared_page_size(pool: PagePool, specs: Sequence[ModuleSpec], max_rank: int) -> None:
    """Refuse a pool whose pages cannot hold the widest row; warn when packing an adapter into its
    pages would leave more than a third of them empty (a page just under twice a wide row)."""
    widest = max(max(s.in_features, s.out_features) for s in specs)
    if widest > pool.page_size:
        raise ValueError(f"AdapterManager: the pool's pages of {pool.page_size} elements cannot "
                         f"hold an adapter row of {widest} elements; create the pool with "
                         "PagePool.for_model(model, ...)")
    word = max(1, 16 // pool.storage.element_size())
    widths = [(s.in_features, s.out_features) for s in specs]
    waste = max(lora_page_waste(widths, rank, pool.page_size, word) for rank in (1, max_rank))
    if waste > 1 / 3:
        warnings.warn(f"AdapterManager: with pages of {pool.page_size} elements an adapter leaves "
                      f"{waste:.0%} of its pages empty (rows of "
                      f"{sorted({w for pair in widths for w in pair})} elements never straddle a "
                      "page); PagePool.for_model(model, ...) picks a page size that suits adapters "
                      "and KV caches", stacklevel=3)


# Projections a Llama-family block applies to one input, one after another.
FUSED_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _fused_groups(specs: Sequence[ModuleSpec]) -> list[list[int]]:
    """Module indices that share an input: the same parent, one of FUSED_PROJECTIONS, the same
    in_features. (A group whose members turn out to be called on different tensors still gives
    right results: each call then runs its own shrink.)"""
    groups: dict[tuple, list[int]] = {}
    for index, spec in enumerate(specs):
        parent, _, leaf = spec.name.rpartition(".")
        for kind, names in enumerate(FUSED_PROJECTIONS):
            if leaf in names:
                groups.setdefault((parent, kind, spec.in_features), []).append(index)
    return [members for members in groups.values() if len(members) > 1]


def _read_peft_dir(path: pathlib.Path):
    config_path = path / "adapter_config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"AdapterManager.load: {config_path} not found (not a PEFT adapter "
                                "directory)")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"AdapterManager.load: {config_path} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"AdapterManager.load: {config_path} must hold a JSON object, got "
                         f"{type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"AdapterManager.load: {path} is a {config['peft_type']} adapter, not LoRA")
    weights = path / "adapter_model.safetensors"
    if weights.exists():
        load_file = require("safetensors.torch", "AdapterManager.load").load_file
        try:
            state = load_file(str(weights))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"AdapterManager.load: cannot read {weights} (truncated or not a "
                             f"safetensors file?): {err}") from err
    elif (path / "adapter_model.bin").exists():
        state = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"AdapterManager.load: no adapter_model.safetensors in {path}")
    return state, config


def _check_config(name: str, config: Mapping) -> None:
    """The LoRA config's numbers, each named with its accepted range and the value given."""
    r = config.get("r")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise ValueError(f"AdapterManager.load({name!r}): config['r'] must be a positive int, "
                         f"got {r!r}")
    alpha = config.get("lora_alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)
                              or not math.isfinite(alpha)):
        raise ValueError(f"AdapterManager.load({name!r}): config['lora_alpha'] must be a finite "
                         f"number, got {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key) is not None and not isinstance(config[key], Mapping):
            raise ValueError(f"AdapterManager.load({name!r}): config[{key!r}] must be a dict of "
                             f"module pattern -> value, got {config[key]!r}")


def _matches_targets(module: str, targets) -> bool:
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _pattern_value(module: str, pattern: Mapping | None, default):
    # PEFT's rule: the first key that matches the end of the module name (as a regex) wins.
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default
