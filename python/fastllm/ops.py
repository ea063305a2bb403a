"""Every fastllm op as a typed, documented Python function.

``import fastllm.ops`` is all a model needs. Each function calls ``torch.ops.fastllm.<name>``, the op
registered by the compiled extension, so the dispatcher, ``torch.compile`` and
``torch.library.opcheck`` see the same op. The wrappers, fake implementations (shapes only, for
tracing) and autograd formulas live with their capability in ``fastllm/<capability>/_ops.py``; the
pure-PyTorch references in :mod:`fastllm._reference`.
"""

from ._ops.index_checks import checked_indices, index_error_word, raise_index_errors
from ._ops.galore import galore_adam8bit_step, galore_adam_step, galore_project, galore_project_back_
from ._ops.kv import (kv_attention_scores, kv_decode_plan, kv_decode_step, kv_evict_round,
                      kv_policy_recovery, kv_ragged_decode)
from ._ops.lora import lora_expand, lora_sgmv_chunks, lora_sgmv_plan, lora_shrink
from ._ops.memory import pool_gather, pool_write
from ._ops.sparse import quantized_neuron_scores, sparse_mlp

# The kernels: each has a CPU and a CUDA implementation, a fake and a reference in _reference.
OPS = ["pool_gather", "pool_write", "lora_shrink", "lora_expand", "kv_attention_scores",
       "kv_policy_recovery", "kv_ragged_decode", "kv_evict_round", "kv_decode_step", "sparse_mlp",
       "quantized_neuron_scores", "galore_adam_step", "galore_adam8bit_step", "galore_project",
       "galore_project_back_"]
# Host-side helpers around them: the LoRA SGMV plan and chunks, the KV decode work list and
# the CUDA index-error word.
HELPERS = ["lora_sgmv_plan", "lora_sgmv_chunks", "kv_decode_plan", "index_error_word",
           "raise_index_errors", "checked_indices"]
__all__ = OPS + HELPERS
