"""The attention path of a FastGenCache: what runs inside the model's attention call.

transformers calls the attention implementation ``"fastllm_kv"`` (registered here with
``AttentionInterface``, together with a mask function that always builds the mask) after the
layer's ``Cache.update``. ``_fastllm_kv_attention`` hands the call to the cache that was just
updated (``_pending``), or to transformers' SDPA for any other cache. The cache's side is the
``_AttentionPath`` mixin of :class:`~fastllm.kv.FastGenCache`: the prompt (profiling, policy
choice, the kept entries written to pages), a decode step (append, ragged decode, eviction, all
device work), a multi-token step on compressed caches, and the checks of the attention mask.
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .. import _C
from ..memory import PoolExhaustedError
from .._ops import kv as kv_ops
from .decode import _decode_work
from .policies import (
    HeadPolicy,
    _class_table,
    adakv_policies,
    budget_tokens,
    fastgen_profile,
    kept_at_prefill,
    snapkv_scores,
    token_classes,
)
from .storage import OWNER, _ClassLog, _HeadCaches, _host_only

if TYPE_CHECKING:
    from .cache import FastGenLayer

ATTENTION_NAME = "fastllm_kv"

# The layer whose update() ran last, with the tensors it returned: the attention function that
# follows in the same layer picks it up (identity-checked, so a stale entry is never used).
_pending: dict = {}


class _AttentionPath:
    """FastGenCache's attention path (a mixin of :class:`~fastllm.kv.FastGenCache`, which holds
    the state these methods use: layers, pool, policy settings, class log)."""

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
        self._check_mask_shape(mask, batch, queries, keys)
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
    def _check_mask_shape(mask: Tensor, batch: int, queries: int, keys: int) -> None:
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (queries, keys) \
                or mask.shape[0] not in (1, batch):
            raise ValueError(
                f"fastllm.kv: cannot honour an attention mask of shape {tuple(mask.shape)}: "
                f"expected [batch, 1, {queries}, {keys}] (one mask shared by all heads)")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise ValueError(f"fastllm.kv: attention mask of dtype {mask.dtype} is not supported")

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

    def _mask_agrees(self, attention_mask, layer, past: int) -> bool:
        """Whether this mask was already found to agree with the padding of a layer whose
        prompt padding is the same tensor, at the same position: transformers hands every layer
        of a forward the same mask, and the layers of one prompt share their padding, so the
        host checks it once per step instead of once per layer."""
        agreed = self._mask_agreed
        return (agreed is not None and agreed[0] is attention_mask and agreed[1] == past
                and agreed[2] is layer.prompt_valid)

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
                                                        self.heavy_pool, self.observe,
                                                        self.heavy_from, self.recovery_on,
                                                        self.adaptive, self.adaptive_floor,
                                                        self.heavy_fit)
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
        else:  # snapkv, adakv
            obs = min(self.snap_window, budget, length)
            scores = snapkv_scores(q, k, scale, obs, self.chunk)
            p = HeadPolicy("snapkv", window=obs, heavy=budget - obs, grow=True)
        per_head = (adakv_policies(scores, length, budget, obs, self.adaptive_floor)
                    if self.policy == "adakv" else [p] * hkv)
        for h, p in enumerate(per_head):
            policies.append(p)
            kept.append(kept_at_prefill(p, classes.cpu(), None,
                                        scores[h] if scores is not None else None))
        return policies, kept, scores

    def _prefill(self, layer: FastGenLayer, q: Tensor, k: Tensor, v: Tensor, scale: float,
                 valid: Tensor) -> None:
        """Profile and store one prompt. ``valid`` [B, L] marks real tokens: each sequence is
        profiled on its real tokens only, exactly as if it ran alone (its rotary positions
        already skip the padding), and pads never reach a page. The host may wait for the device
        here (profiling reads the scores): the prompt is the one step the GPU path synchronises."""
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
        pads = np.array([length - cols.numel() for cols, _, _ in writes], dtype=np.int64)
        if self._class_log is None:  # the first layer: every layer sees the same tokens
            by_pos = np.zeros((batch, length + 64), dtype=np.uint8)
            for b, (cols, _, _) in enumerate(writes):
                by_pos[b, :cols.numel()] = classes[b, cols].numpy()
            self._class_log = _ClassLog(by_pos, pads, length)
        self._class_table_on(k.device)  # uploaded now, so no decode step has to
        hkv = self.num_kv_heads
        heads = _HeadCaches(self.pool, self.page_rows, self.width, all_policies,
                            np.repeat(pads, hkv), hkv)
        entries = []
        for b, (cols, kept, scores) in enumerate(writes):
            for h, positions in enumerate(kept):
                dev_cols = cols[positions].to(k.device)
                rows = torch.cat([k[b, h, dev_cols], v[b, h, dev_cols]], dim=-1)
                score = (scores[h, positions] if scores is not None
                         else torch.zeros(positions.shape[0]))
                entries.append((positions, classes[b, cols[positions]], score, rows))
        try:
            heads.fill(entries, length)
        except BaseException as err:
            # Whatever failed (a full pool, an allocator or device error), the layers before this
            # one hold the prompt already: give everything back, so the cache is as it was.
            self.release()
            if not isinstance(err, PoolExhaustedError):
                raise
            raise err.with_context(
                f"fastllm.kv: a prompt of {length} tokens (batch {batch}) does not fit the page "
                f"pool ({self.pool.num_pages} pages of {self.page_rows} entries, "
                f"{self.pool.free_pages} free after releasing this cache); give FastGenCache a "
                f"larger max_tokens or pool") from err
        self._check_page_fill(heads)
        layer.heads = heads
        layer.decode_work = None
        # One tensor for every layer of the prompt (equal by construction), so a step's mask is
        # checked against it once (_mask_agrees).
        shared = self._shared_prompt_valid
        if shared is None or shared.shape != valid.shape or not torch.equal(shared, valid):
            shared = self._shared_prompt_valid = valid.clone()
        layer.prompt_valid = shared
        layer.padded = not bool(valid.all())
        layer.seen = length

    def _check_page_fill(self, heads: _HeadCaches) -> None:
        """Warn (once per cache) when the prompt's kept entries leave most of their pages empty
        because the pool's pages are large: a pool sized for adapters (65536-element pages) gives
        every (layer, sequence, KV head) cache a whole page."""
        if self._warned_pages or self.page_rows <= 16:
            return
        pages = int(heads.npages.sum())
        entries = int(heads.m_len.sum())
        if pages and entries < 0.5 * pages * self.page_rows:
            self._warned_pages = True
            warnings.warn(
                f"fastllm.kv: the {entries} entries one layer kept of the prompt fill "
                f"{entries / (pages * self.page_rows):.0%} of the {pages} pages they took: a page "
                f"holds {self.page_rows} entries ({self.pool.page_bytes // 1024} KB) and every "
                "(layer, sequence, KV head) cache takes at least one; use a pool with smaller "
                "pages (PagePool.for_model(model, ...) suits adapters and KV caches both)",
                stacklevel=2)

    def _class_table_on(self, device: torch.device) -> Tensor:
        """The vocabulary's class bits on ``device``, with a trailing 0 for ids past it."""
        table = self._class_tables.get(device)
        if table is None:
            host = _class_table(self.tokenizer)
            table = torch.cat([host, host.new_zeros(1)]).to(device)
            self._class_tables[device] = table
        return table

    def _device_classes(self, layer: FastGenLayer, device: torch.device, batch: int,
                        n: int) -> tuple[Tensor, Tensor]:
        """This forward's token classes on the device, ``[B, n]`` and, for a decode step, per
        cache ``[C]``; looked up once per forward (every layer asks) and handed to the host's
        class log without waiting for them."""
        memo = self._step_device_classes
        if memo is not None and memo[0] == layer.seen:
            return memo[1], memo[2]
        ids = self._ids
        if ids is None or ids.shape != (batch, n):
            if self.policy == "fastgen":
                raise ValueError("fastllm.kv: FastGen needs the token ids of each step (call the "
                                 "model with input_ids, not inputs_embeds)")
            classes = torch.zeros(batch, n, dtype=torch.uint8, device=device)
        else:
            table = self._class_table_on(device)
            classes = table[ids.to(device).clamp(0, table.shape[0] - 1)]
        per_cache = (classes[:, :1].expand(batch, self.num_kv_heads).reshape(-1) if n == 1
                     else None)
        graph = self._graph
        if graph is None:
            self._class_log.record(layer.seen, classes)
        else:  # the host learns them on exit (a replay runs no Python)
            step = (layer.graph.seen - graph.start).clamp_(0, graph.steps - 1)
            graph.classes.scatter_(1, step.expand(batch, 1), classes)
        self._step_device_classes = (layer.seen, classes, per_cache)
        return classes, per_cache

    def _decode(self, layer: FastGenLayer, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """One token per sequence: append it to every cache, attend over the ragged caches, add
        the probabilities to the heavy-hitter scores and evict at most one entry per cache, all
        on the device. The host decides the pages from its mirror and reads nothing back."""
        heads = layer.heads
        batch, hkv = k.shape[0], k.shape[1]
        if layer.graph is not None:
            return self._graph_decode(layer, q, k, v, scale)
        if k.device.type == "cuda" and torch.cuda.is_available() \
                and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("fastllm.kv: capture FastGenCache decode steps inside "
                               "cache.graph_steps(n): outside it a step's position and pages "
                               "are host decisions a replay would repeat")
        column = layer.seen
        _, cls = self._device_classes(layer, k.device, batch, 1)
        try:
            # The append, before this step's eviction: pages first, so that if the pool is full
            # the mirror has not moved ahead of the device. (Normally there is room already:
            # _reserve_step took every layer's pages before the first layer.)
            short, longest = heads.room(column + 1)
            if short or longest > heads.pos.shape[1]:
                heads.reserve(heads.bound(column) + 1)
            # A GPU's work list is planned from the entries the step attends (before its
            # eviction); the CPU's even splits need only the longest.
            need = heads.bound(column) + 1 if k.device.type == "cuda" else None
            heads.advance(column + 1, self._class_log)
        except PoolExhaustedError as err:
            raise err.with_context(f"fastllm.kv: no free page to append token {layer.seen} "
                                   f"(pool of {self.pool.num_pages} pages)") from err
        splits, work = _decode_work(layer, longest, lambda: need, k.device)
        out = heads.decode_step(q[:, :, 0], torch.cat([k, v], dim=-1).reshape(batch * hkv, -1),
                                cls, column - heads.offset, scale, splits, work)
        layer.seen += 1
        heads.release_excess(layer.seen)
        return out[:, None]  # [B, 1, Hq, D]

    def _graph_decode(self, layer: FastGenLayer, q: Tensor, k: Tensor, v: Tensor,
                      scale: float) -> Tensor:
        """A decode step inside ``graph_steps``: the same device work as ``_decode`` with the
        position from the layer's device counter, the pages reserved on entry, a fixed split
        count and the eviction's row move always made; the host does nothing a replay would
        skip."""
        heads, state = layer.heads, layer.graph
        batch, hkv = k.shape[0], k.shape[1]
        _, cls = self._device_classes(layer, k.device, batch, 1)
        out = heads.decode_step(q[:, :, 0], torch.cat([k, v], dim=-1).reshape(batch * hkv, -1),
                                cls, state.seen - heads.offset, scale, state.splits, state.work,
                                capacity=state.capacity)
        state.seen += 1
        return out[:, None]

    def _extend(self, layer: FastGenLayer, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """Several new tokens on top of compressed caches: dense attention per head over its kept
        entries plus the new tokens (causal among themselves). Not a decode step: it reads the
        device (lengths, whether a round evicted) and leaves the host mirror exact."""
        heads = layer.heads
        batch, hq, n, d = q.shape
        hkv = k.shape[1]
        group = hq // hkv
        classes, _ = self._device_classes(layer, k.device, batch, n)
        self._class_log.settle()
        heads.advance(layer.seen, self._class_log)
        # No release_excess here: the pages _reserve_step took for these tokens are in use below.
        out = torch.empty(batch, n, hq, d, dtype=q.dtype, device=q.device)
        new_scores = torch.zeros(batch * hkv, n, device=q.device)
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
                col = probs.sum((0, 1))
                m = cached.shape[0]
                heads.score[c, :m] += col[:m]
                new_scores[c] = col[m:]
        columns = torch.arange(layer.seen, layer.seen + n, device=q.device)
        try:
            for b in range(batch):
                for h in range(hkv):
                    c = b * hkv + h
                    heads.write(c, torch.cat([k[b, h], v[b, h]], dim=-1),
                                columns - int(heads.h_offset[c]), classes[b], new_scores[c])
        except PoolExhaustedError as err:
            raise err.with_context(f"fastllm.kv: no free page to append token {layer.seen} "
                                   f"(pool of {self.pool.num_pages} pages)") from err
        layer.seen += n
        newest = layer.seen - 1 - heads.offset
        for _ in range(n):
            if not bool((heads.evict_round(newest)[:, 0] >= 0).any()):
                break
        heads.resync(layer.seen)
        heads.release_excess(layer.seen)
        return out

    def _host_checks_values(self, t: Tensor) -> bool:
        """Whether this step may read mask values on the host: always for CPU tensors; for
        other devices only in fastllm's index debug mode (``fastllm.ops.checked_indices``)."""
        return t.device.type == "cpu" or _C.index_debug_mode()

    def attention(self, layer: FastGenLayer, module, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask, scale: float) -> Tensor:
        batch, _, n, _ = query.shape
        past = layer.seen
        if layer.heads is None:
            vis = self._visible(attention_mask, batch, n, past + n)
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
        if self._graph is not None:
            # The host's position is stale inside graph_steps: only the mask's batch and query
            # dimensions are checked (a decode step never reads it on a GPU).
            if n != 1:
                raise RuntimeError(f"fastllm.kv: only one-token decode steps may run inside "
                                   f"graph_steps, got {n} tokens")
            if attention_mask is not None:
                self._check_mask_shape(attention_mask, batch, n, attention_mask.shape[-1])
            return self._decode(layer, query, key, value, scale)
        if attention_mask is None:
            if layer.padded:
                raise ValueError(
                    "fastllm.kv: the prompt was padded but this step has no attention mask, which "
                    "would let it attend to the pad tokens FastGenCache never stored; pass the "
                    "attention_mask (extended with ones for the new tokens) on every step")
        elif n == 1 and not self._host_checks_values(query):
            # A decode step on a GPU: reading the mask would stop the GPU. Its shape is checked;
            # its values (which only restate the prompt's padding, never stored) are checked in
            # the debug mode.
            self._check_mask_shape(attention_mask, batch, n, past + n)
        elif not self._mask_agrees(attention_mask, layer, past):
            vis = self._visible(attention_mask, batch, n, past + n)
            valid = vis[:, -1]
            if not bool(valid[:, past:].all()):
                raise ValueError(
                    "fastllm.kv: cannot honour padding inside the new tokens of a decode or "
                    "extend step; only the prompt (the first forward) may be padded")
            if not torch.equal(valid[:, :past], layer.valid):
                raise ValueError(
                    "fastllm.kv: this step's attention mask pads different past tokens than the "
                    "prompt did (or is missing); the padding of past tokens cannot change: pass "
                    "the whole sequence's attention mask, pads included, at every step")
            self._check_once(attention_mask, vis, valid, past)
            self._mask_agreed = (attention_mask, past, layer.prompt_valid)
        if layer.layer_idx == 0:
            self._reserve_step(n)
        if n == 1:
            return self._decode(layer, query, key, value, scale)
        return self._extend(layer, query, key, value, scale)

    def _reserve_step(self, n: int) -> None:
        """Before the first layer of a step with ``n`` new tokens per sequence: every layer's
        pages for them, in one allocation. A pool that cannot give them all (after the other
        owners, e.g. adapters outside the running batch, gave back what they could) raises here,
        before any layer has appended anything: the cache is as it was, and the step can run
        again once pages are free (a sequence left)."""
        layers = [layer for layer in self.layers if layer.heads is not None]
        counts = [layer.heads.room(layer.seen + n)[0] for layer in layers]
        total = sum(counts)
        if not total:
            return
        needs = [(layer.heads, layer.heads.bound(layer.seen) + n) for layer in layers]
        try:
            with _host_only():
                ids = self.pool.alloc(total, OWNER).tolist()
        except PoolExhaustedError as err:
            raise err.with_context(
                f"fastllm.kv: no room for the next {n} token(s) of {self._batch()} sequences "
                f"({total} pages over {len(layers)} layers); nothing was appended: free pages "
                "(a sequence leaves) and run the step again") from err
        for (heads, need), count in zip(needs, counts):
            heads.reserve(need, ids[:count])
            del ids[:count]


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
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, _always_built_sdpa_mask)
    _registered = True


def _always_built_sdpa_mask(*args, **kwargs):
    # transformers skips the mask when no token is padded, which it finds out by reading the
    # padding mask on the host: a synchronisation in every decode step generate() runs. The
    # ragged decode only looks at the mask's shape, so build it every time instead.
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)
