"""`EditingArguments`: every setting of an editing run, Trainer-style.

The dataclass works with `transformers.HfArgumentParser` (each field is a `--flag`) and saves / loads as
JSON. Hyperparameters left at `None` are resolved against the loaded model by `resolve()` (see `hparams.py`):
either from the reference files of the official AlphaEdit code (`preset="reference"`) or from rules that adapt
to the model (`preset="auto"`, the default). Every number is checked at construction (`fields.py`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .fields import coerce_number, setting, validate_fields
from .hparams import (
    AUTO_V_LR_RMS_FACTOR,
    CONTEXT_SEED_WORDS,
    MAX_CONTEXT_TEMPLATE_LENGTH,
    ResolvedHyperparameters,
    resolve_hyperparameters,
)
from .memory import parse_memory_budget
from .registry import get_method_classes, projection_support, supports_target_rescaling

if TYPE_CHECKING:
    from .architectures import ModelSpec

logger = logging.getLogger(__name__)

FACT_TOKENS = ("subject_last", "subject_first_after_last", "last")
THRESHOLD_MODES = ("absolute", "relative", "energy")
PRESETS = ("auto", "reference")
PRUNE_ALPHAS = ("e", "2", "1.5", "1.2", "linear")
PRUNE_RESTRAIN_AT = ("end", "every_batch")

# Settings that act outside the run (pushes, tokens, folders and files of the machine that runs it, how much of its
# memory a run takes). Published edits never carry them into the loader's run (`EditingArguments.from_published`).
SIDE_EFFECT_FIELDS = ("output_dir", "save_steps", "save_total_limit", "resume_from_checkpoint",
                      "overwrite_output_dir", "statistics_cache_dir", "push_projection_to_hub", "projection_hub_repo_id",
                      "hub_private_repo", "hub_token", "disable_tqdm", "target_memory_budget",
                      "statistics_memory_budget")
# Settings that name where data comes from: taken from published edits only when they name a Hub repo or data set
# (or a keyword), never a path on the loader's machine.
SOURCE_FIELDS = ("statistics_corpus", "projection", "mend_editor", "norm_anchor_records")
_SOURCE_KEYWORDS = {"projection": ("auto", "compute")}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(:[\w.-]+)?")


@dataclass
class EditingArguments:
    """Settings of a sequential editing run.

    Fields left at `None` are filled in by `resolve(spec)` for the loaded model; see `preset`.
    """

    method: str = setting("Editing method: a registered name (hf_alphaedit.list_methods()), e.g. 'alphaedit' "
                        "(null-space projected) or 'memit' (unprojected baseline).", default="alphaedit")
    use_projection: bool | None = setting(
        "Project every update onto the null space of preserved keys (ALGORITHMS.md §2.5): ΔW ← ΔW·P. Default: on "
        "for methods that solve in the null space (alphaedit, where it cannot be turned off), off otherwise; "
        "true adds it to methods whose updates are factored key-space deltas (memit, rome, ft, plugins).",
        default=None)
    prune: bool = setting(
        "Add the PRUNE restraint (ALGORITHMS.md §7) to the method: singular values of the accumulated "
        "perturbation of each edited matrix above the largest singular value σ_max of its original weight are "
        "shrunk to σ_max + log_α(σ/σ_max).", default=False)
    prune_alpha: str = setting("PRUNE restraint function: log base 'e' (reference default), '2', '1.5', '1.2' "
                             "(smaller is weaker), or 'linear' (σ/2 + σ_max/2).", default="e")
    prune_restrain_at: str = setting(
        "'end' (reference): the weights always hold the restraint of the whole perturbation, but every batch is "
        "computed on the unrestrained weights, as if the restraint were applied once after the last edit; "
        "'every_batch': the restrained weights are what the next batch edits.", default="end")
    prune_clip: bool = setting(
        "Use min(F(σ), σ) (a deviation from the reference). The log restraint enlarges singular values just "
        "above σ_max when σ_max < 1/ln α; without this flag that case is refused.", default=False)
    norm_anchor: bool = setting(
        "Add NAS, Norm-Anchor Scaling (Liu et al. 2026, arXiv 2602.02543), to a locate-then-edit method (alphaedit, "
        "memit, nse): each request's target MLP output v* = v0 + δ at the last edited layer is rescaled to the "
        "anchor norm, or dropped (v* = v0) when ‖v*‖ exceeds twice the anchor. The anchor is the mean ‖v*‖ "
        "(largest 5 percent left out) of norm_anchor_samples requests of norm_anchor_records, optimised on the "
        "unedited model once per model and cached next to the key statistics.", default=False)
    norm_anchor_records: str | None = setting(
        "NAS: the requests that set the anchor, CounterFact-style records in a local .json/.jsonl file or a Hub "
        "dataset name (train split); the first norm_anchor_samples of them are used. Take training records, never "
        "the ones edits are evaluated on. Required with norm_anchor.", default=None)
    norm_anchor_samples: int = setting(
        "NAS: how many of norm_anchor_records set the anchor. Each costs one target optimisation (about 7 s for "
        "SmolLM2-135M on 2 CPU cores), so the reference's 1000 would take two hours there; default 100.",
        default=100, low=1)
    preset: str = setting(
        "How unset hyperparameters are chosen: 'auto' adapts them to the model (step size scaled to the "
        "hidden-state RMS, optimisation until the target is reached, up to a cap); 'reference' reproduces the "
        "official AlphaEdit files (GPT-2 XL, GPT-J, Llama-3-8B; other families inherit the closest one).",
        default="auto")
    layers: list[int] | None = setting("Edited layers (0-based). Default: chosen by relative depth.", default=None)
    batch_size: int = setting("Edits per batch in sequential editing.", default=100, low=1)
    collapse_guard: float | None = setting(
        "Refuse (atomically: nothing applied, CollapseGuardError) a batch after which an edited matrix's Frobenius "
        "norm exceeds this multiple of its original norm, ‖W‖ > collapse_guard·‖W₀‖; the norm growth of the edited "
        "matrices is what precedes the collapse of long edit sequences (every batch's telemetry records it). "
        "Default: no guard.", default=None, low=1, low_open=True)
    seed: int = setting("Seed for context-template sampling and anything else random.", default=0, low=0)
    output_dir: str | None = setting("Where edited checkpoints, logs and run state are written.", default=None)
    save_steps: int | None = setting(
        "Write a checkpoint of the sequential run into output_dir every this many batches (atomically: a run "
        "killed at any moment resumes from the last one). Default: no checkpoints.", default=None, low=1)
    save_total_limit: int | None = setting(
        "How many checkpoints output_dir keeps: after each new one the oldest beyond this number are deleted. "
        "Default 1 (the latest only: a checkpoint holds every edited matrix); None (null in a config file, none on "
        "the command line) keeps them all, e.g. to evaluate a long run at several points afterwards.", default=1,
        low=1)
    resume_from_checkpoint: str | None = setting(
        "Continue a sequential run from a checkpoint folder, or 'true' for the latest checkpoint in output_dir.",
        default=None)
    overwrite_output_dir: bool = setting(
        "Let a run write into an output_dir that holds a different run (its checkpoints and edited model are "
        "replaced).", default=False)

    statistics_corpus: str = setting(
        "Corpus for key statistics: a Hub dataset name ('name' or 'name:config') or a local .txt/.json/.jsonl "
        "file or folder of them.", default="Salesforce/wikitext:wikitext-103-raw-v1")
    statistics_samples: int = setting("Number of corpus samples (documents or lines) for key statistics.",
                                    default=100000, low=1)
    statistics_max_length: int | None = setting(
        "Truncate each sample to this many tokens. Default: the model's context length, capped at 4096.",
        default=None, low=1)
    statistics_batch_tokens: int = setting("Token budget (padded) of one statistics forward batch.", default=8192, low=1)
    statistics_memory_budget: str | None = setting(
        "Memory one statistics forward batch may use besides the model and the running sums: a size ('2GiB', "
        "'800MB'), 'auto' (half the memory free on the model's input device when the pass starts) or 'none' "
        "(statistics_batch_tokens alone). Batches get at most the tokens that fit, from the bytes a probe of the "
        "longest sample keeps per token in one block.", default="auto")
    statistics_cache_dir: str | None = setting(
        "Where collected statistics are cached. Default: $HF_ALPHAEDIT_CACHE/statistics or "
        "~/.cache/hf_alphaedit/statistics.", default=None)
    projection: str = setting(
        "Where key statistics and the null-space projector come from: 'auto' (use the Hub artifact "
        "<$HF_ALPHAEDIT_NAMESPACE or hf-alphaedit>/<model name>-key-statistics when it exists and fits the model, "
        "else compute from statistics_corpus and cache locally), 'compute' (never look on the Hub), a Hub repo "
        "id, or a local artifact folder.", default="auto")
    projection_revision: str | None = setting("Revision (branch, tag or commit) of a Hub projection artifact.",
                                            default=None)
    push_projection_to_hub: bool = setting(
        "Upload statistics and projector computed in this run to projection_hub_repo_id (default: "
        "<your namespace>/<model name>-key-statistics).", default=False)
    projection_hub_repo_id: str | None = setting("Hub repo the computed projection artifact is pushed to.",
                                               default=None)
    mend_editor: str | None = setting(
        "MEND (method='mend'): the trained editor, a Hub repo id or a local folder written by "
        "MendEditor.save_pretrained / `hf-alphaedit train-mend` (checked against the model when loaded).",
        default=None)
    hub_private_repo: bool | None = setting("Create pushed repos as private.", default=None)
    hub_token: str | None = setting("Hub token for pushes and private artifacts (default: the logged-in token).",
                                  default=None)

    nullspace_threshold: float | None = setting(
        "Null-space threshold τ. Mode 'absolute' (reference): eigenvalues of the mean key second moment below τ. "
        "'relative': below τ·λ_max. 'energy': the smallest eigenvalues whose sum is at most τ of the trace.",
        default=None, low=0)
    nullspace_threshold_mode: str = setting("'absolute' (reference), 'relative' or 'energy'.", default="absolute")
    l2: float | None = setting("AlphaEdit ridge coefficient λ₂ (the reference's L2).", default=None, low=0,
                               low_open=True)
    mom2_update_weight: float | None = setting("MEMIT weight λ of the preserved-key second moment.", default=None,
                                               low=0, low_open=True)

    fact_token: str = setting("Token where facts are looked up: subject_last | subject_first_after_last | last.",
                            default="subject_last")
    v_lr: float | None = setting(
        "Adam step size of the target optimisation. Default ('auto' preset): v_lr_rms_factor × the RMS of "
        "each request's hidden state at the last edited layer.", default=None, low=0, low_open=True)
    v_lr_rms_factor: float = setting("Step size relative to the hidden-state RMS when v_lr is not set.",
                                   default=AUTO_V_LR_RMS_FACTOR, low=0, low_open=True)
    v_num_grad_steps: int | None = setting("Maximum number of target-optimisation iterations.", default=None, low=1)
    v_loss_layer: int | None = setting("Layer whose output the target loss reads. Default: the last layer.",
                                     default=None, low=0)
    v_weight_decay: float | None = setting("Norm penalty weight on the optimised delta.", default=None, low=0)
    clamp_norm_factor: float | None = setting(
        "The delta is clamped to this fraction of the hidden-state norm (the locality lever: every delta ends on "
        "the clamp). Default: 0.5 for AlphaEdit under preset 'auto' (calibrated for sequential editing), else the "
        "reference's 0.75.", default=None, low=0, low_open=True)
    kl_factor: float | None = setting("Weight of the KL term that keeps the subject's essence.", default=None, low=0)
    v_early_stop_loss: float = setting("A request stops optimising once its total loss is below this.",
                                     default=5e-2, low=0)
    target_batch_tokens: int = setting(
        "Token budget of one target-optimisation micro-batch (requests are independent, so results do not "
        "depend on it; lower it if memory runs out).", default=8192, low=1)
    target_memory_budget: str | None = setting(
        "Memory one target-optimisation micro-batch may hold until its backward pass: a size ('2GiB', '800MB'), "
        "'auto' (half the memory free on the model's device when a batch starts) or 'none' (target_batch_tokens "
        "alone). Micro-batches are sized from the bytes a probe step keeps per token; a request that does not fit "
        "alone is optimised with activation checkpointing.", default="auto")
    context_template_length: int = setting("Token length of each generated context template.", default=10, low=1,
                                           high=MAX_CONTEXT_TEMPLATE_LENGTH)
    context_template_count: int = setting("Number of generated context templates (one per seed word, up to 5).",
                                        default=5, low=0, high=len(CONTEXT_SEED_WORDS))
    context_template_special_tokens: bool = setting(
        "Keep special tokens when decoding the generated context templates, as the reference code does "
        "(ALGORITHMS.md §3.1 quirk): for Llama-3 every template then starts with the text '<|begin_of_text|>', "
        "which encodes as a second BOS after the tokenizer's own. Default: skipped (EasyEdit's behaviour).",
        default=False)

    layer_module_tmp: str | None = setting("Override: block module path with '{}' for the layer index.",
                                         default=None)
    rewrite_module_tmp: str | None = setting("Override: edited module path with '{}' for the layer index.",
                                           default=None)
    final_norm: str | None = setting("Override: final norm module path applied before the LM head.", default=None)
    disable_tqdm: bool = setting("Hide progress bars.", default=False)

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.layers is not None:
            if isinstance(self.layers, (int, str)):
                self.layers = [self.layers]
            self.layers = [coerce_number("EditingArguments.layers", x, int) for x in self.layers]
            if not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
                raise ValueError(f"EditingArguments.layers={self.layers!r}: give distinct non-negative layer indices.")
            self.layers = sorted(self.layers)
        self.method = str(getattr(self.method, "value", self.method)).lower()
        _check_choice("preset", self.preset, PRESETS)
        _check_choice("fact_token", self.fact_token, FACT_TOKENS)
        _check_choice("nullspace_threshold_mode", self.nullspace_threshold_mode, THRESHOLD_MODES)
        for name in ("target_memory_budget", "statistics_memory_budget"):
            budget = parse_memory_budget(f"EditingArguments.{name}", getattr(self, name))
            setattr(self, name, None if budget is None else str(budget))
        if isinstance(self.prune_alpha, (int, float)):  # YAML / parse_dict give numbers as numbers
            self.prune_alpha = "e" if self.prune_alpha == math.e else f"{self.prune_alpha:g}"
        _check_choice("prune_alpha", self.prune_alpha, PRUNE_ALPHAS)
        _check_choice("prune_restrain_at", self.prune_restrain_at, PRUNE_RESTRAIN_AT)
        self.resume_from_checkpoint = _resume_value(self.resume_from_checkpoint)
        if self.resume_from_checkpoint == "true" and self.overwrite_output_dir:
            raise ValueError("EditingArguments: resume_from_checkpoint='true' continues the run in output_dir and "
                             "overwrite_output_dir=True would replace it; pass one of them.")
        if self.nullspace_threshold_mode != "absolute" and (self.nullspace_threshold or 0) >= 1:
            raise ValueError(f"EditingArguments.nullspace_threshold={self.nullspace_threshold}: in mode "
                             f"'{self.nullspace_threshold_mode}' it is a fraction and must be below 1.")
        support = projection_support(get_method_classes(self.method)[1])
        if support == "inherent" and self.use_projection is False:
            raise ValueError(f"EditingArguments.use_projection=False: method {self.method!r} solves in the null "
                             "space by construction, so the projection cannot be turned off; for an unprojected "
                             "baseline use method='memit' (with MemitConfig(protect_previous_edits=True) for "
                             "sequential editing, i.e. MEMIT_seq).")
        if support == "unsupported" and self.use_projection:
            raise ValueError(f"EditingArguments.use_projection=True: method {self.method!r} does not apply its "
                             "updates as key-space deltas of the edited projections, so they cannot be projected; "
                             "leave use_projection unset.")
        if self.norm_anchor and not self.norm_anchor_records:
            raise ValueError("EditingArguments.norm_anchor=True needs norm_anchor_records: the CounterFact-style "
                             "records (a .json/.jsonl file or a Hub dataset name) whose targets set the anchor norm; "
                             "give training records, not the ones you evaluate on.")
        if self.norm_anchor and not supports_target_rescaling(get_method_classes(self.method)[1]):
            raise ValueError(f"EditingArguments.norm_anchor=True: method {self.method!r} has its own target "
                             "procedure, so NAS cannot rescale its targets; use a locate-then-edit method (alphaedit, "
                             "memit, nse) or leave norm_anchor off.")

    def resolve(self, spec: ModelSpec, method_config: Any = None) -> ResolvedHyperparameters:
        """Every unset hyperparameter filled for the model described by `spec` (`hparams.resolve_hyperparameters`;
        `method_config` lets a method with its own default layers, such as ROME or FT, pick them)."""
        return resolve_hyperparameters(self, spec, get_method_classes(self.method)[1], method_config)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; Hub tokens (fields named `token` or ending in `hub_token`) are masked."""
        return {f.name: ("<HUB_TOKEN>" if _is_secret(f.name) and getattr(self, f.name) else getattr(self, f.name))
                for f in dataclasses.fields(self)}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_json_string() + "\n")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EditingArguments:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"EditingArguments: unknown field(s) {unknown}; known fields are {sorted(known)}.")
        return cls(**values)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> EditingArguments:
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    @classmethod
    def from_published(cls, values: Mapping[str, Any],
                       hyperparameters: Mapping[str, Any] | None = None) -> EditingArguments:
        """The settings of published edits (an `editing_config.json` from a folder or Hub repo: untrusted), as
        settings for the loader's own run.

        Only what determines the edits is kept, and a setting the publisher left unset takes the value their run
        resolved it to (`hyperparameters`, the config's resolved hyperparameters), not this version's default:
        editing continues as the published edits were made even where a default changed since. Settings that act
        outside the run (`SIDE_EFFECT_FIELDS`: pushes, Hub ids and tokens, output and cache folders) get this
        package's defaults, and data sources (`SOURCE_FIELDS`) that are not a Hub name get theirs too, so a publisher
        can neither make the loader push (with the loader's token) nor read or write files of the loader's choosing.
        Dropped settings are logged; fields this version does not know are ignored with a warning.
        """
        known = {f.name: f for f in dataclasses.fields(cls)}
        kept, dropped = {}, []
        for name, value in values.items():
            if name not in known:
                dropped.append(name)
            elif name in SIDE_EFFECT_FIELDS or (name in SOURCE_FIELDS and not _is_hub_source(name, value)):
                if value != known[name].default:
                    dropped.append(name)
            else:
                kept[name] = value
        for name, value in (hyperparameters or {}).items():
            if name in known and kept.get(name) is None and value is not None and name not in SIDE_EFFECT_FIELDS \
                    and name not in SOURCE_FIELDS:
                kept[name] = value
        if kept.get("norm_anchor") and "norm_anchor_records" not in kept:
            # NAS cannot run without the records, and the publisher's were a path on their machine.
            del kept["norm_anchor"]
            dropped.append("norm_anchor")
        if dropped:
            logger.warning("published edits: ignoring their settings %s (they would act on this machine or are "
                           "unknown to this version); pass editing_args to choose them", sorted(dropped))
        return cls(**kept)


def _is_hub_source(name: str, value: Any) -> bool:
    """Whether `value` of source field `name` is a keyword or a Hub name rather than a path on this machine."""
    if not isinstance(value, str):
        return False
    if value in _SOURCE_KEYWORDS.get(name, ()):
        return True
    return bool(_HUB_ID.fullmatch(value)) and not Path(value).expanduser().exists()


def _is_secret(name: str) -> bool:
    return name == "token" or name.endswith("hub_token")


def _resume_value(value: Any) -> str | None:
    """`resume_from_checkpoint` normalised: `"true"` (the latest checkpoint), a path, or None (YAML gives bools)."""
    if value is None or value is False or str(value).strip().lower() in ("", "false"):
        return None
    if value is True or str(value).strip().lower() == "true":
        return "true"
    return str(value)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"EditingArguments.{name}={value!r}: choose one of {list(choices)}.")
