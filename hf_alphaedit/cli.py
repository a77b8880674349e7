"""`hf-alphaedit`: the command line (also `python -m hf_alphaedit`).

Every subcommand's flags are the fields of dataclasses read by `transformers.HfArgumentParser`, so a flag is
spelled like the field it sets (`--statistics_corpus` is `EditingArguments.statistics_corpus`); `edit` and
`stats` also take every field of the selected `--method`'s config dataclass. `--config file.yaml|json` holds the
same names as keys; flags given on the command line win over the file. File values go to the dataclasses
untouched and their `__post_init__` converts them (YAML reads `1e-4` as a string), exactly as for flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import HfArgumentParser

from ._version import __version__
from .arguments import EditingArguments
from .artifacts import ARTIFACT_CONFIG
from .checkpointing import (
    CHECKPOINT_FILE,
    FINAL_MODEL_DIR,
    RUN_FILE,
    checkpoint_folders,
    edit_sequentially,
    latest_checkpoint,
)
from .demo.session import DemoLimits
from .distributed import DistributedError, data_parallel, default_device, end_data_parallel
from .fields import scalar_fields, validate_fields
from .hub import DEFAULT_MODEL
from .methods import get_method_classes, list_methods
from .methods.mend.artifact import EDITOR_CONFIG
from .methods.mend.training import MendTrainingArguments, train_mend
from .publishing import ADAPTER_CONFIG, EDIT_LOG, EDITING_CONFIG
from .requests import as_edit_requests, load_records

logger = logging.getLogger(__name__)

PROG = "hf-alphaedit"
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOG_LEVELS = ("debug", "info", "warning", "error")
# What `info` downloads of a Hub repo: the descriptive files of every kind of folder we write.
_INFO_FILES = [ARTIFACT_CONFIG, EDITOR_CONFIG, EDITING_CONFIG, EDIT_LOG, ADAPTER_CONFIG, RUN_FILE, CHECKPOINT_FILE]
_EDIT_LOG_PREVIEW = 5
# The statistics corpus `demo` uses by default when it exists: the WikiText-2 copy next to the checkout, offline.
OFFLINE_STATISTICS_CORPUS = "../shared/data/wikitext-2/valid.txt"
# Errors that mean "the input is wrong": reported as one line with exit status 2, no traceback.
_INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


class UsageError(ValueError):
    """A command line or config file the CLI cannot use."""


# -- argument dataclasses (each field is a flag) -------------------------------------------------------------


def _flag(help_text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": help_text}, **kwargs)


@dataclass
class ConfigArguments:
    """Flags of every subcommand (`train-mend` takes its log level from `TrainingArguments.log_level`)."""

    _argument_group_name = "common"

    config: str | None = _flag("YAML or JSON file of flag values (keys are the flag names without '--'); flags "
                               "given on the command line override it.", default=None)
    quiet: bool = _flag("No progress bars and only warnings; the final summary is still printed.", default=False)

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass
class CommonArguments(ConfigArguments):
    """Flags of every subcommand but `train-mend`."""

    log_level: Literal["debug", "info", "warning", "error"] = _flag("Logging level of hf_alphaedit.",
                                                                    default="info")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("log_level", self.log_level, LOG_LEVELS)


@dataclass
class ModelArguments:
    """Which model is loaded, and how."""

    _argument_group_name = "model"

    model_name_or_path: str | None = _flag(
        f"Hub id or local folder of the causal LM. Default: {DEFAULT_MODEL} (works offline), or for export and "
        "evaluate --edits the base model the edits name.", default=None)
    revision: str | None = _flag("Branch, tag or commit of a Hub model.", default=None)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _flag(
        "Weight dtype to load ('auto': as stored). Statistics and solves are float32 or float64 regardless.",
        default="auto")
    device: str | None = _flag(
        "Device to load the model on ('cpu', 'cuda', 'cuda:1', 'mps'), or 'auto' to spread a model larger than one "
        "device over the GPUs and the CPU (accelerate's device_map; the edited layers must not be offloaded). "
        "Default: cuda when available (this rank's GPU under torchrun / accelerate launch), else cpu.", default=None)
    trust_remote_code: bool = _flag("Run the model repo's own code (only for repos you trust).", default=False)

    def __post_init__(self) -> None:
        validate_fields(self)
        _check_choice("dtype", self.dtype, DTYPES)

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `AlphaEditModel.from_pretrained`."""
        import torch

        return {"revision": self.revision, "trust_remote_code": self.trust_remote_code,
                "device_map": self.device or default_device(),
                "dtype": self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)}


@dataclass
class RequestsArguments:
    """Where edit records come from."""

    _argument_group_name = "requests"

    requests: str = _flag(
        "Edit records: a .json file (a list) or a .jsonl file (one record a line) in any format the library reads "
        "(ours, CounterFact, flat CounterFact, ZsRE), or a Hub dataset name.")
    requests_split: str | None = _flag("Split of a Hub dataset given as --requests (default: train).", default=None)
    requests_limit: int | None = _flag("Use only the first this many records.", default=None)
    zsre_target: Literal["answers", "alt"] = _flag(
        "ZsRE records: edit towards answers[0] (official AlphaEdit) or alt (EasyEdit).", default="answers")

    def __post_init__(self) -> None:
        validate_fields(self)
        _check_choice("zsre_target", self.zsre_target, ("answers", "alt"))
        if self.requests_limit is not None and self.requests_limit < 1:
            raise UsageError(f"--requests_limit {self.requests_limit}: must be at least 1.")


@dataclass
class EditCommandArguments:
    """What `edit` does with the edited model besides saving it."""

    _argument_group_name = "edit"

    push_to_hub: bool = _flag("Push the edited model (weights, edit log, model card) to --hub_model_id.",
                              default=False)
    hub_model_id: str | None = _flag("Hub repo the edited model is pushed to.", default=None)
    do_eval: bool = _flag("Evaluate the requests before and after editing (efficacy, generalization, "
                          "specificity); the metrics go into the summary and the model card.", default=False)
    show_answers: int = _flag("Print the model's greedy answer to the prompts of the first this many requests, "
                              "before and after editing.", default=0)

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.push_to_hub and not self.hub_model_id:
            raise UsageError("--push_to_hub needs --hub_model_id (the repo to push to, e.g. me/smollm2-edited).")


@dataclass
class EvaluateCommandArguments:
    """What `evaluate` scores."""

    _argument_group_name = "evaluate"

    edits: str | None = _flag("Apply published edits first: an edited model, a delta folder (export --format delta) "
                              "or an edit run's output_dir, local or on the Hub.", default=None)
    edits_revision: str | None = _flag("Revision of --edits on the Hub.", default=None)
    baseline: bool = _flag("Also score the model without the --edits (reported as 'pre').", default=False)
    generation: bool = _flag("Also measure fluency of generated text (slower).", default=False)
    batch_tokens: int = _flag("Token budget of one scoring batch.", default=8192)
    output_file: str | None = _flag("Write the results as JSON to this file.", default=None)

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.baseline and not self.edits:
            raise UsageError("--baseline needs --edits: the unedited weights are the model minus those edits.")


@dataclass
class ExportCommandArguments:
    """What `export` writes."""

    _argument_group_name = "export"

    edits: str = _flag("The edits to export: an edited model or delta folder, or an edit run's output_dir, local "
                       "or on the Hub.")
    edits_revision: str | None = _flag("Revision of --edits on the Hub.", default=None)
    format: Literal["lora", "delta"] = _flag(
        "'lora': an exact PEFT LoRA adapter of the accumulated update; 'delta': the per-batch factors and keys, "
        "from which editing can continue.", default="lora")
    output_dir: str | None = _flag("Folder the export is written to.", default=None)
    push_to_hub: bool = _flag("Push the export to --hub_model_id.", default=False)
    hub_model_id: str | None = _flag("Hub repo the export is pushed to.", default=None)
    hub_private_repo: bool | None = _flag("Create the pushed repo as private.", default=None)
    hub_token: str | None = _flag("Hub token (default: the logged-in token).", default=None)

    def __post_init__(self) -> None:
        validate_fields(self)
        _check_choice("format", self.format, ("lora", "delta"))
        if not self.output_dir and not self.push_to_hub:
            raise UsageError("export: give --output_dir and/or --push_to_hub with --hub_model_id.")
        if self.push_to_hub and not self.hub_model_id:
            raise UsageError("--push_to_hub needs --hub_model_id (the repo to push to).")


@dataclass
class PushCommandArguments:
    """What `push` uploads."""

    _argument_group_name = "push"

    path: str = _flag("Folder written by hf_alphaedit: an edited model, an export, a statistics/projection "
                      "artifact (stats --output_dir), or an edit run's output_dir (its edited model is pushed).")
    repo_id: str = _flag("Hub repo to push to (created if needed; files of earlier pushes that the folder no "
                         "longer has are removed).")
    hub_private_repo: bool | None = _flag("Create the repo as private.", default=None)
    hub_token: str | None = _flag("Hub token (default: the logged-in token).", default=None)
    commit_message: str | None = _flag("Commit message.", default=None)

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass
class InfoCommandArguments:
    """What `info` describes."""

    _argument_group_name = "info"

    path: str = _flag("Local folder or Hub repo id: an edited model, an export, a projection artifact, an edit run's "
                      "output_dir or one of its checkpoints.")
    revision: str | None = _flag("Revision of a Hub repo.", default=None)
    json: bool = _flag("Print the description as JSON.", default=False)

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass
class DemoCommandArguments:
    """Where `demo` serves the Space, or where it publishes it."""

    _argument_group_name = "demo"

    host: str | None = _flag("Address to serve on. Default: $GRADIO_SERVER_NAME, else 127.0.0.1 (this machine only).",
                             default=None)
    port: int | None = _flag("Port to serve on. Default: $GRADIO_SERVER_PORT, else 7860.", default=None)
    share: bool = _flag("Also open a public gradio.live link (needs internet).", default=False)
    push_to_hub: str | None = _flag(
        "Instead of serving: publish the Space folder (spaces/alphaedit-demo) to this Space repo ('me/alphaedit-demo'; "
        "--hub_token, --hub_private_repo apply).", default=None)

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.push_to_hub is False:  # `push_to_hub: false` in a config file shared with `edit`: do not publish
            self.push_to_hub = None
        if self.push_to_hub is not None and (not isinstance(self.push_to_hub, str) or self.push_to_hub.count("/") != 1):
            raise UsageError(f"--push_to_hub {self.push_to_hub!r}: give the Space repo id to publish to, e.g. "
                             "me/alphaedit-demo.")
        if self.port is not None and not 0 < self.port < 65536:
            raise UsageError(f"--port {self.port}: give a TCP port between 1 and 65535.")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UsageError(f"--{name} {value!r}: choose one of {list(choices)}.")


# -- commands ------------------------------------------------------------------------------------------------------

Parsed = Mapping[type, Any]  # dataclass type -> its parsed instance


@dataclass(frozen=True)
class Command:
    """One subcommand: its dataclasses (in --help order) and what it runs."""

    name: str
    summary: str
    description: str
    arguments: tuple[type, ...]
    run: Callable[[Parsed], None]
    takes_method_config: bool = False


def _run_stats(parsed: Parsed) -> None:
    args: EditingArguments = parsed[EditingArguments]
    parallel = data_parallel()
    main_process = parallel is None or parallel.is_main
    if main_process:
        _refuse_foreign_output_dir(args.output_dir, ARTIFACT_CONFIG, args.overwrite_output_dir)
    start = time.perf_counter()
    editor = _load_editor(parsed)
    projector = editor.null_space_projector(editor.hparams.layers)  # pushes it when push_projection_to_hub
    if not main_process:  # every rank holds the combined statistics; rank 0 writes them
        parallel.barrier("waiting for rank 0 to write the artifact")
        return
    if args.output_dir:
        projector.save_pretrained(args.output_dir)
    statistics = projector.statistics
    rows: list[tuple[str, Any]] = [
        ("model", editor.source.name_or_path),
        ("layers", list(projector.layers)),
        ("corpus", args.statistics_corpus if editor.projection_source is None else None),
        ("tokens per layer", statistics.counts[projector.layers[0]] if statistics is not None else None),
        ("processes", parallel.world_size if parallel is not None else None),
        ("null space", ", ".join(f"layer {layer}: {projector.null_space_dim(layer)}/{projector.bases[layer].shape[0]}"
                                 for layer in projector.layers)),
        ("threshold", f"{projector.threshold:g} ({projector.threshold_mode})"),
        ("time", f"{time.perf_counter() - start:.1f} s"),
        ("saved to", args.output_dir),
        ("from / pushed to", _hub_location(editor.projection_source)),
    ]
    _print_summary("key statistics", rows)
    if parallel is not None:
        parallel.barrier("releasing the other ranks")


def _run_edit(parsed: Parsed) -> None:
    args: EditingArguments = parsed[EditingArguments]
    edit_args: EditCommandArguments = parsed[EditCommandArguments]
    records = _read_records(parsed[RequestsArguments])
    # Every record is checked (all problems reported at once) before the model is even loaded.
    requests = as_edit_requests(records, zsre_target=parsed[RequestsArguments].zsre_target,
                                batch_size=args.batch_size)
    if not requests:
        raise UsageError(f"--requests {parsed[RequestsArguments].requests!r} holds no records.")
    if not args.output_dir and not edit_args.push_to_hub:
        logger.warning("neither --output_dir nor --push_to_hub: the edited model will not be kept")
    start = time.perf_counter()
    editor = _load_editor(parsed)
    shown = requests[:edit_args.show_answers]
    answers_before = _greedy_answers(editor, shown)
    run = edit_sequentially(editor, requests)
    if shown:
        _print_answers(shown, answers_before, _greedy_answers(editor, shown))
    evaluation = None
    if edit_args.do_eval:
        evaluation = editor.evaluate(requests, baseline=True, show_progress=False if args.disable_tqdm else None)
    saved = None
    if args.output_dir:
        saved = editor.save_pretrained(Path(args.output_dir) / FINAL_MODEL_DIR)
    pushed = None
    if edit_args.push_to_hub:
        info = editor.push_to_hub(edit_args.hub_model_id, private=args.hub_private_repo, token=args.hub_token)
        pushed = {"repo_id": edit_args.hub_model_id, "revision": info.oid}
    reports = run.result.batches
    probabilities = [p for report in reports for p in report.target_probabilities]
    timings: dict[str, float] = {}
    for report in reports:
        for name, seconds in report.timings.items():
            timings[name] = timings.get(name, 0.0) + seconds
    resumed = (f" (resumed after {run.resumed_batches} batches from {run.resumed_from})"
               if run.resumed_from is not None else "")
    rows: list[tuple[str, Any]] = [
        ("model", editor.source.name_or_path),
        ("method", f"{args.method}, layers {list(editor.hparams.layers)}"),
        ("edits", f"{editor.state.num_edits} in {run.num_batches} batches of up to {args.batch_size}{resumed}"),
        ("time", f"{time.perf_counter() - start:.1f} s total, {run.result.seconds:.1f} s editing"
                 + (f" ({', '.join(f'{k} {v:.1f} s' for k, v in timings.items())})" if timings else "")),
        ("target probability", f"mean {sum(probabilities) / len(probabilities):.3f}, min {min(probabilities):.3f}"
         if probabilities else None),
        *_metric_rows(evaluation),
        ("last checkpoint", run.last_checkpoint),
        ("edited model", saved),
        ("pushed to", _hub_location(pushed)),
    ]
    _print_summary("edit", rows)


def _run_evaluate(parsed: Parsed) -> None:
    eval_args: EvaluateCommandArguments = parsed[EvaluateCommandArguments]
    records = _read_records(parsed[RequestsArguments])
    from .modeling import AlphaEditModel

    edits = _published_folder(eval_args.edits) if eval_args.edits else None
    model_args: ModelArguments = parsed[ModelArguments]
    name = model_args.model_name_or_path or (_base_model_of(edits, eval_args.edits_revision) if edits
                                             else DEFAULT_MODEL)
    editor = AlphaEditModel.from_pretrained(name, edits=edits, edits_revision=eval_args.edits_revision,
                                            **model_args.load_kwargs())
    results = editor.evaluate(records, baseline=eval_args.baseline, generation=eval_args.generation,
                              batch_tokens=eval_args.batch_tokens,
                              zsre_target=parsed[RequestsArguments].zsre_target,
                              show_progress=False if parsed[CommonArguments].quiet else None)
    if eval_args.output_file:
        Path(eval_args.output_file).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    rows: list[tuple[str, Any]] = [
        ("model", editor.source.name_or_path),
        ("edits", f"{editor.state.num_edits} from {edits}" if edits else None),
        ("records", results.get("num_records")),
        *_metric_rows(results),
        ("time", f"{results.get('seconds', 0.0):.1f} s"),
        ("results", eval_args.output_file),
    ]
    _print_summary("evaluation", rows)


def _run_export(parsed: Parsed) -> None:
    export_args: ExportCommandArguments = parsed[ExportCommandArguments]
    model_args: ModelArguments = parsed[ModelArguments]
    from .modeling import AlphaEditModel

    edits = _published_folder(export_args.edits)
    name = model_args.model_name_or_path or _base_model_of(edits, export_args.edits_revision)
    editor = AlphaEditModel.from_pretrained(name, edits=edits, edits_revision=export_args.edits_revision,
                                            **model_args.load_kwargs())
    saved = editor.save_edits(export_args.output_dir, format=export_args.format) if export_args.output_dir else None
    pushed = None
    if export_args.push_to_hub:
        info = editor.push_edits_to_hub(export_args.hub_model_id, export_args.format,
                                        private=export_args.hub_private_repo, token=export_args.hub_token)
        pushed = {"repo_id": export_args.hub_model_id, "revision": info.oid}
    rows: list[tuple[str, Any]] = [
        ("base model", editor.source.name_or_path),
        ("edits", f"{editor.state.num_edits} in {len(editor.state.batches)} batches, layers "
                  f"{list(editor.hparams.layers)}"),
        ("format", export_args.format),
        ("saved to", saved),
        ("pushed to", _hub_location(pushed)),
    ]
    _print_summary("export", rows)


def _run_push(parsed: Parsed) -> None:
    push_args: PushCommandArguments = parsed[PushCommandArguments]
    folder = Path(_published_folder(push_args.path))
    if not folder.is_dir():
        raise FileNotFoundError(f"--path {push_args.path!r}: no such folder.")
    description = describe_folder(folder)
    if description["kind"] == "projection artifact":
        from .hub import upload_folder_replacing

        revision = upload_folder_replacing(folder, push_args.repo_id, private=push_args.hub_private_repo,
                                           token=push_args.hub_token, commit_message=push_args.commit_message
                                           or f"Key statistics and projector (hf_alphaedit {__version__})")
    elif description["kind"] in ("edited model", "edits (lora)", "edits (delta)"):
        from .publishing import push_folder

        revision = push_folder(folder, push_args.repo_id, private=push_args.hub_private_repo,
                               token=push_args.hub_token, commit_message=push_args.commit_message
                               or f"{description['kind']}: {description.get('edits')} edits").oid
    else:
        raise UsageError(f"--path {push_args.path!r} is {description['kind']}; push an edited model, an export or a "
                         "projection artifact.")
    _print_summary("push", [("pushed", f"{folder} ({description['kind']})"),
                            ("to", _hub_location({"repo_id": push_args.repo_id, "revision": revision}))])


def _run_info(parsed: Parsed) -> None:
    info_args: InfoCommandArguments = parsed[InfoCommandArguments]
    folder = Path(info_args.path).expanduser()
    if not folder.is_dir():
        if folder.exists() or Path(info_args.path).suffix:
            raise FileNotFoundError(f"--path {info_args.path!r}: not a folder (give a folder or a Hub repo id).")
        from .hub import download_snapshot

        folder, _ = download_snapshot(info_args.path, revision=info_args.revision, allow_patterns=_INFO_FILES)
    description = describe_folder(folder)
    if info_args.json:
        print(json.dumps(description, indent=2, default=str))
    else:
        _print_summary(f"{info_args.path}", list(description.items()))


def _run_demo(parsed: Parsed) -> None:
    demo_args: DemoCommandArguments = parsed[DemoCommandArguments]
    args: EditingArguments = parsed[EditingArguments]
    if demo_args.push_to_hub:
        from .demo import SPACE_FOLDER, push_space

        commit = push_space(demo_args.push_to_hub, private=args.hub_private_repo, token=args.hub_token)
        _print_summary("demo", [("published", SPACE_FOLDER),
                                ("to", _hub_location({"repo_id": demo_args.push_to_hub, "revision": commit.oid}))])
        return
    default_corpus = next(f.default for f in dataclasses.fields(EditingArguments) if f.name == "statistics_corpus")
    if args.statistics_corpus == default_corpus and Path(OFFLINE_STATISTICS_CORPUS).is_file():
        args.statistics_corpus = OFFLINE_STATISTICS_CORPUS
        logger.info("key statistics from %s (pass --statistics_corpus to use another corpus)", args.statistics_corpus)
    from .demo import EditingSession
    from .demo.ui import serve

    serve(EditingSession(_load_editor(parsed), parsed[DemoLimits]), host=demo_args.host, port=demo_args.port,
          share=demo_args.share)


def _run_train_mend(parsed: Parsed) -> None:
    args: MendTrainingArguments = parsed[MendTrainingArguments]
    if parsed[ConfigArguments].quiet:
        args.disable_tqdm = True
    result = train_mend(args)
    config = result.editor.config
    _print_summary("train-mend", [
        ("base model", f"{config.base_model or 'a local model'} ({config.base_model_origin})"),
        ("inner parameters", f"{len(config.inner_params)} matrices in blocks {config.layers}"),
        ("training", f"{result.steps} steps in {result.seconds:.0f} s "
                     f"({config.training['train_records']} records, {args.edits_per_batch} edits per batch)"),
        *((name, f"{value:.4f}") for name, value in result.metrics.items()),
        ("editor", result.editor_dir),
        ("pushed to", _hub_location({"repo_id": args.editor_repo_id, "revision": result.pushed_revision}
                                    if result.pushed_revision else None)),
    ])


def describe_folder(folder: Path) -> dict[str, Any]:
    """What a folder written by hf_alphaedit holds: `{"kind": ..., ...}` (kind "unknown folder" otherwise)."""
    if (folder / RUN_FILE).is_file():
        run = _read_json(folder / RUN_FILE)
        checkpoint = latest_checkpoint(folder)
        done = _read_json(checkpoint / CHECKPOINT_FILE) if checkpoint is not None else None
        return {"kind": "edit run", "model": run["model"]["name_or_path"], "method": run["editing_args"]["method"],
                "requests": run["requests"]["count"], "batch_size": run["editing_args"]["batch_size"],
                "latest checkpoint": f"{checkpoint.name} ({done['num_edits']} edits, {done['num_batches']} batches)"
                if done else None,
                "kept checkpoints": ", ".join(entry.name for entry in checkpoint_folders(folder)) or None,
                "edited model": str(folder / FINAL_MODEL_DIR) if (folder / FINAL_MODEL_DIR).is_dir() else None}
    if (folder / CHECKPOINT_FILE).is_file():
        done = _read_json(folder / CHECKPOINT_FILE)
        return {"kind": "checkpoint", "model": done["run"]["model"]["name_or_path"], "edits": done["num_edits"],
                "batches": done["num_batches"], "of requests": done["run"]["requests"]["count"]}
    if (folder / ARTIFACT_CONFIG).is_file():
        config = _read_json(folder / ARTIFACT_CONFIG)
        projector = config.get("projector") or {}
        return {"kind": "projection artifact", "base model": config.get("base_model"),
                "revision": config.get("base_model_commit") or config.get("base_model_revision"),
                "layers": config.get("layers"), "modules": config.get("modules"), "corpus": config.get("corpus"),
                "samples": config.get("samples"), "tokens": config.get("tokens"),
                "projector": (f"threshold {projector['threshold']:g} ({projector['threshold_mode']}), null-space "
                              f"dimensions {projector['null_space_dims']}") if projector else "none (statistics only)",
                "created": config.get("created_at"), "hf_alphaedit": config.get("package_version")}
    if (folder / EDITOR_CONFIG).is_file():
        config = _read_json(folder / EDITOR_CONFIG)
        training = config.get("training") or {}
        return {"kind": "MEND editor", "base model": config.get("base_model") or "a local model",
                "revision": config.get("base_model_revision"), "model type": config.get("model_type"),
                "inner parameters": [param["name"] for param in config["inner_params"]], "rank": config.get("rank"),
                "training steps": training.get("steps"), "metrics": training.get("metrics") or None,
                "hf_alphaedit": config.get("hf_alphaedit_version")}
    if (folder / EDITING_CONFIG).is_file():
        config = _read_json(folder / EDITING_CONFIG)
        kind = "edited model" if config["format"] == "checkpoint" else f"edits ({config['format']})"
        log = folder / EDIT_LOG
        lines = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()] \
            if log.is_file() else []
        edits = [line for line in lines if line.get("event") == "edit"]
        preview = [f"{line['prompt'].replace('{}', line['subject'])} -> {line['target_new']}"
                   for line in edits[:_EDIT_LOG_PREVIEW]]
        base = config["base_model"]
        return {"kind": kind, "method": config["method"], "base model": base["name_or_path"] or "a local model",
                "base revision": base.get("commit_sha") or base.get("revision"), "edits": config["num_edits"],
                "batches": config["num_batches"], "layers": config["hyperparameters"]["layers"],
                "reverted batches": sum(1 for line in lines if line.get("event") == "revert") or None,
                "projection": _hub_location(config.get("projection")),
                "first edits": "; ".join(preview) + (" ..." if len(edits) > len(preview) else "") or None,
                "hf_alphaedit": config.get("hf_alphaedit_version")}
    return {"kind": "unknown folder", "note": f"{folder} holds none of {RUN_FILE}, {CHECKPOINT_FILE}, "
                                              f"{ARTIFACT_CONFIG}, {EDITOR_CONFIG}, {EDITING_CONFIG}: not written by "
                                              "hf_alphaedit"}


COMMANDS: dict[str, Command] = {command.name: command for command in (
    Command("stats", "collect key statistics and the null-space projector (save and/or push them)",
            "Collect the key statistics of the edited layers over --statistics_corpus and build the null-space "
            "projector: saved as an artifact folder in --output_dir and/or pushed with --push_projection_to_hub "
            "(to --projection_hub_repo_id). With --projection auto an existing Hub artifact is used instead.",
            (CommonArguments, ModelArguments, EditingArguments), _run_stats),
    Command("edit", "apply edits from a JSON/JSONL file or a dataset; save and/or push the edited model",
            "Apply --requests batch after batch (--batch_size). With --output_dir the edited model is saved to "
            f"<output_dir>/{FINAL_MODEL_DIR}; --save_steps k writes an atomic checkpoint every k batches there and "
            "--resume_from_checkpoint true continues a killed run bitwise identically. The selected --method's "
            "config fields are flags too (see `--method memit --help`).",
            (CommonArguments, ModelArguments, RequestsArguments, EditCommandArguments, EditingArguments), _run_edit,
            takes_method_config=True),
    Command("evaluate", "score a model (optionally with published edits) on edit records",
            "CounterFact / ZsRE metrics (efficacy, generalization, specificity; fluency with --generation) of a "
            "model, optionally with --edits applied and --baseline scores without them.",
            (CommonArguments, ModelArguments, RequestsArguments, EvaluateCommandArguments), _run_evaluate),
    Command("push", "upload an edited model, an export or a projection artifact to the Hub",
            "Upload a folder written by hf_alphaedit to --repo_id.", (CommonArguments, PushCommandArguments),
            _run_push),
    Command("export", "export edits as a PEFT LoRA adapter or delta files",
            "Apply --edits to their base model (--model_name_or_path, default: the base the edits name) and write "
            "them as an exact PEFT LoRA adapter or as delta files.",
            (CommonArguments, ModelArguments, ExportCommandArguments), _run_export),
    Command("demo", "serve the AlphaEdit Space demo locally, or publish it as a Hub Space",
            "Serve the Space (spaces/alphaedit-demo) on --model_name_or_path (default: the embedded SmolLM2, works "
            f"offline) with key statistics from --statistics_corpus (default: {OFFLINE_STATISTICS_CORPUS} when it "
            "exists, cached after the first run), or publish the Space folder with --push_to_hub SPACE_ID. The "
            "editing flags and the selected --method's config fields apply to the demo's edits.",
            (CommonArguments, ModelArguments, DemoCommandArguments, DemoLimits, EditingArguments), _run_demo,
            takes_method_config=True),
    Command("info", "describe an edited model, export, projection artifact, MEND editor, run or checkpoint",
            "Say what a folder or Hub repo written by hf_alphaedit contains.", (CommonArguments, InfoCommandArguments),
            _run_info),
    Command("train-mend", "train a MEND editor for a base model (transformers.Trainer); save and/or push it",
            "Train a MEND editor on flat CounterFact / MEND-format ZsRE training files with MendTrainer "
            "(transformers.Trainer): every TrainingArguments flag works (eval/save strategies, "
            "resume_from_checkpoint, ...) plus MEND's own (see --help). The editor is saved to --editor_dir "
            "(default <output_dir>/editor) and pushed with --push_editor_to_hub --editor_repo_id.",
            (ConfigArguments, MendTrainingArguments), _run_train_mend),
)}


# -- parsing ----------------------------------------------------------------------------------------------------


def build_parser(command: Command, method: str | None) -> tuple[HfArgumentParser, list[type]]:
    """The subcommand's parser over its dataclasses (plus `method`'s config class for editing commands)."""
    types = list(command.arguments)
    if command.takes_method_config:
        config_cls, _ = get_method_classes(method or EditingArguments.method)
        if config_cls is not None:
            types.append(config_cls)
    required = [f"--{f.name} {f.name.upper()}" for cls in types for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    parser = HfArgumentParser(types, prog=f"{PROG} {command.name}", description=command.description,
                              usage=" ".join(["%(prog)s", *required, "[--config FILE] [flags]"]), allow_abbrev=False)
    # HfArgumentParser types an `int | None` flag as int; 'none' gives such a field its None (e.g. keep every
    # checkpoint), which a config file says with null.
    optional = {spec.name for cls in types for spec in scalar_fields(cls) if spec.optional}
    for action in parser._actions:
        if action.dest in optional and action.type is not None:
            action.type = _none_or(action.type)
            action.help = f"{action.help or ''} ('none' for None)".strip()
    return parser, types


def _none_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """`convert`, except that 'none' / 'null' (any case) give None."""
    def parse(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names it in "invalid int value: 'x'"
    return parse


def parse_command(command: Command, args: Sequence[str]) -> dict[type, Any]:
    """Parse `args` (after the subcommand name) into `{dataclass type: instance}`.

    Values come from the dataclass defaults, then `--config`, then the command line. Flags are converted by
    argparse; file values are passed as they are and converted by the dataclasses' `__post_init__`.
    """
    args = list(args)
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--config")
    early.add_argument("--method")
    known, _ = early.parse_known_args(args)
    file_values = read_config_file(known.config) if known.config else {}
    parser, types = build_parser(command, known.method or file_values.get("method"))
    destinations = {action.dest for action in parser._actions if action.dest != "help"}
    # One config file serves every subcommand: keys that are another subcommand's flags are left out here.
    other_commands = {key for key in file_values if key not in destinations and key in _all_flag_names()}
    if other_commands:
        logger.debug("--config %s: %s are not flags of %s; ignored", known.config, sorted(other_commands),
                     command.name)
    file_values = {key: value for key, value in file_values.items() if key not in other_commands}
    unknown = sorted(set(file_values) - destinations)
    if unknown:
        hints = "".join(f" ('{key}': did you mean '{match[0]}'?)" for key in unknown
                        if (match := difflib.get_close_matches(key, destinations, n=1)))
        raise UsageError(f"--config {known.config}: unknown key(s) {unknown}{hints}; keys are flag names without "
                         f"'--' (see `{PROG} {command.name} --help`).")
    if any(arg in ("-h", "--help") for arg in args):
        parser.set_defaults(**file_values)  # shows the effective values in --help
        parser.print_help()
        raise SystemExit(0)
    # Only flags given on the command line land in the namespace; everything else keeps the file or field default.
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        if action.dest in file_values:
            action.required = False
    namespace, remaining = parser.parse_known_args(args)
    if remaining:
        flags = [arg for arg in remaining if arg.startswith("-")]
        options = [s for action in parser._actions for s in action.option_strings]
        hints = "".join(f" ('{flag}': did you mean '{match[0]}'?)" for flag in flags
                        if (match := difflib.get_close_matches(flag.split("=")[0], options, n=1)))
        raise UsageError(f"unrecognized argument(s) {remaining}{hints}; see `{PROG} {command.name} --help`.")
    values = {**file_values, **vars(namespace)}
    return {cls: cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.init and f.name in values})
            for cls in types}


def _all_flag_names() -> set[str]:
    """Every flag name of every subcommand, with the config fields of every registered method."""
    classes = {cls for command in COMMANDS.values() for cls in command.arguments}
    classes |= {config_cls for name in list_methods() if (config_cls := get_method_classes(name)[0]) is not None}
    return {f.name for cls in classes for f in dataclasses.fields(cls)}


def read_config_file(path: str) -> dict[str, Any]:
    """A YAML or JSON config file as a flat `{flag name: value}` dict."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"--config {path!r}: no such file.")
    suffix = file.suffix.lower()
    text = file.read_text(encoding="utf-8")
    try:
        if suffix == ".json":
            values = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            values = yaml.safe_load(text) or {}
        else:
            raise UsageError(f"--config {path!r}: use a .yaml, .yml or .json file.")
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise UsageError(f"--config {path!r}: not valid {suffix[1:].upper()} ({error}).") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path!r}: expected a mapping of flag names to values, got "
                         f"{type(values).__name__}.")
    if "config" in values:
        raise UsageError(f"--config {path!r}: a config file cannot name another config file.")
    return values


# -- helpers ------------------------------------------------------------------------------------------------------


def _load_editor(parsed: Parsed) -> Any:
    """The `AlphaEditModel` of an editing command (its editing arguments and method config)."""
    from .modeling import AlphaEditModel

    args: EditingArguments = parsed[EditingArguments]
    model_args: ModelArguments = parsed[ModelArguments]
    if parsed[CommonArguments].quiet:
        args.disable_tqdm = True
    config_cls, _ = get_method_classes(args.method)
    return AlphaEditModel.from_pretrained(model_args.model_name_or_path or DEFAULT_MODEL, editing_args=args,
                                          method_config=parsed.get(config_cls), **model_args.load_kwargs())


def _read_records(requests_args: RequestsArguments) -> list[Any]:
    """Raw records from --requests: a local .json/.jsonl file (errors name the line) or a Hub dataset."""
    source = requests_args.requests
    path = Path(source).expanduser()
    if path.suffix.lower() in (".json", ".jsonl") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"--requests {source!r}: no such file; give a .json or .jsonl file of edit "
                                    "records, or a Hub dataset name.")
        records = load_records(path)
        return records[:requests_args.requests_limit] if requests_args.requests_limit else records
    from .evaluation.editing import load_edit_records

    return load_edit_records(source, split=requests_args.requests_split, limit=requests_args.requests_limit)


def _published_folder(path: str) -> str:
    """An edit run's output_dir stands for the edited model saved in it; anything else is returned as is."""
    folder = Path(path).expanduser()
    if (folder / RUN_FILE).is_file():
        if not (folder / FINAL_MODEL_DIR).is_dir():
            raise FileNotFoundError(f"{path!r} is an edit run without an edited model yet (no {FINAL_MODEL_DIR}/); "
                                    "finish it with `edit --resume_from_checkpoint true`.")
        return str(folder / FINAL_MODEL_DIR)
    return path


def _base_model_of(edits: str, revision: str | None) -> str:
    """The Hub id of the base model published edits were made on (for commands given no --model_name_or_path)."""
    from .publishing import read_published_edits

    name = read_published_edits(edits, revision=revision).config["base_model"]["name_or_path"]
    if not name:
        raise UsageError(f"{edits!r} was made on a local model; pass it as --model_name_or_path.")
    return name


def _refuse_foreign_output_dir(output_dir: str | None, marker: str, overwrite: bool) -> None:
    """Refuse a non-empty output_dir that an earlier run of the same kind (with `marker`) did not write."""
    folder = Path(output_dir).expanduser() if output_dir else None
    if folder is None or overwrite or not folder.is_dir() or not any(folder.iterdir()) or (folder / marker).is_file():
        return
    raise FileExistsError(f"--output_dir {output_dir!r} is not empty and holds no {marker}; choose an empty or new "
                          "folder, or pass --overwrite_output_dir.")


def _metric_rows(results: Mapping[str, Any] | None) -> list[tuple[str, Any]]:
    """Summary rows of evaluation results: every headline metric, with the pre-edit value when there is one."""
    if not results:
        return []
    pre = results.get("pre") or {}
    rows = []
    for name, value in results.items():
        if isinstance(value, float) and not name.endswith("_std") and name not in ("seconds", "records_per_second"):
            before = pre.get(name)
            rows.append((name, f"{value:.2f}" + (f" (before: {before:.2f})" if isinstance(before, float) else "")))
    return rows


def _hub_location(source: Mapping[str, Any] | None) -> str | None:
    if not source or not source.get("repo_id"):
        return None
    revision = source.get("revision")
    return f"{source['repo_id']}@{revision[:12]}" if revision else source["repo_id"]


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _greedy_answers(editor: Any, requests: Sequence[Any], new_tokens: int = 8) -> list[str]:
    """The first line of the model's greedy continuation of each request's prompt."""
    from .evaluation import greedy_answers

    return greedy_answers(editor.model, editor.tokenizer, [r.prompt_with_subject for r in requests], new_tokens)


def _print_answers(requests: Sequence[Any], before: Sequence[str], after: Sequence[str]) -> None:
    print("\nanswers (greedy)\n--------------------")
    for request, old, new in zip(requests, before, after, strict=True):
        print(f"  {request.prompt_with_subject} ...\n      before: {old}\n      after:  {new}"
              f"   (target: {request.target_new})")


def _print_summary(title: str, rows: Sequence[tuple[str, Any]]) -> None:
    """A two-column table of the rows whose value is not None, on stdout."""
    shown = [(name, str(value)) for name, value in rows if value is not None]
    width = max((len(name) for name, _ in shown), default=0)
    print(f"\n{title}\n{'-' * max(len(title), 20)}")
    for name, value in shown:
        print(f"  {name:<{width}}  {value}")


# Libraries that attach their own stderr handler and still propagate to the root logger: with the root handler
# below, each of their messages would be printed twice.
_SELF_PRINTING_LIBRARIES = ("huggingface_hub", "datasets", "transformers")


def configure_logging(common: ConfigArguments) -> None:
    """One handler for the command's own messages; the libraries keep theirs, and every message prints once.
    hf_alphaedit logs at `common.log_level` (`info` for `train-mend`, whose own flag is Trainer's)."""
    log_level = common.log_level if isinstance(common, CommonArguments) else "info"
    level = logging.WARNING if common.quiet else getattr(logging, log_level.upper())
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("hf_alphaedit").setLevel(level)
    for name in _SELF_PRINTING_LIBRARIES:
        library = logging.getLogger(name)
        if library.handlers:
            library.propagate = False
    if common.quiet:  # the libraries' own bars (weight loading, downloads)
        import huggingface_hub.utils
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()


def _top_level_help() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"usage: {PROG} <command> [flags]   ({PROG} <command> --help for its flags)", "",
             "Sequential knowledge editing for Hugging Face causal LMs (AlphaEdit and friends).", "", "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", "Every command takes --config file.yaml|json (keys are flag names; flags override the file).",
              f"Example: {PROG} edit --requests examples/edits.json --output_dir edited --save_steps 1"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failure, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_level_help())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"{PROG} {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        match = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        print(f"{PROG}: error: unknown command {argv[0]!r}{hint}; choose one of {', '.join(COMMANDS)}.",
              file=sys.stderr)
        return 2
    try:
        parsed = parse_command(command, argv[1:])
        configure_logging(parsed.get(CommonArguments) or parsed[ConfigArguments])
        command.run(parsed)
    except _INPUT_ERRORS as error:
        logger.debug("input error", exc_info=True)
        print(f"{PROG} {command.name}: error: {error}", file=sys.stderr)
        return 2
    except (OSError, DistributedError) as error:  # network, Hub, disk and peer failures: one line
        logger.debug("failure", exc_info=True)
        print(f"{PROG} {command.name}: failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    finally:
        end_data_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
