"""Pure-PyTorch versions of every fastllm op: the test oracle and the benchmark baseline.

They follow the op's documented semantics with plain torch calls and no validation beyond what
torch does itself; a fastllm op must agree with its reference on every valid input.
"""

from .memory import pool_gather_reference, pool_write_reference

__all__ = ["pool_gather_reference", "pool_write_reference"]
from .kv import (
    dense_masked_decode_reference,
    kv_attention_scores_reference,
    kv_policy_recovery_reference,
    kv_ragged_decode_reference,
)

__all__ += [
    "dense_masked_decode_reference",
    "kv_attention_scores_reference",
    "kv_policy_recovery_reference",
    "kv_ragged_decode_reference",
]
