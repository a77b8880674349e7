"""NAS (Norm-Anchor Scaling): a rescaling of the targets of any locate-then-edit method (see `scaling`)."""

from .scaling import (
    NAS_PAPER,
    NormAnchor,
    NormAnchorScaling,
    compute_norm_anchor,
    mlp_outputs_at_lookup,
    rescale_to_anchor,
    upper_trimmed_mean,
)

__all__ = ["NAS_PAPER", "NormAnchor", "NormAnchorScaling", "compute_norm_anchor", "mlp_outputs_at_lookup",
           "rescale_to_anchor", "upper_trimmed_mean"]
