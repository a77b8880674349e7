"""`BetaEditConfig`: BetaEdit's two settings (the reference's `configs/algs/betaedit.yaml`: `lambda1: 3000`,
`tau: 1000`); its `lambda2` is AlphaEdit's `l2` (10 there as in AlphaEdit's files), which stays in `EditingArguments`."""

from __future__ import annotations

from dataclasses import dataclass

from ...fields import setting
from ..alphaedit.config import AlphaEditConfig


@dataclass
class BetaEditConfig(AlphaEditConfig):
    """Settings of BetaEdit (besides AlphaEdit's `protect_previous_edits`)."""

    leakage_penalty: float = setting(
        "λ₁, the weight of the preserved keys' second moment C₀ in the solve, (P(K·Kᵀ + C_p + λ₁·C₀) + λ₂·I)·X = "
        "P·K·Rᵀ: it penalises what an update still changes on preserved keys through the directions the approximate "
        "null space keeps (eigenvalues of C₀ below the threshold, not zero); also C₀'s weight against the mean edit "
        "key second moment when the projector is refreshed (the reference's lambda1). 0: AlphaEdit's solve.",
        default=3000.0, low=0)
    projector_refresh_every: int | None = setting(
        "τ: rebuild the null-space projector after every τ edits from (C_p/N + λ₁·C₀)/(λ₁ + 1), C_p the second "
        "moment of the N edit keys so far, with the run's nullspace_threshold and mode (the reference's tau). None: "
        "keep the projector of the key statistics.", default=1000, low=1)
