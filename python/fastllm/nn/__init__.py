"""Drop-in nn.Module replacements backed by fastllm's kernels."""

from .galore_linear import GaLoreLinear, to_galore_linear  # noqa: F401
