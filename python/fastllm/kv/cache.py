"""FastGenCache: a transformers Cache whose every (layer, sequence, KV head) keeps its own entries,
at its own length, in pages of the unified page pool.

How it plugs into transformers: the model's attention implementation becomes ``"fastllm_kv"``
(registered with ``AttentionInterface``). ``Cache.update`` only hands the new keys and values
(already rotated by RoPE at their true positions) to the attention function, which

* on the prompt: runs ordinary causal attention, profiles every KV head (``kv_attention_scores``,
  ``kv_policy_recovery``), picks its policy and writes only the kept entries into freshly
  allocated pages;
* on a decode step: appends the token to every head's cache, runs ``kv_ragged_decode`` over the
  ragged caches, adds the returned probabilities to the heavy-hitter scores and evicts at most one
  entry per head (``kv_evict_round``: swap with the last entry, free the last page when it
  empties).

Every other attention call (a model used with another cache) goes to transformers' SDPA.

On a GPU a decode step never waits for the device (issue 13). The bookkeeping (page table,
lengths, each entry's position, score and flags) lives on the cache's device and the step's
append, attention, score update and eviction are all device work. The host decides pages from a
mirror of each cache's length (``_HeadCaches``), which follows from the policy alone, never from
the scores; only the classes of generated tokens (special, punctuation) come from the device, by
a non-blocking copy the host reads a step or so later, and until then the mirror is an upper
bound. The prompt (profiling and compaction), multi-token steps, ``stats()`` and batch reorders
may synchronise.

Layout of ``fastllm.kv``: ``cache.py`` (this module: ``FastGenCache``, its layers and the
transformers ``Cache`` API, the running batch, ``stats``), ``attention.py`` (the attention path:
prompt profiling, decode and extend steps, registration with transformers), ``storage.py`` (the
ragged per-head caches in the page pool and the host mirror), ``decode.py`` (decode work planning
and the ``graph_steps`` state), ``policies.py`` (profiling and policy choice), ``profiling.py``
(``profile``).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import weakref

import numpy as np
import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from ..memory import PagePool, PoolExhaustedError
from .attention import ATTENTION_NAME, _AttentionPath, _pending, _register
from .decode import _decode_work, _DecodeWork, _GraphSteps, _LayerGraphSteps
from .policies import POLICIES, _check_source, budget_tokens, check_ratio
from .storage import _ClassLog, _HeadCaches

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def _check_supported(model) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"fastllm.kv: unsupported architecture {model_type!r}; FastGenCache supports the "
            f"Llama family: {', '.join(SUPPORTED_MODEL_TYPES)} (SmolLM2 is 'llama')")


class FastGenLayer(CacheLayerMixin):
    """One model layer of a :class:`FastGenCache`; holds no dense tensors."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, owner: "FastGenCache", layer_idx: int):
        super().__init__()
        self._owner = weakref.ref(owner)
        self.layer_idx = layer_idx
        self.seen = 0
        self.heads: _HeadCaches | None = None
        # [B, prompt] bool (host): which mask columns of each prompt are real tokens (pads are
        # never stored; every later column is real); later steps must present the same padding.
        self.prompt_valid: Tensor | None = None
        self.padded = False
        # Inside FastGenCache.graph_steps: this layer's step state on the device.
        self.graph: _LayerGraphSteps | None = None
        # On a GPU: the decode work list the last steps used (kept while it serves).
        self.decode_work: _DecodeWork | None = None

    @property
    def valid(self) -> Tensor | None:
        """[B, seen] bool: which mask columns of each sequence are real tokens."""
        if self.prompt_valid is None:
            return None
        extra = self.seen - self.prompt_valid.shape[1]
        if extra == 0:
            return self.prompt_valid
        return torch.cat([self.prompt_valid,
                          torch.ones(self.prompt_valid.shape[0], extra, dtype=torch.bool)], dim=1)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        stale = _pending.get("layer")
        if stale is self:
            raise RuntimeError(
                f"fastllm.kv: layer {self.layer_idx} was updated twice without attention running; "
                f"the model's attention implementation must be {ATTENTION_NAME!r} "
                "(FastGenCache sets it; was it changed afterwards?)")
        _pending.update(layer=self, key=key_states, value=value_states)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self.heads is not None:
            self.heads.release()
        self.heads = None
        self.prompt_valid = None
        self.padded = False
        self.seen = 0
        self.graph = None
        self.decode_work = None

    def reorder_cache(self, beam_idx) -> None:  # handled by FastGenCache
        raise NotImplementedError


class FastGenCache(_AttentionPath, Cache):
    """FastGen adaptive KV cache (Ge et al., "Model Tells You What to Discard", ICLR 2024).

    Args:
        model: a Llama-family transformers model (Llama, Mistral, Qwen2, SmolLM2). Its attention
            implementation is switched to ``"fastllm_kv"``; other caches keep working through SDPA.
        tokenizer: its tokenizer (special and punctuation token ids).
        recovery: FastGen's T in (0, 1]: share of attention mass each head must keep.
        locality: r_l in [0, 1], local window as a share of the prompt.
        frequency: r_f in [0, 1], heavy hitters as a share of the prompt.
        policy: "fastgen", or a fixed policy for every head: "full", "streaming" (sinks + recent
            window), "h2o" (heavy hitters + recent), "snapkv" (prompt selection by pooled scores of
            the last queries, then grows), "adakv" (SnapKV's scores, the layer's budget allotted
            across its KV heads by their score mass, AdaKV).
        budget: the fixed policies' kept tokens per head: a ratio of the prompt (float) or a count
            (int).
        heavy_pool: FastGen's frequency policy ranks keys by the accumulated attention of this
            many keys centred on each: the strongest of them plus its own (odd; 1 = the paper's
            ranking by single keys), so a phrase around a heavy hitter survives whole; see
            ``policies.heavy_scores``.
        observe: FastGen's heavy-hitter ranking and recovery check also weigh the attention of
            the prompt's last ``observe`` queries, which attend the way decode will (0 = the
            paper's whole-prompt attention only); see ``policies.fastgen_profile``.
        heavy_from, recovery_on: which prompt queries FastGen's heavy-hitter ranking and its
            recovery check read: ``"prompt"`` (all, the paper), ``"observed"`` (the last
            ``observe``) or ``"both"``; see ``policies.fastgen_profile``. Defaults: the ranking
            by the observed queries alone (it kept the most needles on both retrieval splits,
            docs/kv.md), the check on both.
        adaptive: FastGen's frequency heads of a layer share their heavy-hitter slots, allotted
            by attention mass (AdaKV-style; False = the paper's equal count per head).
        adaptive_floor: share of an equal split each head is guaranteed under ``adaptive`` and
            under policy ``"adakv"`` (AdaKV's safeguard; 1 = equal counts).
        heavy_fit: each FastGen frequency head keeps only the fewest heavy hitters with which
            its policy still recovers ``recovery`` (False = the paper's ``ceil(frequency * L)``
            per head); see ``policies.fastgen_profile``.
        sinks: tokens at the start StreamingLLM always keeps (policy ``"streaming"``).
        snap_window: last prompt queries whose attention SnapKV's selection uses (policy
            ``"snapkv"``).
        pool: a :class:`fastllm.memory.PagePool` to draw pages from (shared with other users), or
            None to create one holding ``max_tokens`` full-cache tokens.
        max_tokens: size of the pool created when ``pool`` is None: room for this many tokens in
            every (layer, KV head) cache uncompressed; a prompt that does not fit raises.
        page_rows: entries (one key and its value) per page of that pool; ignored with ``pool``
            (its page size decides). Smaller pages waste less memory per cache, larger ones
            need fewer page-table entries.
        chunk: query rows per pass of the profiling ops; bounds their working memory
            (``chunk x prompt length`` scores at a time), not their results.

    Examples:
        With a real model: ``cache = FastGenCache(model, tokenizer)``, then
        ``model.generate(**batch, **{cache_keyword(model): cache}, max_new_tokens=32)``. Here a
        tiny random Llama:

        >>> import transformers
        >>> _ = torch.manual_seed(0)
        >>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        ...     vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...     num_attention_heads=4, num_key_value_heads=2)).eval()
        >>> class Tokenizer:           # stands in for the model's; FastGen reads which ids are
        ...     all_special_ids = [0]  # special tokens and which decode to punctuation
        ...     def __len__(self):
        ...         return 64
        ...     def batch_decode(self, ids):
        ...         return ["." if i[0] % 8 == 0 else f" w{i[0]}" for i in ids]
        >>> ids = torch.randint(1, 64, (1, 40))
        >>> key = fastllm.kv.cache_keyword(model)
        >>> cache = fastllm.kv.FastGenCache(model, Tokenizer(), policy="full", page_rows=4)
        >>> with torch.no_grad():
        ...     _ = model(ids[:, :-1], **{key: cache}, use_cache=True)      # prefill
        ...     step = model(ids[:, -1:], **{key: cache}, use_cache=True)   # one decode step
        ...     dense = model(ids).logits[:, -1:]                           # no cache
        >>> torch.allclose(step.logits, dense, atol=1e-4)    # policy "full" keeps every entry
        True
        >>> cache.release()
        >>> cache = fastllm.kv.FastGenCache(model, Tokenizer(), recovery=0.5, page_rows=4)
        >>> with torch.no_grad():
        ...     _ = model(ids, **{key: cache}, use_cache=True)
        >>> stats = cache.stats()
        >>> stats["tokens"], len(stats["policies"]), len(stats["policies"][0])  # 2 layers x 2 heads
        (40, 2, 2)
        >>> stats["kept_entries"] < stats["full_entries"]   # some heads dropped some entries
        True
        >>> cache.release()

    On a GPU, decode steps read nothing back from the device (prefill does: it picks the
    policies). CUDA graphs: capture a decode step inside :meth:`graph_steps`, which keeps the
    step's position on the device and reserves the pages of the steps ahead; the capture then
    replays correctly step after step. Outside it a capture is refused (the step's position and
    pages would be host decisions baked into the graph).
    """

    def __init__(self, model, tokenizer, recovery: float = 0.95, locality: float = 0.3,
                 frequency: float = 0.3, policy: str = "fastgen", budget: float | int = 0.5,
                 sinks: int = 4, snap_window: int = 32, pool: PagePool | None = None,
                 max_tokens: int = 4096, page_rows: int = 16, chunk: int = 128,
                 heavy_pool: int = 11, observe: int = 64, heavy_from: str = "observed",
                 recovery_on: str = "both", adaptive: bool = False,
                 adaptive_floor: float = 0.2, heavy_fit: bool = False):
        _check_supported(model)
        if isinstance(heavy_pool, bool) or not isinstance(heavy_pool, int) or heavy_pool < 1 \
                or heavy_pool % 2 == 0:
            raise ValueError(f"fastllm.kv: heavy_pool must be a positive odd int, got {heavy_pool!r}")
        if isinstance(observe, bool) or not isinstance(observe, int) or observe < 0:
            raise ValueError(f"fastllm.kv: observe must be an int >= 0, got {observe!r}")
        self.heavy_pool, self.observe = heavy_pool, observe
        self.heavy_from = _check_source("heavy_from", heavy_from)
        self.recovery_on = _check_source("recovery_on", recovery_on)
        if not isinstance(adaptive, bool):
            raise TypeError(f"fastllm.kv: adaptive must be a bool, got {adaptive!r}")
        self.adaptive = adaptive
        self.adaptive_floor = check_ratio("adaptive_floor", adaptive_floor)
        if not isinstance(heavy_fit, bool):
            raise TypeError(f"fastllm.kv: heavy_fit must be a bool, got {heavy_fit!r}")
        self.heavy_fit = heavy_fit
        self.recovery = check_ratio("recovery", recovery, low_open=True)
        self.locality = check_ratio("locality", locality)
        self.frequency = check_ratio("frequency", frequency)
        if policy not in POLICIES:
            raise ValueError(f"fastllm.kv: policy must be one of {POLICIES}, got {policy!r}")
        budget_tokens(budget, 1)  # validates
        self.policy, self.budget, self.sinks, self.snap_window = policy, budget, sinks, snap_window
        self.chunk = chunk
        # What a sibling cache needs to profile a joining sequence's prompt exactly as this one
        # would (join()).
        self._settings = dict(recovery=recovery, locality=locality, frequency=frequency,
                              policy=policy, budget=budget, sinks=sinks, snap_window=snap_window,
                              chunk=chunk, heavy_pool=heavy_pool, observe=observe,
                              heavy_from=self.heavy_from, recovery_on=self.recovery_on,
                              adaptive=adaptive, adaptive_floor=adaptive_floor,
                              heavy_fit=heavy_fit)
        self._model_ref = weakref.ref(model)
        self._warned_pages = False
        cfg = model.config
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.width = 2 * self.head_dim
        param = next(model.parameters())
        if pool is None:
            pages_per_cache = -(-max_tokens // page_rows)
            pool = PagePool(self.num_layers * self.num_kv_heads * pages_per_cache,
                            page_rows * self.width, dtype=param.dtype, device=param.device)
        if pool.page_size % self.width:
            raise ValueError(f"fastllm.kv: pool page_size {pool.page_size} must be a multiple of "
                             f"2 * head_dim = {self.width}")
        self.pool = pool
        self.page_rows = pool.page_size // self.width
        self.tokenizer = tokenizer
        self._ids: Tensor | None = None
        self._step_classes: Tensor | None = None
        # This forward's token classes on the device, per sequence [B, n] and per cache [C]
        # (decode steps), and the host's knowledge of every position's class.
        self._step_device_classes: tuple | None = None
        self._class_log: _ClassLog | None = None
        self._class_tables: dict = {}
        self._mask_memo = None
        self._mask_checked = None
        self._mask_agreed = None
        self._shared_prompt_valid: Tensor | None = None
        self._graph: _GraphSteps | None = None
        self.last_profile_seconds = 0.0
        super().__init__(layers=[FastGenLayer(self, i) for i in range(self.num_layers)])
        _register()
        if model.config._attn_implementation != ATTENTION_NAME:
            model.set_attn_implementation(ATTENTION_NAME)
        ref = weakref.ref(self)

        def remember_ids(module, args, kwargs):
            cache = ref()
            if cache is None:
                return
            ids = args[0] if args else kwargs.get("input")
            cache._ids = ids
            cache._step_classes = None  # a new forward call: its ids may be reused in place
            cache._step_device_classes = None

        self._hook = model.get_input_embeddings().register_forward_pre_hook(remember_ids,
                                                                            with_kwargs=True)

    # ---- transformers Cache API ------------------------------------------------------------------

    def reorder_cache(self, beam_idx) -> None:
        order = [int(i) for i in torch.as_tensor(beam_idx).tolist()]
        batch = self._batch()
        if order == list(range(batch)):
            return
        if sorted(order) != list(range(batch)):
            raise ValueError(
                f"fastllm.kv: cannot honour the batch reorder {order[:16]}: FastGenCache can "
                "permute its sequences but not repeat or drop them (beam search is unsupported)")
        self._select(order)

    def batch_select_indices(self, indices) -> None:
        order = [int(i) for i in torch.as_tensor(indices).tolist()]
        if len(set(order)) != len(order):
            raise ValueError(f"fastllm.kv: cannot select repeated sequences {order[:16]}")
        self._select(order)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise ValueError("fastllm.kv: FastGenCache cannot repeat sequences "
                             f"(repeats={repeats}); use num_return_sequences=1 and num_beams=1")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("fastllm.kv: evicted entries cannot be restored, so "
                                  "FastGenCache does not support crop (assisted decoding)")

    @contextlib.contextmanager
    def graph_steps(self, steps: int):
        """Decode up to ``steps`` more tokens per sequence with each step's state on the device,
        so that one decode step captured with ``torch.cuda.graph`` replays correctly step after
        step::

            with cache.graph_steps(64):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    logits = model(ids, position_ids=positions, cache=cache).logits
                for _ in range(64):
                    graph.replay()          # then write the next token into ids, positions += 1

        On entry (synchronises): learns the token classes still in flight, reserves every
        cache's pages for ``steps`` more tokens and fixes the attention's work list. Inside,
        each decode step (eager or replayed) reads its position from a counter on the device and
        advances it, always moves the rows an eviction displaces, and frees no page; the host
        learns nothing of the steps. So pass the model the positions it cannot derive:
        ``position_ids`` (and ``cache_position`` on transformers versions that take it) as
        device tensors you advance, because ``get_seq_length()`` stays at its value on entry
        until exit; the attention mask is not read (a decode step never reads it on a GPU). Only
        one-token decode steps may run inside. On exit (synchronises): reads how many steps
        ran, brings the host mirror and the class log up to date and gives back the pages no
        cache needs. Raises there if more than ``steps`` steps ran: the extra steps' outputs are
        invalid (a full cache overwrote its last entry; no other cache's pages were touched).
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"fastllm.kv: graph_steps: steps must be a positive int, got "
                             f"{steps!r}")
        if self._graph is not None:
            raise RuntimeError("fastllm.kv: graph_steps: already inside graph_steps")
        if self.layers[0].heads is None:
            raise RuntimeError("fastllm.kv: graph_steps: run the prompt (prefill) first")
        self._settle()
        self._class_table_on(self.pool.device)  # a capture cannot upload it
        start = self.layers[0].seen
        try:
            for layer in self.layers:
                heads = layer.heads
                need = heads.bound(layer.seen) + steps
                heads.reserve(need)
                work = _decode_work(layer, int(need.max(initial=0)), lambda: need, heads.device)
                layer.graph = _LayerGraphSteps(heads, layer.seen, *work)
        except PoolExhaustedError as err:
            for layer in self.layers:
                layer.graph = None
                layer.heads.release_excess(layer.seen)
            raise PoolExhaustedError(
                f"fastllm.kv: graph_steps: no room for {steps} more tokens per sequence (pool of "
                f"{self.pool.num_pages} pages, {self.pool.free_pages} free); ask for fewer "
                "steps or give FastGenCache a larger pool") from err
        self._graph = _GraphSteps(start, steps, self._batch(), self.pool.device)
        try:
            yield self
        finally:
            self._end_graph_steps()

    def _end_graph_steps(self) -> None:
        if self._graph is None:  # released inside graph_steps: nothing left to learn
            return
        graph, self._graph = self._graph, None
        counters = torch.cat([layer.graph.seen for layer in self.layers]).cpu()
        ran = sorted(set((counters - graph.start).tolist()))
        for layer in self.layers:
            layer.graph = None
        if len(ran) != 1:
            # A forward stopped part-way: the layers disagree and the cache cannot be repaired.
            self.release()
            raise RuntimeError(f"fastllm.kv: graph_steps: the layers ran different numbers of "
                               f"steps {ran}; the cache was released")
        ran = ran[0]
        known = min(ran, graph.steps)
        if known:
            self._class_log.store(graph.start, graph.classes[:, :known].cpu().numpy())
        if ran > known:  # steps past the reservation: their classes were not kept (class 0)
            self._class_log.store(graph.start + known,
                                  np.zeros((graph.classes.shape[0], ran - known), np.uint8))
        for layer in self.layers:
            layer.seen = graph.start + ran
            layer.heads.resync(layer.seen)
            layer.heads.release_excess(layer.seen)
        self._step_device_classes = None
        if ran > graph.steps:
            raise RuntimeError(
                f"fastllm.kv: graph_steps({graph.steps}): {ran} decode steps ran; the outputs of "
                f"the {ran - graph.steps} steps past the reserved ones are invalid")

    # ---- a running batch: sequences join and leave ----------------------------------------------

    @property
    def batch_size(self) -> int:
        """Sequences in the cache (0 before the prompt and after the last one left)."""
        return self._batch()

    def join(self, input_ids: Tensor, attention_mask: Tensor | None = None, **model_kwargs):
        """Add a sequence to the running batch: run its prompt through the model alone (with a
        sibling cache on the same pool and settings, so it is profiled exactly as it would be on
        its own) and append its caches as the last sequence of this batch. The others keep their
        caches; the batch's pad columns are renumbered so that every sequence ends at the same
        mask column (positions, which the policies count, do not change).

        Args:
            input_ids: ``[1, L]`` token ids of the prompt (``L >= 1``), on the model's device.
            attention_mask: optional ``[1, L]`` 0/1 padding of the prompt.
            **model_kwargs: passed to the model call (an AdapterManager batch applies the
                sequence's adapter if the call runs inside ``manager.batch([name], ...)``).

        Returns the model's output for the prompt (``.logits [1, L, vocab]``).

        All or nothing: if the pool cannot hold the prompt's kept entries, the sibling's pages
        go back, :class:`~fastllm.memory.PoolExhaustedError` is raised and this cache is
        unchanged. Not a decode step (it synchronises). The next steps must pass
        ``attention_mask=cache.attention_mask(1)`` and ``position_ids=cache.position_ids(1)``.
        """
        self._refuse_inside_graph_steps("join")
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1 \
                or input_ids.shape[1] < 1 or input_ids.is_floating_point():
            raise ValueError(f"fastllm.kv: join: input_ids must be an integer tensor [1, L] with "
                             f"L >= 1, got {getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if attention_mask is not None and (not isinstance(attention_mask, Tensor)
                                           or tuple(attention_mask.shape) != tuple(input_ids.shape)):
            raise ValueError(f"fastllm.kv: join: attention_mask must have the shape of input_ids "
                             f"{tuple(input_ids.shape)}, got "
                             f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
        for key in ("past_key_values", "cache", "use_cache", "input_ids", "attention_mask"):
            if key in model_kwargs:
                raise ValueError(f"fastllm.kv: join: {key} is set by join itself")
        model = self._model_ref()
        if model is None:
            raise RuntimeError("fastllm.kv: join: the model this cache was made for is gone")
        single = FastGenCache(model, self.tokenizer, pool=self.pool, **self._settings)
        single._warned_pages = self._warned_pages
        try:
            with torch.no_grad():
                out = model(input_ids=input_ids, attention_mask=attention_mask, cache=single,
                            use_cache=True, **model_kwargs)
            if any(layer.heads is None for layer in single.layers):
                raise RuntimeError("fastllm.kv: join: the model call did not run the prompt "
                                   "through every layer's attention")
            self._adopt(single)
        finally:
            single.release()  # the pages of a failed join; nothing once adopted
            single._hook.remove()
        self._warned_pages = self._warned_pages or single._warned_pages
        return out

    def _adopt(self, single: "FastGenCache") -> None:
        """Append the one sequence of ``single`` (prefilled, same pool) to this batch."""
        single._settle()
        if self._batch() == 0:
            self.release()
            for mine, theirs in zip(self.layers, single.layers):
                mine.heads, mine.prompt_valid = theirs.heads, theirs.prompt_valid
                mine.padded, mine.seen = theirs.padded, theirs.seen
                mine.decode_work = None
                theirs.heads = None
            self._class_log = single._class_log
        else:
            self._settle()
            ours, theirs_seen = self.layers[0].seen, single.layers[0].seen
            target = max(ours, theirs_seen)
            self._shift(target - ours)
            single._shift(target - theirs_seen)
            for mine, theirs in zip(self.layers, single.layers):
                mine.heads.concat(theirs.heads)
                mine.prompt_valid = torch.cat([mine.valid, theirs.valid])
                mine.padded = not bool(mine.prompt_valid.all())
                mine.decode_work = None
            self._class_log.concat(single._class_log)
        self.last_profile_seconds += single.last_profile_seconds
        self._forget_step_memos()

    def leave(self, index: int) -> None:
        """Remove sequence ``index`` from the running batch and give its pages back to the pool;
        the others keep decoding (their indices above ``index`` move down by one). Pad columns
        that no remaining sequence needs are dropped. Not a decode step (it synchronises)."""
        self._refuse_inside_graph_steps("leave")
        batch = self._batch()
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < batch:
            raise ValueError(f"fastllm.kv: leave: index must be an int in [0, {batch}), got "
                             f"{index!r}")
        if batch == 1:
            self.release()
            return
        self._select([i for i in range(batch) if i != index])
        valid = self.layers[0].valid
        real = valid.any(0).nonzero()
        leading = int(real[0]) if real.numel() else 0
        if leading:
            self._shift(-leading)
        self._forget_step_memos()

    def attention_mask(self, new_tokens: int = 1) -> Tensor:
        """The ``[B, seen + new_tokens]`` 0/1 attention mask the next step must pass (the
        batch's pad columns, then ones), on the pool's device."""
        if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 0:
            raise ValueError(f"fastllm.kv: attention_mask: new_tokens must be an int >= 0, got "
                             f"{new_tokens!r}")
        valid = self.layers[0].valid
        if valid is None:
            raise RuntimeError("fastllm.kv: attention_mask: the cache holds no sequence")
        mask = torch.cat([valid, torch.ones(valid.shape[0], new_tokens, dtype=torch.bool)], 1)
        return mask.to(device=self.pool.device, dtype=torch.int64)

    def position_ids(self, new_tokens: int = 1) -> Tensor:
        """``[B, new_tokens]`` positions of each sequence's next tokens (its real tokens so far,
        then on), on the pool's device: the next step's ``position_ids``."""
        if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
            raise ValueError(f"fastllm.kv: position_ids: new_tokens must be an int >= 1, got "
                             f"{new_tokens!r}")
        valid = self.layers[0].valid
        if valid is None:
            raise RuntimeError("fastllm.kv: position_ids: the cache holds no sequence")
        start = valid.sum(1, keepdim=True).to(torch.int64)
        return (start + torch.arange(new_tokens)).to(self.pool.device)

    def _shift(self, columns: int) -> None:
        """``columns`` more (negative: fewer) pad columns before every sequence, in every layer
        and the class log; the caller settled the cache."""
        if not columns:
            return
        for layer in self.layers:
            valid = layer.valid
            if columns > 0:
                layer.prompt_valid = torch.cat(
                    [torch.zeros(valid.shape[0], columns, dtype=torch.bool), valid], 1)
            else:
                if bool(valid[:, :-columns].any()):
                    raise RuntimeError("fastllm.kv: internal error: dropping columns that hold "
                                       "tokens")
                layer.prompt_valid = valid[:, -columns:].clone()
            layer.padded = not bool(layer.prompt_valid.all())
            layer.heads.shift(columns)
            layer.seen += columns
            layer.decode_work = None
        self._class_log.shift(columns)

    def _forget_step_memos(self) -> None:
        self._mask_memo = None
        self._mask_checked = None
        self._mask_agreed = None
        self._step_device_classes = None
        self._step_classes = None

    def _refuse_inside_graph_steps(self, what: str) -> None:
        if self._graph is not None:
            raise RuntimeError(f"fastllm.kv: {what} is not possible inside graph_steps (the "
                               "host does not know the steps' state until it exits)")

    def _batch(self) -> int:
        layer = self.layers[0]
        if layer.heads is None:
            return 0
        return len(layer.heads.pages) // self.num_kv_heads

    def _select(self, order: list[int]) -> None:
        # Not a decode step: the host may wait for the device here.
        self._refuse_inside_graph_steps("reordering the batch")
        self._settle()
        for layer in self.layers:
            if layer.heads is None:
                continue
            caches = [b * self.num_kv_heads + h for b in order for h in range(self.num_kv_heads)]
            layer.heads.select(caches)
            layer.prompt_valid = layer.prompt_valid[torch.tensor(order, dtype=torch.int64)].clone()
        if self._class_log is not None:
            self._class_log.select(order)

    def _settle(self) -> None:
        """Learn every token class still in flight, bring each layer's host mirror up to date
        and give back the pages it no longer needs (synchronises with the device)."""
        if self._class_log is None:
            return
        self._class_log.settle()
        for layer in self.layers:
            if layer.heads is not None:
                layer.heads.advance(layer.seen, self._class_log)
                layer.heads.release_excess(layer.seen)

    def release(self) -> None:
        """Give every page back to the pool and forget all tokens."""
        for layer in self.layers:
            layer.reset()
        self._class_log = None
        self._step_device_classes = None
        self._graph = None

    def reset(self) -> None:
        self.release()

    def __del__(self):
        # At interpreter exit the pool may already be gone, and touching tensors then aborts.
        if sys.is_finalizing():
            return
        try:
            self.release()
            self._hook.remove()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ---- statistics ------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Memory held against a full cache of the same tokens, and each head's policy.

        Padding is not a token: a full cache would hold each sequence's real tokens only, and
        pad entries are never stored, so neither side counts them. Synchronises with the device
        (it learns the token classes still in flight and returns the pages they free)."""
        self._refuse_inside_graph_steps("stats()")
        self._settle()
        pages = 0
        kept_entries = 0
        full_entries = 0
        policies = []
        for layer in self.layers:
            heads = layer.heads
            if heads is None:
                policies.append([])
                continue
            pages += sum(len(p) for p in heads.pages)
            real = layer.seen - heads.h_offset
            full_entries += int(real.sum())
            lengths = heads.lengths.cpu().numpy()
            if not np.array_equal(lengths, heads.m_len):
                raise RuntimeError(
                    f"fastllm.kv: internal error: layer {layer.layer_idx}'s host mirror of the "
                    f"cache lengths {heads.m_len.tolist()[:8]} differs from the device's "
                    f"{lengths.tolist()[:8]}")
            kept_entries += int(lengths.sum())
            policies.append([{"policy": p.name, "kept": int(n)}
                             for p, n in zip(heads.policies, lengths.tolist())])
        first = self.layers[0]
        seen = first.seen
        entry_bytes = self.width * self.pool.storage.element_size()
        return {
            # What this cache holds (whole pages) against what a dense cache of the same tokens
            # would (no pages: no rounding), so the ratio counts the page waste too.
            "kept_bytes": pages * self.pool.page_bytes,
            "full_bytes": full_entries * entry_bytes,
            "pages": pages,
            "kept_entries": kept_entries,
            "full_entries": full_entries,
            "entry_bytes": entry_bytes,
            "tokens": seen,
            "sequence_tokens": ([] if first.valid is None
                                else first.valid.sum(1).tolist()),
            "profile_seconds": self.last_profile_seconds,
            "policies": policies,
        }


def cache_keyword(model) -> str:
    """The keyword by which ``model`` (and its ``generate``) takes a cache: ``"cache"`` on the
    transformers releases that renamed ``past_key_values`` (5.2x, where the old name still works
    but warns on every call), ``"past_key_values"`` before them.

    >>> import transformers
    >>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    ...     vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...     num_attention_heads=2))
    >>> cache = transformers.DynamicCache()
    >>> ids = torch.randint(64, (1, 5))
    >>> _ = model(ids, **{fastllm.kv.cache_keyword(model): cache}, use_cache=True)
    >>> cache.get_seq_length()
    5
    """
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def __getattr__(name: str):
    # ``profile`` lived here before the split; it imports this module, so it is loaded lazily.
    if name == "profile":
        from .profiling import profile
        return profile
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
