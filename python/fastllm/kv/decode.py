"""Decode-step planning for a FastGenCache: how the ragged decode's work is split (even splits
on the CPU, a work list balanced over a GPU's SMs, replanned only when the caches outgrow it), and
the state a decode step keeps on the device inside ``FastGenCache.graph_steps`` (CUDA graphs).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import Tensor

from .._ops import kv as kv_ops
from .storage import _HeadCaches, _host_only, _upload

if TYPE_CHECKING:
    from .cache import FastGenLayer


class _LayerGraphSteps:
    """One layer's decode-step state inside ``FastGenCache.graph_steps``: what an eager step
    takes from the host, kept where a replayed step can read and advance it."""

    def __init__(self, heads: _HeadCaches, seen: int, splits: int, work: Tensor | None):
        # The mask column of the next token, advanced by every step (eager or replayed).
        self.seen = torch.full((1,), seen, dtype=torch.int64, device=heads.device)
        # Each cache's room: its pages, reserved on entry for every step allowed.
        self.capacity = heads.capacity()
        # The attention's work, fixed at entry from the lengths the steps can reach, as a replay
        # cannot change it.
        self.splits, self.work = splits, work


class _GraphSteps:
    """``FastGenCache.graph_steps`` state shared by the layers."""

    def __init__(self, start: int, steps: int, batch: int, device: torch.device):
        self.start, self.steps = start, steps
        # The class bits of every step's token [B, steps], for the host's class log on exit.
        self.classes = torch.zeros(batch, steps, dtype=torch.uint8, device=device)


# An H100's / H200's SM count, for fake CUDA tensors on a machine without a GPU.
_DEFAULT_SMS = 132


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count  # no synchronisation


def _device_sms(device: torch.device) -> int:
    if torch.cuda.is_available():
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return _DEFAULT_SMS


def _cpu_decode_splits(longest: int, caches: int) -> int:
    """Even splits of the ragged decode on the CPU: enough that the tasks (caches x splits)
    share out evenly over the threads (a single sequence has only a few KV heads: 3 caches on 2
    threads leave one idle a third of the time), each split at least 64 entries, at most 32."""
    wanted = -(-6 * torch.get_num_threads() // max(caches, 1))
    return max(1, min(32, wanted, longest // 64))


class _DecodeWork:
    """A layer's decode work list on its GPU (kv_math.h, plan_decode_work): each cache cut into
    items of one chunk size, balanced over the SMs by the caches' length bounds, instead of one
    split count sized by the longest cache. A list stays correct as the caches grow (a cache's
    last item runs to its length), so a layer keeps its list while no cache has outgrown the
    entries its items were planned for by more than half a chunk (its last item at most 1.5
    chunks) and the total has not halved. After a replan every cache is within its items, so the
    next one is at least ``chunk / 2`` steps away however many caches grow: one small pinned
    upload per layer every few hundred steps at serving sizes."""

    def __init__(self, bounds: np.ndarray, device: torch.device):
        with _host_only():  # host work (numpy), real even under the tests' FakeTensorMode
            chunk, rows = kv_ops.kv_decode_plan(bounds, _device_sms(device))
            rows = rows.numpy()
        self.chunk = chunk
        self.cover = np.maximum(-(-bounds // chunk), 1) * chunk
        self.total = int(bounds.sum())
        self.work = _upload(rows, torch.int32, device)

    def serves(self, bounds: np.ndarray) -> bool:
        return (bounds.shape == self.cover.shape
                and int((bounds - self.cover).max(initial=0)) <= self.chunk // 2
                and 2 * int(bounds.sum()) >= self.total)


def _decode_work(layer: "FastGenLayer", longest: int, bounds: Callable[[], np.ndarray],
                 device: torch.device):
    """(num_splits, work) of the layer's next decode from its caches' length bounds (``longest``,
    and ``bounds()`` for all of them): even splits on the CPU, the layer's (re)planned work list
    on a GPU."""
    if device.type != "cuda":
        return _cpu_decode_splits(longest, len(layer.heads.pages)), None
    bounds = bounds()
    if layer.decode_work is None or not layer.decode_work.serves(bounds):
        layer.decode_work = _DecodeWork(bounds, device)
    return 1, layer.decode_work.work
