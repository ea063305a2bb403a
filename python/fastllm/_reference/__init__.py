"""Pure-PyTorch versions of every fastllm op: the test oracle and the benchmark baseline.

They follow the op's documented semantics with plain torch calls and no validation beyond what
torch does itself; a fastllm op must agree with its reference on every valid input.
"""

from .memory import pool_gather_reference, pool_write_reference
from .galore import (GaLoreAdamWReference, galore_adam8bit_step_reference,
                     galore_adam_step_reference, galore_project_back_reference,
                     galore_project_reference, galore_projector_reference)
from .lora import lora_expand_reference, lora_shrink_reference
from .sparse import (dense_mlp_reference, quantized_neuron_scores_reference,
                     sparse_mlp_reference)

__all__ = ["pool_gather_reference", "pool_write_reference", "lora_shrink_reference",
           "lora_expand_reference", "dense_mlp_reference", "sparse_mlp_reference",
           "quantized_neuron_scores_reference",
           "GaLoreAdamWReference", "galore_adam8bit_step_reference",
           "galore_adam_step_reference", "galore_project_back_reference",
           "galore_project_reference", "galore_projector_reference"]
from .kv import (dense_masked_decode_reference, kv_attention_scores_reference,
                 kv_decode_step_reference, kv_evict_round_reference, kv_policy_recovery_reference,
                 kv_ragged_decode_reference)

__all__ += ["dense_masked_decode_reference", "kv_attention_scores_reference",
            "kv_decode_step_reference", "kv_evict_round_reference", "kv_policy_recovery_reference",
            "kv_ragged_decode_reference"]
