"""rmx-local: ReasonMaxxer (entropy-gated advantage re-ranking) on one laptop or one GPU."""

__version__ = "0.1.0"
