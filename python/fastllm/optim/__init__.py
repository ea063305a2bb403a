"""GaLore optimizers (gradient low-rank projection, arXiv 2403.03507) with fused step kernels."""

from .galore import (GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, GaLoreNumericalWarning,
                     galore_param_groups)
from ._galore_ddp import galore_ddp

__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor", "GaLoreNumericalWarning",
           "galore_param_groups", "galore_ddp"]
