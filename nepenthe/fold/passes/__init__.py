"""The folding passes, in the order ``fold`` runs them: cleanup (no-ops, BatchNorm), rectifiers
(linearisation), constants (emptied ops, constant propagation and additions), channels (constant
channels), merges (exact merges of adjacent linear ops)."""

__all__ = []
