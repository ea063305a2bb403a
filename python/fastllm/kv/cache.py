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
  entry per head (swap with the last entry, free the last page when it empties).

Every other attention call (a model used with another cache) goes to transformers' SDPA.
"""

from __future__ import annotations

import sys
import time
import weakref

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..memory import PagePool, PoolExhaustedError
from .._ops import kv as kv_ops
from .._reference.kv import KEEP
from .policies import (
    POLICIES,
    HeadPolicy,
    budget_tokens,
    check_ratio,
    fastgen_profile,
    kept_at_prefill,
    token_classes,
)

ATTENTION_NAME = "fastllm_kv"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
OWNER = "kv"

# The layer whose update() ran last, with the tensors it returned: the attention function that
# follows in the same layer picks it up (identity-checked, so a stale entry is never used).
_pending: dict = {}


def _check_supported(model) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"fastllm.kv: unsupported architecture {model_type!r}; FastGenCache supports the "
            f"Llama family: {', '.join(SUPPORTED_MODEL_TYPES)} (SmolLM2 is 'llama')")


class _HeadCaches:
    """Bookkeeping for one layer's B * Hkv ragged caches (host tensors, small)."""

    def __init__(self, pool: PagePool, page_rows: int, width: int, policies: list[HeadPolicy]):
        self.pool, self.page_rows, self.width = pool, page_rows, width
        count = len(policies)
        self.policies = policies
        self.pages: list[list[int]] = [[] for _ in range(count)]
        self.page_table = torch.zeros(count, 1, dtype=torch.int32)
        self.lengths = torch.zeros(count, dtype=torch.int64)
        self.pos = torch.zeros(count, 16, dtype=torch.int64)
        self.score = torch.zeros(count, 16, dtype=torch.float32)
        # The token's class bits, plus KEEP when the policy keeps the entry whatever its age and
        # score (specials, punctuation, sinks): set when written, so eviction never re-derives it.
        self.flags = torch.zeros(count, 16, dtype=torch.uint8)
        # Class bits (1 special, 2 punctuation) each cache's policy keeps for good.
        self.keep_classes = torch.tensor([int(p.keep_special) | 2 * int(p.keep_punct)
                                          for p in policies], dtype=torch.uint8)
        self.sinks = torch.tensor([p.sinks for p in policies], dtype=torch.int64)
        self.window = torch.tensor([p.window for p in policies], dtype=torch.int64)
        self.heavy = torch.tensor([p.heavy for p in policies], dtype=torch.int64)
        self.grow = torch.tensor([p.grow for p in policies])
        # Padding columns of each cache's sequence seen so far: a token at mask column c has
        # position c - offset among its sequence's real tokens (what sinks and windows count).
        self.offset = torch.zeros(count, dtype=torch.int64)
        self._device_tables = None

    # ---- storage ---------------------------------------------------------------------------------

    def _ensure_capacity(self, cache: int, entries: int) -> None:
        need = -(-entries // self.page_rows)
        have = len(self.pages[cache])
        if need > have:
            ids = self.pool.alloc(need - have, OWNER).tolist()
            self.pages[cache].extend(ids)
            if need > self.page_table.shape[1]:
                grown = torch.zeros(self.page_table.shape[0], max(need, 2 * self.page_table.shape[1]),
                                    dtype=torch.int32)
                grown[:, :self.page_table.shape[1]] = self.page_table
                self.page_table = grown
            self.page_table[cache, have:need] = torch.tensor(ids, dtype=torch.int32)
            self._device_tables = None
        if entries > self.pos.shape[1]:
            cap = max(entries, 2 * self.pos.shape[1])
            for name in ("pos", "score", "flags"):
                old = getattr(self, name)
                new = torch.zeros(old.shape[0], cap, dtype=old.dtype)
                new[:, :old.shape[1]] = old
                setattr(self, name, new)

    def slots(self, cache: int, entries: Tensor) -> Tensor:
        return self.slots_of(torch.full_like(entries, cache), entries)

    def slots_of(self, caches: Tensor, entries: Tensor) -> Tensor:
        """Pool slot of entry ``entries[i]`` of cache ``caches[i]``."""
        pages = self.page_table[caches, entries // self.page_rows].to(torch.int64)
        return pages * self.page_rows + entries % self.page_rows

    def rows_view(self) -> Tensor:
        return self.pool.rows(self.width)

    def write(self, cache: int, rows: Tensor, pos: Tensor, cls: Tensor, score: Tensor) -> None:
        """Append entries (rows [n, 2D] on the pool's device) to one cache."""
        n = rows.shape[0]
        start = int(self.lengths[cache])
        self._ensure_capacity(cache, start + n)
        entries = torch.arange(start, start + n)
        self.pool.write(self.slots(cache, entries).to(self.pool.device), rows.contiguous())
        pos, cls = pos.cpu(), cls.cpu()
        self.pos[cache, start:start + n] = pos
        self.flags[cache, start:start + n] = self._flags(cache, pos, cls)
        self.score[cache, start:start + n] = score.float().cpu()
        self.lengths[cache] = start + n
        self._device_tables = None

    def append_one(self, rows: Tensor, pos: Tensor, cls: Tensor) -> None:
        """Append one entry to every cache (rows [count, 2D] on the pool's device, pos and cls
        [count] on the host), its score 0 until the step's attention adds to it: a decode step.
        One pool write and one indexed store per field for the whole layer; per-cache calls cost
        a quarter of a decode step's samples in small host ops."""
        entries = self.lengths.clone()
        if bool((entries % self.page_rows == 0).any()) or int(entries.max()) >= self.pos.shape[1]:
            for cache in range(len(self.pages)):
                self._ensure_capacity(cache, int(entries[cache]) + 1)
        caches = torch.arange(len(self.pages))
        self.pool.write(self.slots_of(caches, entries).to(self.pool.device), rows.contiguous())
        self.pos[caches, entries] = pos
        self.flags[caches, entries] = self._flags(slice(None), pos, cls)
        self.score[caches, entries] = 0.0
        self.lengths += 1
        self._device_tables = None

    def _flags(self, caches, pos: Tensor, cls: Tensor) -> Tensor:
        """Flags of entries (token position ``pos``, class ``cls``) of ``caches``: the class, and
        KEEP where the cache's policy keeps the entry for good."""
        keep = ((cls & self.keep_classes[caches]) != 0) | (pos < self.sinks[caches])
        return cls | keep.to(torch.uint8) * KEEP

    def read(self, cache: int) -> Tensor:
        """All entries of one cache as [n, 2D] (the dense fallback for multi-token steps)."""
        n = int(self.lengths[cache])
        return self.pool.gather(self.slots(cache, torch.arange(n)).to(self.pool.device), self.width)

    def device_tables(self, device) -> tuple[Tensor, Tensor]:
        if self._device_tables is None:
            self._device_tables = (self.page_table.to(device),
                                   self.lengths.to(device=device, dtype=torch.int32))
        return self._device_tables

    # ---- eviction --------------------------------------------------------------------------------

    def evict_round(self, newest: Tensor, step_scores: Tensor | None = None) -> bool:
        """Add ``step_scores`` [count, W] (this step's attention per entry) into the scores, then
        evict at most one entry per cache that holds more than its policy allows; ``newest``
        [count] is each cache's newest token position (sequences are padded differently).

        The bookkeeping (choice of victims, each cache's last entry moved into its hole: order is
        irrelevant to attention once positions are baked into the keys) is one op,
        ``kv_evict_round``; a dozen small tensor ops per layer here made a decode step's
        bookkeeping cost more than its attention. The pool rows then move in one gather and one
        write, and pages that emptied go back to the pool."""
        if step_scores is None:
            step_scores = torch.empty(len(self.pages), 0)
        moves = kv_ops.kv_evict_round(self.pos, self.score, self.flags, self.lengths,
                                      step_scores, newest, self.window, self.heavy, self.grow)
        caches = (moves[:, 0] >= 0).nonzero().flatten()
        if caches.numel() == 0:
            return False
        victim, last = moves[caches].unbind(1)
        moving = victim != last
        if bool(moving.any()):
            into = caches[moving]
            self.pool.write(self.slots_of(into, victim[moving]).to(self.pool.device),
                            self.pool.gather(self.slots_of(into, last[moving]).to(self.pool.device),
                                             self.width))
        for cache in caches[last % self.page_rows == 0].tolist():
            if self.pages[cache]:
                # The last page just emptied: give it back.
                self.pool.free([self.pages[cache].pop()])
        self._device_tables = None
        return True

    # ---- batch -----------------------------------------------------------------------------------

    def select(self, order: list[int]) -> None:
        """Keep caches in ``order`` (no repeats); free the pages of the others."""
        kept = set(order)
        for cache in range(len(self.pages)):
            if cache not in kept and self.pages[cache]:
                self.pool.free(self.pages[cache])
        index = torch.tensor(order, dtype=torch.int64)
        self.pages = [self.pages[i] for i in order]
        self.policies = [self.policies[i] for i in order]
        for name in ("page_table", "lengths", "pos", "score", "flags", "keep_classes", "sinks",
                     "window", "heavy", "grow", "offset"):
            setattr(self, name, getattr(self, name)[index].clone())
        self._device_tables = None

    def release(self) -> None:
        for pages in self.pages:
            if pages:
                self.pool.free(pages)
        self.pages = [[] for _ in self.pages]
        self.lengths.zero_()
        self._device_tables = None


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
        # [B, seen] bool: which mask columns of each sequence are real tokens (pads are never
        # stored); later steps must present the same padding.
        self.valid: Tensor | None = None

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
        self.valid = None
        self.seen = 0

    def reorder_cache(self, beam_idx) -> None:  # handled by FastGenCache
        raise NotImplementedError


class FastGenCache(Cache):
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
            the last queries, then grows).
        budget: the fixed policies' kept tokens per head: a ratio of the prompt (float) or a count
            (int).
        heavy_pool: FastGen's frequency policy ranks keys by the accumulated attention of this
            many keys centred on each: the strongest of them plus its own (odd; 1 = the paper's
            ranking by single keys), so a phrase around a heavy hitter survives whole; see
            ``policies.heavy_scores``.
        observe: FastGen's heavy-hitter ranking and recovery check also weigh the attention of
            the prompt's last ``observe`` queries, which attend the way decode will (0 = the
            paper's whole-prompt attention only); see ``policies.fastgen_profile``.
        pool: a :class:`fastllm.memory.PagePool` to draw pages from (shared with other users), or
            None to create one holding ``max_tokens`` full-cache tokens.
    """

    def __init__(self, model, tokenizer, recovery: float = 0.95, locality: float = 0.3,
                 frequency: float = 0.3, policy: str = "fastgen", budget: float | int = 0.5,
                 sinks: int = 4, snap_window: int = 32, pool: PagePool | None = None,
                 max_tokens: int = 4096, page_rows: int = 16, chunk: int = 128,
                 heavy_pool: int = 11, observe: int = 64):
        _check_supported(model)
        if isinstance(heavy_pool, bool) or not isinstance(heavy_pool, int) or heavy_pool < 1 \
                or heavy_pool % 2 == 0:
            raise ValueError(f"fastllm.kv: heavy_pool must be a positive odd int, got {heavy_pool!r}")
        if isinstance(observe, bool) or not isinstance(observe, int) or observe < 0:
            raise ValueError(f"fastllm.kv: observe must be an int >= 0, got {observe!r}")
        self.heavy_pool, self.observe = heavy_pool, observe
        self.recovery = check_ratio("recovery", recovery, low_open=True)
        self.locality = check_ratio("locality", locality)
        self.frequency = check_ratio("frequency", frequency)
        if policy not in POLICIES:
            raise ValueError(f"fastllm.kv: policy must be one of {POLICIES}, got {policy!r}")
        budget_tokens(budget, 1)  # validates
        self.policy, self.budget, self.sinks, self.snap_window = policy, budget, sinks, snap_window
        self.chunk = chunk
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
        self._mask_memo = None
        self._mask_checked = None
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

    def _batch(self) -> int:
        layer = self.layers[0]
        if layer.heads is None:
            return 0
        return len(layer.heads.pages) // self.num_kv_heads

    def _select(self, order: list[int]) -> None:
        for layer in self.layers:
            if layer.heads is None:
                continue
            caches = [b * self.num_kv_heads + h for b in order for h in range(self.num_kv_heads)]
            layer.heads.select(caches)
            layer.valid = layer.valid[torch.tensor(order, dtype=torch.int64)].clone()

    def release(self) -> None:
        """Give every page back to the pool and forget all tokens."""
        for layer in self.layers:
            layer.reset()

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
        pad entries are never stored, so neither side counts them."""
        pages = 0
        full_pages = 0
        kept_entries = 0
        full_entries = 0
        policies = []
        for layer in self.layers:
            heads = layer.heads
            if heads is None:
                policies.append([])
                continue
            pages += sum(len(p) for p in heads.pages)
            real = layer.seen - heads.offset
            full_pages += int((-(-real // self.page_rows)).sum())
            full_entries += int(real.sum())
            kept_entries += int(heads.lengths.sum())
            policies.append([{"policy": p.name, "kept": int(n)}
                             for p, n in zip(heads.policies, heads.lengths.tolist())])
        first = self.layers[0]
        seen = first.seen
        entry_bytes = self.width * self.pool.storage.element_size()
        return {
            "kept_bytes": pages * self.pool.page_bytes,
            "full_bytes": full_pages * self.pool.page_bytes,
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

    # ---- the attention path ----------------------------------------------------------------------

    def _classes(self, batch: int, length: int, device) -> Tensor:
        ids = self._ids
        if ids is None or ids.shape != (batch, length):
            if self.policy == "fastgen":
                raise ValueError("fastllm.kv: FastGen needs the token ids of each step (call the "
                                 "model with input_ids, not inputs_embeds)")
            return torch.zeros(batch, length, dtype=torch.uint8, device=device)
        # Every layer of a step asks for the same ids' classes: look them up once per step.
        if self._step_classes is None:
            self._step_classes = token_classes(self.tokenizer, ids)
        return self._step_classes.to(device)

    def _visible(self, attention_mask, batch: int, queries: int, keys: int) -> Tensor | None:
        """The mask as bool [B, Q, K] on the CPU (True = may attend), or None for plain causal.

        Computed once per forward: transformers hands every layer the same mask tensor."""
        if attention_mask is None:
            return None
        memo = self._mask_memo
        if memo is not None and memo[0] is attention_mask:
            return memo[1]
        mask = attention_mask
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (queries, keys) \
                or mask.shape[0] not in (1, batch):
            raise ValueError(
                f"fastllm.kv: cannot honour an attention mask of shape {tuple(mask.shape)}: "
                f"expected [batch, 1, {queries}, {keys}] (one mask shared by all heads)")
        if mask.dtype == torch.bool:
            vis = mask[:, 0]
        elif mask.is_floating_point():
            vis = mask[:, 0] == 0
            if not bool((vis | (mask[:, 0] <= torch.finfo(mask.dtype).min / 2)).all()):
                raise ValueError("fastllm.kv: cannot honour an additive attention mask with "
                                 "values other than 0 and -inf (an attention bias)")
        else:
            raise ValueError(f"fastllm.kv: attention mask of dtype {mask.dtype} is not supported")
        vis = vis.expand(batch, queries, keys).cpu()
        self._mask_memo = (attention_mask, vis)
        return vis

    @staticmethod
    def _check_causal_padding(vis: Tensor, valid: Tensor, past: int) -> None:
        """The only patterns FastGenCache can honour: every real query attends causally to every
        real key before it, and to nothing else (padding may sit anywhere in the prompt)."""
        batch, queries, keys = vis.shape
        qpos = past + torch.arange(queries)
        want = (torch.arange(keys)[None, :] <= qpos[:, None])[None] & valid[:, None, :]
        real_rows = valid[:, past:]
        bad = ((vis != want) & real_rows[:, :, None]).nonzero()
        if bad.shape[0]:
            b, i, j = bad[0].tolist()
            raise ValueError(
                f"fastllm.kv: cannot honour this attention mask: sequence {b}, query {past + i} "
                f"{'sees' if bool(vis[b, i, j]) else 'does not see'} key {j}; FastGenCache "
                "supports causal attention with padding (an attention_mask of 0/1 per token) only")

    def _check_once(self, attention_mask, vis: Tensor, valid: Tensor, past: int) -> None:
        if self._mask_checked is not attention_mask:
            self._check_causal_padding(vis, valid, past)
            self._mask_checked = attention_mask

    def _prefill_policies(self, q: Tensor, k: Tensor, classes: Tensor, scale: float):
        """Policies and kept positions of one sequence's KV heads; q [Hq, L, D], k [Hkv, L, D]."""
        length = k.shape[1]
        hkv = k.shape[0]
        policies, kept, scores = [], [], None
        if self.policy == "fastgen":
            policies, kept, scores, _ = fastgen_profile(q, k, classes, scale, self.recovery,
                                                        self.locality, self.frequency, self.chunk,
                                                        self.heavy_pool, self.observe)
            return policies, kept, scores
        budget = min(budget_tokens(self.budget, length), length)
        if self.policy == "full":
            p = HeadPolicy("full", grow=True)
        elif self.policy == "streaming":
            sinks = min(self.sinks, budget)
            p = HeadPolicy("streaming", sinks=sinks, window=budget - sinks)
        elif self.policy == "h2o":
            scores = kv_ops.kv_attention_scores(q, k, scale, self.chunk).cpu()
            p = HeadPolicy("h2o", heavy=budget // 2, window=budget - budget // 2)
        else:  # snapkv
            obs = min(self.snap_window, budget, length)
            window_scores = kv_ops.kv_attention_scores(q[:, -obs:], k, scale, self.chunk).cpu()
            scores = torch.nn.functional.avg_pool1d(window_scores[:, None], 7, 1, 3,
                                                    count_include_pad=False)[:, 0]
            p = HeadPolicy("snapkv", window=obs, heavy=budget - obs, grow=True)
        for h in range(hkv):
            policies.append(p)
            kept.append(kept_at_prefill(p, classes.cpu(), None,
                                        scores[h] if scores is not None else None))
        return policies, kept, scores

    def _prefill(self, layer: FastGenLayer, q: Tensor, k: Tensor, v: Tensor, scale: float,
                 valid: Tensor) -> None:
        """Profile and store one prompt. ``valid`` [B, L] marks real tokens: each sequence is
        profiled on its real tokens only, exactly as if it ran alone (its rotary positions
        already skip the padding), and pads never reach a page."""
        batch, _, length, _ = k.shape
        classes = self._classes(batch, length, torch.device("cpu"))
        all_policies, writes = [], []
        start = time.perf_counter()
        for b in range(batch):
            cols = valid[b].nonzero().flatten()
            if cols.numel() == 0:
                raise ValueError(f"fastllm.kv: sequence {b} of the batch is all padding")
            if cols.numel() == length:
                qb, kb = q[b], k[b]
            else:
                dev_cols = cols.to(q.device)
                qb, kb = q[b][:, dev_cols], k[b][:, dev_cols]
            policies, kept, scores = self._prefill_policies(qb, kb, classes[b, cols], scale)
            all_policies += policies
            writes.append((cols, kept, scores))
        self.last_profile_seconds += time.perf_counter() - start
        heads = _HeadCaches(self.pool, self.page_rows, self.width, all_policies)
        layer.heads = heads
        layer.valid = valid.clone()
        try:
            for b, (cols, kept, scores) in enumerate(writes):
                for h, positions in enumerate(kept):
                    c = b * self.num_kv_heads + h
                    heads.offset[c] = length - cols.numel()
                    dev_cols = cols[positions].to(k.device)
                    rows = torch.cat([k[b, h, dev_cols], v[b, h, dev_cols]], dim=-1)
                    score = (scores[h, positions] if scores is not None
                             else torch.zeros(positions.shape[0]))
                    heads.write(c, rows, positions, classes[b, cols[positions]], score)
        except PoolExhaustedError as err:
            self.release()
            raise PoolExhaustedError(
                f"fastllm.kv: a prompt of {length} tokens (batch {batch}) does not fit the page "
                f"pool ({self.pool.num_pages} pages of {self.page_rows} entries, "
                f"{self.pool.free_pages} free after releasing this cache); give FastGenCache a "
                f"larger max_tokens or pool") from err
        layer.seen = length

    def _append(self, layer: FastGenLayer, k: Tensor, v: Tensor, scores_new: Tensor | None) -> None:
        heads = layer.heads
        batch, hkv, n, _ = k.shape
        classes = self._classes(batch, n, torch.device("cpu"))
        columns = torch.arange(layer.seen, layer.seen + n)
        try:
            if n == 1 and scores_new is None:  # a decode step: every cache at once
                heads.append_one(torch.cat([k, v], dim=-1).reshape(batch * hkv, -1),
                                 layer.seen - heads.offset, classes[:, 0].repeat_interleave(hkv))
            else:
                for b in range(batch):
                    for h in range(hkv):
                        c = b * hkv + h
                        rows = torch.cat([k[b, h], v[b, h]], dim=-1)
                        score = scores_new[c] if scores_new is not None else torch.zeros(n)
                        heads.write(c, rows, columns - heads.offset[c], classes[b], score)
        except PoolExhaustedError as err:
            raise PoolExhaustedError(
                f"fastllm.kv: no free page to append token {layer.seen} "
                f"(pool of {self.pool.num_pages} pages is full)") from err
        layer.seen += n
        layer.valid = torch.cat([layer.valid, torch.ones(batch, n, dtype=torch.bool)], dim=1)

    def _decode(self, layer: FastGenLayer, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        self._append(layer, k, v, None)
        heads = layer.heads
        table, lengths = heads.device_tables(q.device)
        longest = int(heads.lengths.max())
        splits = max(1, min(32, longest // 512))
        out, _, scores = kv_ops.kv_ragged_decode(q[:, :, 0].contiguous(), heads.rows_view(), table,
                                                  lengths, self.page_rows, scale, splits)
        heads.evict_round(layer.seen - 1 - heads.offset, scores.cpu())
        return out[:, None]  # [B, 1, Hq, D]

    def _extend(self, layer: FastGenLayer, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """Several new tokens on top of compressed caches: dense attention per head over its kept
        entries plus the new tokens (causal among themselves)."""
        heads = layer.heads
        batch, hq, n, d = q.shape
        hkv = k.shape[1]
        group = hq // hkv
        out = torch.empty(batch, n, hq, d, dtype=q.dtype, device=q.device)
        new_scores = torch.zeros(batch * hkv, n)
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        for b in range(batch):
            for h in range(hkv):
                c = b * hkv + h
                cached = heads.read(c)
                keys = torch.cat([cached[:, :d], k[b, h]]).float()
                values = torch.cat([cached[:, d:], v[b, h]]).float()
                visible = torch.cat([torch.ones(n, cached.shape[0], dtype=torch.bool,
                                                device=q.device), causal], dim=1)
                qg = q[b, h * group:(h + 1) * group].float()
                logits = (qg @ keys.T * scale).masked_fill(~visible, float("-inf"))
                probs = logits.softmax(-1)
                out[b, :, h * group:(h + 1) * group] = (probs @ values).transpose(0, 1).to(q.dtype)
                col = probs.sum((0, 1)).cpu()
                m = cached.shape[0]
                heads.score[c, :m] += col[:m]
                new_scores[c] = col[m:]
        self._append(layer, k, v, new_scores)
        for _ in range(n):
            if not heads.evict_round(layer.seen - 1 - heads.offset):
                break
        return out

    def attention(self, layer: FastGenLayer, module, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask, scale: float) -> Tensor:
        batch, _, n, _ = query.shape
        past = layer.seen
        vis = self._visible(attention_mask, batch, n, past + n)
        if layer.heads is None:
            if vis is None:
                valid = torch.ones(batch, n, dtype=torch.bool)
                out = torch.nn.functional.scaled_dot_product_attention(
                    query, key, value, is_causal=n > 1, scale=scale, enable_gqa=True)
                out = out.transpose(1, 2)
            else:
                # Key columns the last query sees = the real tokens (a pad query still sees the
                # real keys before it, never a pad key).
                valid = vis[:, -1].clone()
                self._check_once(attention_mask, vis, valid, 0)
                # Prompt attention is transformers' own SDPA path under the same mask, so the
                # logits of real positions equal a DynamicCache run.
                out, _ = sdpa_attention_forward(module, query, key, value, attention_mask,
                                                scaling=scale)
            self._prefill(layer, query, key, value, scale, valid)
            return out
        if batch * self.num_kv_heads != len(layer.heads.pages):
            raise ValueError(f"fastllm.kv: batch size changed from "
                             f"{len(layer.heads.pages) // self.num_kv_heads} to {batch}")
        padded = not bool(layer.valid.all())
        if vis is None:
            if padded:
                raise ValueError(
                    "fastllm.kv: the prompt was padded but this step has no attention mask, which "
                    "would let it attend to the pad tokens FastGenCache never stored; pass the "
                    "attention_mask (extended with ones for the new tokens) on every step")
        else:
            valid = vis[:, -1]
            if not bool(valid[:, past:].all()):
                raise ValueError(
                    "fastllm.kv: cannot honour padding inside the new tokens of a decode or "
                    "extend step; only the prompt (the first forward) may be padded")
            if not torch.equal(valid[:, :past], layer.valid):
                raise ValueError(
                    "fastllm.kv: this step's attention mask pads different past tokens than the "
                    "prompt did; the padding of past tokens cannot change")
            self._check_once(attention_mask, vis, valid, past)
        if n == 1:
            return self._decode(layer, query, key, value, scale)
        return self._extend(layer, query, key, value, scale)


def _fastllm_kv_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs):
    layer = _pending.get("layer")
    if (layer is not None and _pending.get("key") is key and _pending.get("value") is value
            and layer.layer_idx == getattr(module, "layer_idx", None)):
        _pending.clear()
        cache = layer._owner()
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return cache.attention(layer, module, query, key, value, attention_mask, scale), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    ALL_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, _fastllm_kv_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    _registered = True


def profile(model, tokenizer, text: str, **kwargs) -> list[list[dict]]:
    """FastGen's per-head policy table for ``text``: ``[layer][kv head] -> {policy, kept}``.

    Runs one prefill with a :class:`FastGenCache` (keyword arguments go to it) and releases its
    pages before returning.
    """
    ids = tokenizer(text, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    cache = FastGenCache(model, tokenizer, **kwargs)
    try:
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
        return cache.stats()["policies"]
    finally:
        cache.release()
