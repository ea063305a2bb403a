"""Each capability's op wrappers, fake implementations and autograd formulas, one module per
capability. Kept apart from the user-facing packages so that importing an op never imports a
capability's higher-level API (which may itself import other capabilities' modules)."""
