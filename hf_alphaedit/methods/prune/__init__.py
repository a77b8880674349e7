"""PRUNE: a restraint on the accumulated perturbation that composes with any method (ALGORITHMS.md §7)."""

from .restraint import PRUNE_PAPER, PruneRestraint, factored_svd, restrain_singular_values

__all__ = ["PRUNE_PAPER", "PruneRestraint", "factored_svd", "restrain_singular_values"]
