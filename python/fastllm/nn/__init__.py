"""Drop-in nn.Module replacements backed by fastllm's kernels."""

from .lora_linear import LoRALinear  # noqa: F401
from .sparse_mlp import (FactoredPredictor, LowRankPredictor, QuantizedPredictor,  # noqa: F401
                         SparseMLP, quantize_rows)
from .galore_linear import GaLoreLinear, to_galore_linear  # noqa: F401

__all__ = ["LoRALinear", "GaLoreLinear", "to_galore_linear", "SparseMLP", "LowRankPredictor",
           "FactoredPredictor", "QuantizedPredictor", "quantize_rows"]
