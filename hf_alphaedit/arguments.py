"""`EditingArguments`: every setting of an editing run, Trainer-style.

The dataclass works with `transformers.HfArgumentParser` (each field is a `--flag`) and saves / loads as
JSON. Hyperparameters left at `None` are resolved against the loaded model by `resolve()`, either from the
reference files of the official AlphaEdit code (`preset="reference"`) or from rules that adapt to the model
(`preset="auto"`, the default).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .architectures import ModelSpec

FACT_TOKENS = ("subject_last", "subject_first_after_last", "last")
THRESHOLD_MODES = ("absolute", "relative", "energy")
PRESETS = ("auto", "reference")
PRUNE_ALPHAS = ("e", "2", "1.5", "1.2", "linear")
PRUNE_RESTRAIN_AT = ("end", "every_batch")


@dataclass(frozen=True)
class _ReferenceFile:
    """One hyperparameter file of the official AlphaEdit repository (ALGORITHMS.md §11.1–11.2)."""

    num_layers: int
    layers: tuple[int, ...]
    v_num_grad_steps: int
    v_lr: float
    mom2_update_weight: float
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    nullspace_threshold: float = 2e-2
    l2: float = 10.0


REFERENCE_FILES: dict[str, _ReferenceFile] = {
    "gpt2-xl": _ReferenceFile(48, (13, 14, 15, 16, 17), 20, 0.5, 20000.0),
    "gpt-j-6b": _ReferenceFile(28, (3, 4, 5, 6, 7, 8), 25, 0.5, 15000.0),
    "llama3-8b": _ReferenceFile(32, (4, 5, 6, 7, 8), 25, 0.1, 15000.0),
}
# Which reference file a model family inherits when `preset="reference"`: GPT-2 style LayerNorm models take the
# GPT-2 XL file, GPT-J takes its own, every pre-norm gated-MLP decoder takes Llama-3-8B's.
_FAMILY_REFERENCE = {"gpt2": "gpt2-xl", "gptj": "gpt-j-6b", "gpt_neox": "gpt2-xl", "opt": "gpt2-xl", "falcon": "gpt2-xl"}

AUTO_V_NUM_GRAD_STEPS = 60
AUTO_V_LR_RMS_FACTOR = 1.0


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class EditingArguments:
    """Settings of a sequential editing run.

    Fields left at `None` are filled in by `resolve(spec)` for the loaded model; see `preset`.
    """

    method: str = _help("Editing method: a registered name (hf_alphaedit.list_methods()), e.g. 'alphaedit' "
                        "(null-space projected) or 'memit' (unprojected baseline).", default="alphaedit")
    use_projection: bool | None = _help(
        "Project every update onto the null space of preserved keys (ALGORITHMS.md §2.5): ΔW ← ΔW·P. Default: on "
        "for methods that solve in the null space (alphaedit, where it cannot be turned off), off otherwise; "
        "true adds it to methods whose updates are factored key-space deltas (memit, rome, ft, plugins).",
        default=None)
    prune: bool = _help(
        "Add the PRUNE restraint (ALGORITHMS.md §7) to the method: singular values of the accumulated "
        "perturbation of each edited matrix above the largest singular value σ_max of its original weight are "
        "shrunk to σ_max + log_α(σ/σ_max).", default=False)
    prune_alpha: str = _help("PRUNE restraint function: log base 'e' (reference default), '2', '1.5', '1.2' "
                             "(smaller is weaker), or 'linear' (σ/2 + σ_max/2).", default="e")
    prune_restrain_at: str = _help(
        "'end' (reference): the weights always hold the restraint of the whole perturbation, but every batch is "
        "computed on the unrestrained weights, as if the restraint were applied once after the last edit; "
        "'every_batch': the restrained weights are what the next batch edits.", default="end")
    prune_clip: bool = _help(
        "Use min(F(σ), σ) (a deviation from the reference). The log restraint enlarges singular values just "
        "above σ_max when σ_max < 1/ln α; without this flag that case is refused.", default=False)
    preset: str = _help(
        "How unset hyperparameters are chosen: 'auto' adapts them to the model (step size scaled to the "
        "hidden-state RMS, optimisation until the target is reached, up to a cap); 'reference' reproduces the "
        "official AlphaEdit files (GPT-2 XL, GPT-J, Llama-3-8B; other families inherit the closest one).",
        default="auto")
    layers: list[int] | None = _help("Edited layers (0-based). Default: chosen by relative depth.", default=None)
    batch_size: int = _help("Edits per batch in sequential editing.", default=100)
    seed: int = _help("Seed for context-template sampling and anything else random.", default=0)
    output_dir: str | None = _help("Where edited checkpoints, logs and run state are written.", default=None)
    save_steps: int | None = _help(
        "Write a checkpoint of the sequential run into output_dir every this many batches (atomically: a run "
        "killed at any moment resumes from the last one). Default: no checkpoints.", default=None)
    resume_from_checkpoint: str | None = _help(
        "Continue a sequential run from a checkpoint folder, or 'true' for the latest checkpoint in output_dir.",
        default=None)
    overwrite_output_dir: bool = _help(
        "Let a run write into an output_dir that holds a different run (its checkpoints and edited model are "
        "replaced).", default=False)

    statistics_corpus: str = _help(
        "Corpus for key statistics: a Hub dataset name ('name' or 'name:config') or a local .txt/.json/.jsonl "
        "file or folder of them.", default="Salesforce/wikitext:wikitext-103-raw-v1")
    statistics_samples: int = _help("Number of corpus samples (documents or lines) for key statistics.",
                                    default=100000)
    statistics_max_length: int | None = _help(
        "Truncate each sample to this many tokens. Default: the model's context length, capped at 4096.",
        default=None)
    statistics_batch_tokens: int = _help("Token budget (padded) of one statistics forward batch.", default=8192)
    statistics_cache_dir: str | None = _help(
        "Where collected statistics are cached. Default: $HF_ALPHAEDIT_CACHE/statistics or "
        "~/.cache/hf_alphaedit/statistics.", default=None)
    projection: str = _help(
        "Where key statistics and the null-space projector come from: 'auto' (use the Hub artifact "
        "<$HF_ALPHAEDIT_NAMESPACE or hf-alphaedit>/<model name>-key-statistics when it exists and fits the model, "
        "else compute from statistics_corpus and cache locally), 'compute' (never look on the Hub), a Hub repo "
        "id, or a local artifact folder.", default="auto")
    projection_revision: str | None = _help("Revision (branch, tag or commit) of a Hub projection artifact.",
                                            default=None)
    push_projection_to_hub: bool = _help(
        "Upload statistics and projector computed in this run to projection_hub_repo_id (default: "
        "<your namespace>/<model name>-key-statistics).", default=False)
    projection_hub_repo_id: str | None = _help("Hub repo the computed projection artifact is pushed to.",
                                               default=None)
    hub_private_repo: bool | None = _help("Create pushed repos as private.", default=None)
    hub_token: str | None = _help("Hub token for pushes and private artifacts (default: the logged-in token).",
                                  default=None)

    nullspace_threshold: float | None = _help(
        "Null-space threshold τ. Mode 'absolute' (reference): eigenvalues of the mean key second moment below τ. "
        "'relative': below τ·λ_max. 'energy': the smallest eigenvalues whose sum is at most τ of the trace.",
        default=None)
    nullspace_threshold_mode: str = _help("'absolute' (reference), 'relative' or 'energy'.", default="absolute")
    l2: float | None = _help("AlphaEdit ridge coefficient λ₂ (the reference's L2).", default=None)
    mom2_update_weight: float | None = _help("MEMIT weight λ of the preserved-key second moment.", default=None)

    fact_token: str = _help("Token where facts are looked up: subject_last | subject_first_after_last | last.",
                            default="subject_last")
    v_lr: float | None = _help(
        "Adam step size of the target optimisation. Default ('auto' preset): v_lr_rms_factor × the RMS of "
        "each request's hidden state at the last edited layer.", default=None)
    v_lr_rms_factor: float = _help("Step size relative to the hidden-state RMS when v_lr is not set.",
                                   default=AUTO_V_LR_RMS_FACTOR)
    v_num_grad_steps: int | None = _help("Maximum number of target-optimisation iterations.", default=None)
    v_loss_layer: int | None = _help("Layer whose output the target loss reads. Default: the last layer.",
                                     default=None)
    v_weight_decay: float | None = _help("Norm penalty weight on the optimised delta.", default=None)
    clamp_norm_factor: float | None = _help("The delta is clamped to this fraction of the hidden-state norm.",
                                            default=None)
    kl_factor: float | None = _help("Weight of the KL term that keeps the subject's essence.", default=None)
    v_early_stop_loss: float = _help("A request stops optimising once its total loss is below this.",
                                     default=5e-2)
    target_batch_tokens: int = _help(
        "Token budget of one target-optimisation micro-batch (requests are independent, so results do not "
        "depend on it; lower it if memory runs out).", default=8192)
    context_template_length: int = _help("Token length of each generated context template.", default=10)
    context_template_count: int = _help("Number of generated context templates (one per seed word, up to 5).",
                                        default=5)

    layer_module_tmp: str | None = _help("Override: block module path with '{}' for the layer index.",
                                         default=None)
    rewrite_module_tmp: str | None = _help("Override: edited module path with '{}' for the layer index.",
                                           default=None)
    final_norm: str | None = _help("Override: final norm module path applied before the LM head.", default=None)
    disable_tqdm: bool = _help("Hide progress bars.", default=False)

    def __post_init__(self) -> None:
        # HfArgumentParser.parse_dict / JSON / YAML do no type conversion ('1e-4' stays a string).
        # (Field kinds come from the resolved type hints: HfArgumentParser rewrites `Field.type` in place.)
        coerce_scalar_fields(self)
        if self.layers is not None:
            if isinstance(self.layers, (int, str)):
                self.layers = [self.layers]
            self.layers = [_coerce("EditingArguments.layers", x, int) for x in self.layers]
            if not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
                raise ValueError(f"EditingArguments.layers={self.layers!r}: give distinct non-negative layer indices.")
            self.layers = sorted(self.layers)
        self.method = str(getattr(self.method, "value", self.method)).lower()
        _check_choice("preset", self.preset, PRESETS)
        _check_choice("fact_token", self.fact_token, FACT_TOKENS)
        _check_choice("nullspace_threshold_mode", self.nullspace_threshold_mode, THRESHOLD_MODES)
        if isinstance(self.prune_alpha, (int, float)):  # YAML / parse_dict give numbers as numbers
            self.prune_alpha = "e" if self.prune_alpha == math.e else f"{self.prune_alpha:g}"
        _check_choice("prune_alpha", self.prune_alpha, PRUNE_ALPHAS)
        _check_choice("prune_restrain_at", self.prune_restrain_at, PRUNE_RESTRAIN_AT)
        if self.save_steps is not None and self.save_steps < 1:
            raise ValueError(f"EditingArguments.save_steps={self.save_steps}: must be at least 1 (or unset for no "
                             "checkpoints).")
        self.resume_from_checkpoint = _resume_value(self.resume_from_checkpoint)
        if self.resume_from_checkpoint == "true" and self.overwrite_output_dir:
            raise ValueError("EditingArguments: resume_from_checkpoint='true' continues the run in output_dir and "
                             "overwrite_output_dir=True would replace it; pass one of them.")
        for name in ("batch_size", "statistics_samples", "statistics_batch_tokens", "target_batch_tokens",
                     "context_template_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"EditingArguments.{name}={getattr(self, name)}: must be at least 1.")
        if not 0 <= self.context_template_count <= len(CONTEXT_SEED_WORDS):
            raise ValueError(f"EditingArguments.context_template_count={self.context_template_count}: "
                             f"must be between 0 and {len(CONTEXT_SEED_WORDS)}.")
        for name in ("v_lr", "v_lr_rms_factor", "l2", "mom2_update_weight", "clamp_norm_factor"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"EditingArguments.{name}={value}: must be a positive finite number.")
        if self.nullspace_threshold is not None and not self.nullspace_threshold >= 0:
            raise ValueError(f"EditingArguments.nullspace_threshold={self.nullspace_threshold}: must be >= 0.")
        if self.nullspace_threshold_mode != "absolute" and (self.nullspace_threshold or 0) >= 1:
            raise ValueError(f"EditingArguments.nullspace_threshold={self.nullspace_threshold}: in mode "
                             f"'{self.nullspace_threshold_mode}' it is a fraction and must be below 1.")
        from .methods import get_method_classes, projection_support  # late import: methods import this module

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

    def resolve(self, spec: ModelSpec, method_config: Any = None) -> ResolvedHyperparameters:
        """Fill every unset hyperparameter for the model described by `spec`.

        Unset `layers` are the MEMIT/AlphaEdit layers (the reference file's, or by relative depth); a method
        class with a `default_layers(spec, locate_then_edit_layers, config)` hook (ROME, FT) picks its own from
        them, given its `method_config`.
        """
        from .methods import get_method_classes  # late import: methods import this module

        ref = REFERENCE_FILES[_FAMILY_REFERENCE.get(spec.model_type, "llama3-8b")]
        reference = self.preset == "reference"
        if self.layers is not None:
            layers = tuple(self.layers)
        else:
            layers = ref.layers if reference and spec.num_layers == ref.num_layers else tuple(spec.default_layers())
            method_layers = getattr(get_method_classes(self.method)[1], "default_layers", None)
            if method_layers is not None:
                layers = tuple(method_layers(spec, layers, method_config))
        if layers[-1] >= spec.num_layers:
            raise ValueError(f"EditingArguments.layers={list(layers)}: the model has only {spec.num_layers} "
                             f"layers (0..{spec.num_layers - 1}).")
        v_loss_layer = spec.num_layers - 1 if self.v_loss_layer is None else self.v_loss_layer
        if not layers[-1] <= v_loss_layer < spec.num_layers:
            raise ValueError(f"EditingArguments.v_loss_layer={v_loss_layer}: must lie between the last edited "
                             f"layer ({layers[-1]}) and the last layer ({spec.num_layers - 1}).")
        if v_loss_layer != spec.num_layers - 1:
            raise NotImplementedError("EditingArguments.v_loss_layer: only the last layer is supported "
                                      "(every reference file uses it); leave it unset.")

        def pick(name: str, auto_value: Any) -> Any:
            value = getattr(self, name)
            if value is not None:
                return value
            return getattr(ref, name) if reference else auto_value

        v_lr = self.v_lr if self.v_lr is not None else (ref.v_lr if reference else None)
        return ResolvedHyperparameters(
            layers=layers,
            fact_token=self.fact_token,
            v_lr=v_lr,
            v_lr_rms_factor=self.v_lr_rms_factor,
            v_num_grad_steps=pick("v_num_grad_steps", AUTO_V_NUM_GRAD_STEPS),
            v_weight_decay=pick("v_weight_decay", ref.v_weight_decay),
            clamp_norm_factor=pick("clamp_norm_factor", ref.clamp_norm_factor),
            kl_factor=pick("kl_factor", ref.kl_factor),
            v_early_stop_loss=self.v_early_stop_loss,
            nullspace_threshold=pick("nullspace_threshold", ref.nullspace_threshold),
            nullspace_threshold_mode=self.nullspace_threshold_mode,
            l2=pick("l2", ref.l2),
            mom2_update_weight=pick("mom2_update_weight", ref.mom2_update_weight),
            context_template_length=self.context_template_length,
            context_template_count=self.context_template_count,
            use_projection=self._projection_on(),
        )

    def _projection_on(self) -> bool:
        """`use_projection` with its default filled in: on exactly for methods that solve in the null space."""
        from .methods import get_method_classes, projection_support

        return projection_support(get_method_classes(self.method)[1]) == "inherent" or bool(self.use_projection)

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


CONTEXT_SEED_WORDS = ("The", "Therefore", "Because", "I", "You")


@dataclass(frozen=True)
class ResolvedHyperparameters:
    """Concrete hyperparameters of a run on one model (nothing left unset except an automatic `v_lr`)."""

    layers: tuple[int, ...]
    fact_token: str
    v_lr: float | None
    v_lr_rms_factor: float
    v_num_grad_steps: int
    v_weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    v_early_stop_loss: float
    nullspace_threshold: float
    nullspace_threshold_mode: Literal["absolute", "relative", "energy"]
    l2: float
    mom2_update_weight: float
    context_template_length: int
    context_template_count: int
    use_projection: bool = False  # True: updates are (or are made) null-space projected

    @property
    def z_layer(self) -> int:
        return self.layers[-1]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def coerce_scalar_fields(instance: Any) -> None:
    """Convert the values of a dataclass's `float` / `int` / `bool` fields (optional or not) to those types in place.

    `HfArgumentParser.parse_dict` and JSON / YAML files do no type conversion ('1e-4' stays a string); errors
    name the field as `ClassName.field`.
    """
    owner = type(instance).__name__
    for name, kind in _scalar_field_kinds(type(instance)).items():
        value = getattr(instance, name)
        if value is not None:
            qualified = f"{owner}.{name}"
            setattr(instance, name, _coerce_bool(qualified, value) if kind is bool else _coerce(qualified, value, kind))


@functools.cache
def _scalar_field_kinds(cls: type) -> dict[str, type]:
    """`{field name: float | int | bool}` for the scalar fields of the dataclass `cls` (optional or not)."""
    kinds = {}
    field_names = {f.name for f in dataclasses.fields(cls)}
    for name, hint in typing.get_type_hints(cls).items():
        if name not in field_names:  # ClassVars
            continue
        is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        options = set(typing.get_args(hint)) - {type(None)} if is_union else {hint}
        if len(options) == 1 and (kind := options.pop()) in (float, int, bool):
            kinds[name] = kind
    return kinds


def _is_secret(name: str) -> bool:
    return name == "token" or name.endswith("hub_token")


def _coerce(name: str, value: Any, kind: type) -> Any:
    if isinstance(value, kind) and not isinstance(value, bool):
        return value
    try:
        converted = kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: expected a {kind.__name__}.") from None
    if kind is int and float(value) != converted:
        raise ValueError(f"{name}={value!r}: expected an integer.")
    return converted


def _coerce_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"{name}={value!r}: expected true or false.")


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
