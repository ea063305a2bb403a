"""Drop-in nn.Module replacements backed by fastllm's kernels."""

from .lora_linear import LoRALinear  # noqa: F401
from .sparse_mlp import FactoredPredictor, LowRankPredictor, SparseMLP  # noqa: F401
from .galore_linear import GaLoreLinear, to_galore_linear  # noqa: F401
