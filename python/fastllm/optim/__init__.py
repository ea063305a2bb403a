"""GaLore optimizers."""
