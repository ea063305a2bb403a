"""Host-to-device copies that do not stop the host."""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(host: Tensor, device: torch.device | str) -> Tensor:
    """``host`` (a CPU tensor) on ``device``. For CUDA the copy goes through pinned memory with
    ``non_blocking=True``, so the host does not wait for the stream (a copy from pageable memory
    is synchronous); PyTorch's pinned-memory cache keeps the staging block until the copy is done.
    Without a GPU (fake CUDA tensors in tests) the copy is a plain ``.to``."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    if torch.cuda.is_available() and not host.is_pinned():
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
