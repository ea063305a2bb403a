"""Drop-in nn.Module replacements backed by fastllm's kernels."""

from .lora_linear import LoRALinear  # noqa: F401
