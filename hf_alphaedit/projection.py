"""AlphaEdit's null-space projector `P = Û Ûᵀ` from key statistics (ALGORITHMS.md §2.5).

`Û` `[d_k, r]` holds the eigenvectors of the mean key second moment whose eigenvalues fall below the threshold;
`P` projects onto the directions that preserved keys (nearly) never use. The decomposition is a float64
`eigh` (exactly the reference's SVD for a symmetric PSD matrix, and more accurate), and only `Û` is kept:
the dense `[d_k, d_k]` matrix is never needed by the reduced solve.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .statistics import KeyStatistics

logger = logging.getLogger(__name__)


@dataclass
class NullSpaceProjector:
    """Per-layer null-space bases `Û` `[d_k, r]` (float64, orthonormal columns) and the eigenvalue spectra."""

    bases: dict[int, torch.Tensor]
    eigenvalues: dict[int, torch.Tensor]
    threshold: float
    threshold_mode: str

    @classmethod
    def from_statistics(cls, statistics: KeyStatistics, threshold: float,
                        threshold_mode: str = "absolute") -> NullSpaceProjector:
        """Eigendecompose each layer's mean second moment and keep the directions below the threshold."""
        bases, spectra = {}, {}
        for layer in statistics.layers:
            eigenvalues, eigenvectors = torch.linalg.eigh(statistics.second_moment(layer).double())
            selected = null_space_mask(eigenvalues, threshold, threshold_mode)
            bases[layer] = eigenvectors[:, selected].contiguous()
            spectra[layer] = eigenvalues
        projector = cls(bases, spectra, threshold, threshold_mode)
        projector.log_dimensions()
        return projector

    @property
    def layers(self) -> list[int]:
        return sorted(self.bases)

    def null_space_dim(self, layer: int) -> int:
        return self.bases[layer].shape[1]

    def null_space_fraction(self, layer: int) -> float:
        """`r / d_k`: the share of key directions edits may use."""
        basis = self.bases[layer]
        return basis.shape[1] / basis.shape[0]

    def dense(self, layer: int) -> torch.Tensor:
        """The dense projector `P = Û Ûᵀ` `[d_k, d_k]` (float64); for tests and inspection."""
        basis = self.bases[layer]
        return basis @ basis.T

    def log_dimensions(self) -> None:
        for layer in self.layers:
            r, fraction = self.null_space_dim(layer), self.null_space_fraction(layer)
            logger.info("layer %d: null space %d of %d directions (%.1f%%) at %s threshold %g", layer, r,
                        self.bases[layer].shape[0], 100 * fraction, self.threshold_mode, self.threshold)
            if fraction < 0.01 or fraction > 0.99:
                logger.warning(
                    "layer %d: the null space covers %.1f%% of the key space (threshold %g, mode %s): %s", layer,
                    100 * fraction, self.threshold, self.threshold_mode,
                    "edits have almost no room; raise nullspace_threshold or use nullspace_threshold_mode='energy'"
                    if fraction < 0.01 else
                    "preserved knowledge is barely protected; lower nullspace_threshold")


def null_space_mask(eigenvalues: torch.Tensor, threshold: float, mode: str) -> torch.Tensor:
    """Boolean mask over ascending `eigenvalues` `[d_k]` selecting the null-space directions.

    absolute: `λ < τ` (reference); relative: `λ < τ · λ_max`; energy: the smallest eigenvalues whose sum is at
    most `τ` of the total (so the discarded directions carry at most that share of the keys' energy).
    """
    if mode == "absolute":
        return eigenvalues < threshold
    if mode == "relative":
        return eigenvalues < threshold * eigenvalues.max()
    if mode == "energy":
        clipped = eigenvalues.clamp_min(0)
        return torch.cumsum(clipped, 0) <= threshold * clipped.sum()
    raise ValueError(f"nullspace_threshold_mode={mode!r}: choose 'absolute', 'relative' or 'energy'.")
