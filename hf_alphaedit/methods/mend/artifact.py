"""A trained MEND editor as files: safetensors + JSON + a generated card; checksums, no math (see `editor.py`).

A folder (local, or a Hub model repo fetched through the HF cache):

    model.safetensors    the editor's parameters and input-normalisation statistics (float32 / float64); no
                         optimizer state
    mend_editor.json     `MendEditorConfig`: base model, revision, origin and weight fingerprints; every inner
                         parameter's name, block, shape and storage; the network's size; training data, arguments
                         and metrics; package version, creation time, SHA-256 and size of the weights file
    README.md            model card rendered from model_cards/mend_editor.md

Nothing is pickled. Reading checks the weights file against its recorded size and checksum before it is loaded.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..._version import __version__
from ...cards import card_template
from ...fingerprint import file_sha256
from ...hub import LOCAL_PREFIX, download_snapshot, upload_folder_replacing

EDITOR_CONFIG = "mend_editor.json"
EDITOR_WEIGHTS = "model.safetensors"  # the name transformers' Trainer looks for when it resumes a checkpoint
EDITOR_CARD = "README.md"


def write_editor_folder(directory: str | os.PathLike, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                        model_name: str | None = None) -> Path:
    """Write `model.safetensors` (`tensors`), `mend_editor.json` (`config` plus version, time and the weights'
    checksum) and `README.md` into `directory`; returns it. Other files there are left alone (Trainer checkpoints
    keep their optimizer state next to them). Files are staged and moved into place, the config last, so a reader
    never sees a half-written editor."""
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".mend-editor-", dir=directory))
    try:
        weights = staging / EDITOR_WEIGHTS
        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}, str(weights),
                  metadata={"format": "pt"})
        full_config = {**config, "hf_alphaedit_version": __version__,
                       "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "files": {EDITOR_WEIGHTS: {"sha256": file_sha256(weights), "size": weights.stat().st_size}}}
        (staging / EDITOR_CARD).write_text(render_editor_card(full_config, model_name or directory.resolve().name),
                                           encoding="utf-8")
        (staging / EDITOR_CONFIG).write_text(json.dumps(full_config, indent=2) + "\n", encoding="utf-8")
        for name in (EDITOR_WEIGHTS, EDITOR_CARD, EDITOR_CONFIG):
            os.replace(staging / name, directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def push_editor_folder(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                       token: str | bool | None = None, commit_message: str) -> str:
    """Make the Hub model repo `repo_id` hold exactly the editor in `folder` (one commit; files of earlier pushes
    removed); returns the commit sha."""
    return upload_folder_replacing(folder, repo_id, private=private, token=token, commit_message=commit_message).oid


def render_editor_card(config: Mapping[str, Any], model_name: str) -> str:
    """The editor's README: `model_cards/mend_editor.md` rendered with `huggingface_hub.ModelCard`."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    base_model = config["base_model"] if config.get("base_model_origin") != "local" else None
    training = config.get("training") or {}
    metrics = training.get("metrics") or {}
    datasets = [item["name"] for item in training.get("data", [])
                if "/" in item["name"] and not item["name"].startswith(LOCAL_PREFIX)]
    eval_results = [EvalResult(task_type="knowledge-editing", task_name="Knowledge editing (MEND)",
                               dataset_type="validation", dataset_name="held-out training records",
                               metric_type=name, metric_name=name.replace("_", " "), metric_value=value)
                    for name, value in metrics.items() if name.startswith("validation_")]
    data = ModelCardData(
        base_model=base_model, base_model_relation="adapter" if base_model else None, library_name="hf_alphaedit",
        tags=["hf_alphaedit", "mend", "knowledge-editing", "model-editing", "hypernetwork"],
        datasets=datasets or None, model_name=model_name, eval_results=eval_results or None,
        hf_alphaedit={"artifact": config["format"], "format_version": config["format_version"],
                      "model_type": config["model_type"], "layers": sorted({p["layer"] for p in config["inner_params"]}),
                      "inner_params": [p["name"] for p in config["inner_params"]], "rank": config["rank"],
                      "version": config["hf_alphaedit_version"]})
    card = ModelCard.from_template(data, template_str=card_template("mend_editor.md"), config=config,
                                   model_name=model_name, training=training, metrics=metrics,
                                   config_file=EDITOR_CONFIG, weights_file=EDITOR_WEIGHTS)
    return str(card)


def read_editor_folder(repo_id_or_path: str | os.PathLike, *, revision: str | None = None,
                       token: str | bool | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """`(config, tensors, where)` of an editor folder or Hub repo (fetched into the HF cache; served from it
    offline); `where` names it in errors (`repo@commit` for the Hub). The weights must match their checksum."""
    folder = Path(repo_id_or_path).expanduser()
    where = str(repo_id_or_path)
    if not folder.is_dir():
        if folder.is_absolute() or where.startswith((".", "~")) or where.count("/") != 1:
            raise FileNotFoundError(f"EditingArguments.mend_editor={where!r}: no such folder (and not a Hub repo id "
                                    "'namespace/name').")
        folder, commit = download_snapshot(where, revision=revision, token=token,
                                           allow_patterns=[EDITOR_CONFIG, EDITOR_WEIGHTS])
        where = f"{where}@{commit[:12]}"
    config_file = folder / EDITOR_CONFIG
    if not config_file.is_file():
        raise ValueError(f"mend_editor={where!r} holds no {EDITOR_CONFIG}: it is not a MEND editor written by "
                         "MendEditor.save_pretrained or `hf-alphaedit train-mend`.")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"mend_editor={where!r}: {EDITOR_CONFIG} is not valid JSON ({error}).") from None
    weights = folder / EDITOR_WEIGHTS
    recorded = config.get("files", {}).get(EDITOR_WEIGHTS) if isinstance(config, dict) else None
    if not weights.is_file() or not isinstance(recorded, dict) or weights.stat().st_size != recorded.get("size") \
            or file_sha256(weights) != recorded.get("sha256"):
        raise ValueError(f"mend_editor={where!r}: {EDITOR_WEIGHTS} is missing, truncated or corrupt (it does not "
                         f"match the size and SHA-256 in {EDITOR_CONFIG}); save or download the editor again.")
    return config, load_file(str(weights)), where


__all__ = ["EDITOR_CARD", "EDITOR_CONFIG", "EDITOR_WEIGHTS", "push_editor_folder", "read_editor_folder",
           "render_editor_card", "write_editor_folder"]
