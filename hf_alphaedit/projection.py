"""AlphaEdit's null-space projector `P = Û Ûᵀ` from key statistics (ALGORITHMS.md §2.5).

`Û` `[d_k, r]` holds the eigenvectors of the mean key second moment whose eigenvalues fall below the threshold;
`P` projects onto the directions that preserved keys (nearly) never use. The decomposition is a float64
`eigh` (exactly the reference's SVD for a symmetric PSD matrix, and more accurate), and only `Û` is kept:
the dense `[d_k, d_k]` matrix is never needed by the reduced solve.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .architectures import resolve_model_spec
from .artifacts import (
    ARTIFACT_CONFIG,
    ArtifactError,
    CorruptArtifactError,
    artifact_folder,
    check_artifact,
    evict_cached_files,
    projector_path,
    push_artifact_folder,
    read_artifact_config,
    read_artifact_tensors,
    statistics_path,
    write_artifact,
)
from .fingerprint import weight_fingerprint
from .hub import ModelSource
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
    def compute(cls, model: Any) -> NullSpaceProjector:
        """The projector of an `AlphaEditModel`'s edited layers: its key statistics (from its projection artifact,
        the cache, or one collection pass over `editing_args.statistics_corpus`), eigendecomposed.

        For a plain transformers model, wrap it first: `NullSpaceProjector.compute(AlphaEditModel(model,
        tokenizer, editing_args))`.
        """
        if not callable(getattr(model, "null_space_projector", None)):
            raise TypeError("NullSpaceProjector.compute: pass an AlphaEditModel (wrap a transformers model with "
                            f"AlphaEditModel(model, tokenizer, editing_args)), got {type(model).__name__}.")
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
        loaded = load_projection_artifact(repo_id_or_path, revision=revision, layers=layers, token=token)
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

    @classmethod
    def from_artifact(cls, folder: str | os.PathLike, config: dict[str, Any], statistics: KeyStatistics,
                      layers: Sequence[int]) -> NullSpaceProjector | None:
        """The stored projector of `layers` in the artifact `folder` (None when it stores none for them)."""
        spec = config.get("projector")
        if spec is None or not set(layers) <= set(spec.get("layers", ())):
            return None
        d_k = config["key_size"]
        bases, spectra, complements = {}, {}, {}
        for layer in layers:
            tensors = read_artifact_tensors(folder, projector_path(layer), config)
            basis, eigenvalues = tensors.get("basis"), tensors.get("eigenvalues")
            try:
                expected, kind = int(spec["null_space_dims"][str(layer)]), spec["representation"][str(layer)]
            except (KeyError, TypeError, ValueError):
                raise CorruptArtifactError(f"{ARTIFACT_CONFIG}: the projector entry of layer {layer} is "
                                           "malformed.") from None
            width = expected if kind == "null_space" else d_k - expected
            if basis is None or eigenvalues is None or basis.shape != (d_k, width) or eigenvalues.shape != (d_k,):
                raise CorruptArtifactError(f"{projector_path(layer)}: expected 'basis' [{d_k}, {width}] and "
                                           f"'eigenvalues' [{d_k}].")
            if not (torch.isfinite(basis).all() and torch.isfinite(eigenvalues).all()):
                raise CorruptArtifactError(f"{projector_path(layer)}: the projector contains NaN or Inf values.")
            if kind == "complement":
                complements[layer] = basis.double()
                bases[layer] = orthogonal_complement(complements[layer])
            else:
                bases[layer] = basis.double()
            spectra[layer] = eigenvalues.double()
        return cls(bases, spectra, spec["threshold"], spec["threshold_mode"], statistics, complements=complements)

    def artifact_files(self) -> dict[str, dict[str, torch.Tensor]]:
        """The projector's files: per layer the smaller of the null-space basis and its complement (float64
        `[d_k, m]`) with the eigenvalue spectrum `[d_k]`."""
        files = {}
        for layer in self.layers:
            basis = self.complements.get(layer, self.bases[layer])
            files[projector_path(layer)] = {"basis": basis, "eigenvalues": self.eigenvalues[layer].double()}
        return files

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the projector with its statistics as an artifact folder (safetensors + JSON + model card)."""
        statistics = self._statistics_for_saving()
        config = statistics.artifact_config()
        config["projector"] = {
            "threshold": self.threshold, "threshold_mode": self.threshold_mode, "layers": self.layers,
            "null_space_dims": {str(layer): self.null_space_dim(layer) for layer in self.layers},
            "representation": {str(layer): "complement" if layer in self.complements else "null_space"
                               for layer in self.layers}}
        write_artifact(directory, {**statistics.artifact_files(), **self.artifact_files()}, config)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    commit_message: str | None = None) -> str:
        """Upload the artifact to `repo_id` (created if needed; files of an earlier artifact replaced, other files
        kept); returns the commit sha."""
        with tempfile.TemporaryDirectory(prefix="hf_alphaedit-artifact-") as folder:
            self.save_pretrained(folder)
            return push_artifact_folder(folder, repo_id, private=private, token=token, commit_message=(
                commit_message or f"Key statistics and null-space projector for layers {self.layers} "
                                  f"(hf_alphaedit {__version__})"))

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

    The last `d - m` columns of a complete QR factorisation: exact up to round-off and deterministic for a given
    number of threads, so a projector rebuilt from a stored complement is bit-identical to the one that stored it
    (with another thread count, equal up to round-off). AlphaEdit's update
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


@dataclass
class LoadedArtifact:
    """An artifact read and checked: its statistics, projector (if any), config, and where it came from."""

    statistics: KeyStatistics
    projector: NullSpaceProjector | None
    config: dict[str, Any]
    repo_id: str | None = None  # None for a local folder
    revision: str | None = None  # the commit sha of a Hub artifact

    @property
    def source(self) -> dict[str, Any] | None:
        """`{"repo_id", "revision", "files"}` of a Hub artifact (for model cards); None for a local folder."""
        if self.repo_id is None:
            return None
        return {"repo_id": self.repo_id, "revision": self.revision,
                "files": {path: entry["sha256"] for path, entry in self.config["files"].items()}}


def load_projection_artifact(repo_id_or_path: str | os.PathLike, *, revision: str | None = None,
                             layers: Sequence[int] | None = None,
                             token: str | bool | None = None) -> LoadedArtifact:
    """Read an artifact (statistics and, if stored, the projector) from a local folder or a Hub repo.

    A Hub artifact that fails its checks is removed from the HF cache again, so nothing corrupt stays cached.
    """
    patterns = (["statistics/*", "projector/*"] if layers is None else
                [path for layer in layers for path in (statistics_path(layer), projector_path(layer))])
    folder, repo_id, commit = artifact_folder(repo_id_or_path, revision=revision, patterns=patterns, token=token)
    try:
        config = read_artifact_config(folder)
        statistics = KeyStatistics.from_artifact(folder, config, layers)
        projector = NullSpaceProjector.from_artifact(folder, config, statistics, statistics.layers)
    except CorruptArtifactError as err:
        if repo_id is None:
            raise
        evict_cached_files(Path(folder))
        raise type(err)(f"{repo_id}@{(commit or '')[:12]}: {err} (the fetched files were removed from the "
                        "cache)") from None
    return LoadedArtifact(statistics, projector, config, repo_id, commit)


def check_artifact_for_model(config: dict[str, Any], model: Any, layers: Sequence[int], *,
                             strict: bool = False) -> None:
    """`artifacts.check_artifact` for an `AlphaEditModel` (its spec, source and base weights) or a plain
    transformers model."""
    if callable(getattr(model, "base_weight_fingerprints", None)):
        check_artifact(config, model.spec, model.source, layers,
                       weight_fingerprints=model.base_weight_fingerprints(layers), strict=strict)
        return
    spec = resolve_model_spec(model, layer_module_tmp=None, rewrite_module_tmp=None, final_norm=None)
    source = ModelSource(getattr(model.config, "_name_or_path", "") or "unknown", None, None, "local")
    fingerprints = {layer: weight_fingerprint(spec.weight(model, layer)) for layer in layers}
    check_artifact(config, spec, source, layers, weight_fingerprints=fingerprints, strict=strict)
