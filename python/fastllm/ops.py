"""Every fastllm op as a typed, documented Python function.

``import fastllm.ops`` is all a model needs. Each function calls ``torch.ops.fastllm.<name>``, the op
registered by the compiled extension, so the dispatcher, ``torch.compile`` and
``torch.library.opcheck`` see the same op. The wrappers, fake implementations (shapes only, for
tracing) and autograd formulas live with their capability in ``fastllm/<capability>/_ops.py``; the
pure-PyTorch references in :mod:`fastllm._reference`.
"""

from .kv._ops import kv_attention_scores, kv_policy_recovery, kv_ragged_decode
from .memory._ops import pool_gather, pool_write

__all__ = [
    "kv_attention_scores", "kv_policy_recovery", "kv_ragged_decode", "pool_gather", "pool_write",
]
