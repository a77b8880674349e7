"""AlphaEdit's null-space projector `P = Û Ûᵀ` from key statistics (ALGORITHMS.md §2.5).

`Û` `[d_k, r]` holds the eigenvectors of the mean key second moment whose eigenvalues fall below the threshold;
`P` projects onto the directions that preserved keys (nearly) never use. The decomposition is a float64
`eigh` (exactly the reference's SVD for a symmetric PSD matrix, and more accurate), and only `Û` is kept:
the dense `[d_k, d_k]` matrix is never needed by the reduced solve.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .statistics import KeyStatistics

logger = logging.getLogger(__name__)


@dataclass
class NullSpaceProjector:
    """Per-layer null-space bases `Û` `[d_k, r]` (float64, orthonormal columns) and the eigenvalue spectra.

    `statistics` are the key statistics it was built from (saved with it, so another threshold needs no new
    pass over the corpus); `source` says which Hub artifact it was loaded from, if any.
    """

    bases: dict[int, torch.Tensor]
    eigenvalues: dict[int, torch.Tensor]
    threshold: float
    threshold_mode: str
    statistics: KeyStatistics | None = field(default=None, repr=False)
    source: dict[str, Any] | None = None
    # For layers whose null space is wider than half the key space: the basis `[d_k, d_k - r]` of its complement
    # that `bases` was derived from (the compact form artifacts store).
    complements: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_statistics(cls, statistics: KeyStatistics, threshold: float,
                        threshold_mode: str = "absolute") -> NullSpaceProjector:
        """Eigendecompose each layer's mean second moment and keep the directions below the threshold."""
        bases, spectra, complements = {}, {}, {}
        for layer in statistics.layers:
            eigenvalues, eigenvectors = torch.linalg.eigh(statistics.second_moment(layer).double())
            selected = null_space_mask(eigenvalues, threshold, threshold_mode)
            if 2 * int(selected.sum()) > selected.numel():
                complements[layer] = eigenvectors[:, ~selected].contiguous()
                bases[layer] = orthogonal_complement(complements[layer])
            else:
                bases[layer] = eigenvectors[:, selected].contiguous()
            spectra[layer] = eigenvalues
        projector = cls(bases, spectra, threshold, threshold_mode, statistics, complements=complements)
        projector.log_dimensions()
        return projector

    @classmethod
    def compute(cls, model: Any, editing_args: Any = None, tokenizer: Any = None) -> NullSpaceProjector:
        """Collect (or reuse cached) key statistics and build the projector for `model`'s edited layers.

        `model` is an `AlphaEditModel`, or a transformers causal LM together with its `tokenizer`; the layers,
        corpus and threshold come from `editing_args` (an `EditingArguments`; defaults when omitted).
        """
        from .modeling import AlphaEditModel

        if not isinstance(model, AlphaEditModel):
            if tokenizer is None:
                raise ValueError("NullSpaceProjector.compute: pass the tokenizer of a transformers model "
                                 "(or an AlphaEditModel).")
            model = AlphaEditModel(model, tokenizer, editing_args)
        elif editing_args is not None:
            raise ValueError("NullSpaceProjector.compute: an AlphaEditModel carries its own editing_args; "
                             "do not pass editing_args as well.")
        return model.null_space_projector(model.hparams.layers)

    @classmethod
    def from_pretrained(cls, repo_id_or_path: str | os.PathLike, revision: str | None = None, *,
                        layers: Sequence[int] | None = None, threshold: float | None = None,
                        threshold_mode: str | None = None, model: Any = None, strict: bool = False,
                        token: str | bool | None = None) -> NullSpaceProjector:
        """Load a projector artifact from a local folder or a Hub repo (cached in the normal HF cache).

        With `model` (an `AlphaEditModel` or a transformers model) the artifact is checked against it. A
        `threshold` / `threshold_mode` other than the stored one is recomputed from the stored statistics.
        """
        from .artifacts import ArtifactError, check_artifact_for_model, load_artifact

        loaded = load_artifact(repo_id_or_path, revision=revision, layers=layers, token=token)
        if model is not None:
            check_artifact_for_model(loaded.config, model, loaded.statistics.layers, strict=strict)
        stored = loaded.projector
        if stored is None and threshold is None:
            raise ArtifactError(f"{repo_id_or_path} holds key statistics but no projector; pass threshold= "
                                "(and threshold_mode=) to build one from them.")
        wanted_threshold = stored.threshold if threshold is None else threshold
        wanted_mode = threshold_mode or (stored.threshold_mode if stored is not None else "absolute")
        if stored is not None and (stored.threshold, stored.threshold_mode) == (wanted_threshold, wanted_mode):
            projector = stored
        else:
            projector = cls.from_statistics(loaded.statistics, wanted_threshold, wanted_mode)
        projector.source = loaded.source
        return projector

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the projector with its statistics as an artifact folder (safetensors + JSON + model card)."""
        from .artifacts import write_artifact

        write_artifact(directory, self._statistics_for_saving(), self)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    commit_message: str | None = None) -> str:
        """Upload the artifact to `repo_id` (created if needed; stale files removed); returns the commit sha."""
        from .artifacts import push_artifact

        return push_artifact(self._statistics_for_saving(), self, repo_id, private=private, token=token,
                             commit_message=commit_message)

    def _statistics_for_saving(self) -> KeyStatistics:
        if self.statistics is None:
            raise ValueError("this projector has no key statistics attached; build it with "
                             "NullSpaceProjector.from_statistics or .compute to save it.")
        return self.statistics.subset(self.layers)

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


def orthogonal_complement(basis: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis `[d, d - m]` of the orthogonal complement of the span of orthonormal `basis` `[d, m]`.

    The last `d - m` columns of a complete QR factorisation: exact up to round-off and deterministic, so a
    projector rebuilt from a stored complement is bit-identical to the one that stored it. AlphaEdit's update
    depends only on the subspace, not on the choice of basis.
    """
    q, _ = torch.linalg.qr(basis, mode="complete")
    return q[:, basis.shape[1]:].contiguous()


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
