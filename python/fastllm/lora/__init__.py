"""Paged multi-adapter LoRA serving (S-LoRA): adapters in host memory, the ones in use paged into the
unified page pool, and kernels that apply a different adapter of a different rank to every sequence
of one batch."""

from .._ops import lora as _ops
from .manager import LLAMA_TARGETS, AdapterManager
from .store import AdapterStore, ModuleSpec, ModuleWeights

__all__ = ["AdapterManager", "AdapterStore", "ModuleSpec", "ModuleWeights", "LLAMA_TARGETS"]
