"""Hyperparameters resolved for one model: the reference presets and the rules of `preset="auto"`.

`EditingArguments` leaves model-dependent hyperparameters at `None`; `resolve_hyperparameters` fills them for the
loaded model, either from the hyperparameter files of the official AlphaEdit code (`preset="reference"`,
ALGORITHMS.md §11.1–11.2) or from rules that adapt to the model (`preset="auto"`, §11.7).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .architectures import ModelSpec

CONTEXT_SEED_WORDS = ("The", "Therefore", "Because", "I", "You")
AUTO_V_NUM_GRAD_STEPS = 60
AUTO_V_LR_RMS_FACTOR = 1.0
# Context templates are sampled token by token with a full forward per token; longer ones than this are no template.
MAX_CONTEXT_TEMPLATE_LENGTH = 256


@dataclass(frozen=True)
class ReferenceFile:
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


REFERENCE_FILES: dict[str, ReferenceFile] = {
    "gpt2-xl": ReferenceFile(48, (13, 14, 15, 16, 17), 20, 0.5, 20000.0),
    "gpt-j-6b": ReferenceFile(28, (3, 4, 5, 6, 7, 8), 25, 0.5, 15000.0),
    "llama3-8b": ReferenceFile(32, (4, 5, 6, 7, 8), 25, 0.1, 15000.0),
}
# Which reference file a model family inherits when `preset="reference"`: GPT-2 style LayerNorm models take the
# GPT-2 XL file, GPT-J takes its own, every pre-norm gated-MLP decoder takes Llama-3-8B's.
_FAMILY_REFERENCE = {"gpt2": "gpt2-xl", "gptj": "gpt-j-6b", "gpt_neox": "gpt2-xl", "opt": "gpt2-xl", "falcon": "gpt2-xl"}


def reference_file_name(spec: ModelSpec) -> str:
    """Name of the reference hyperparameter file (a key of `REFERENCE_FILES`) the model family of `spec` inherits."""
    return _FAMILY_REFERENCE.get(spec.model_type, "llama3-8b")


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
    mend_editor: str | None = None  # where MEND's trained editor comes from (EditingArguments.mend_editor)
    context_template_special_tokens: bool = False
    # The official file the values came from under preset="reference" ("gpt2-xl", "gpt-j-6b", "llama3-8b"), so
    # methods can take their own reference settings outside these fields (e.g. NSE's absolute error bounds).
    reference_file: str | None = None

    @property
    def z_layer(self) -> int:
        return self.layers[-1]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_hyperparameters(args: Any, spec: ModelSpec, method_cls: type,
                            method_config: Any = None) -> ResolvedHyperparameters:
    """Fill every unset hyperparameter of `args` (an `EditingArguments`) for the model described by `spec`.

    Unset `layers` are the MEMIT/AlphaEdit layers (the reference file's, or by relative depth); a method class
    with a `default_layers(spec, locate_then_edit_layers, config)` hook (ROME, FT) picks its own from them, given
    its `method_config`. `use_projection` is on for methods that solve in the null space (`projection =
    "inherent"`), else as `args.use_projection` says. Under `preset="reference"` a method class with its own
    reference files (ROME, NSE) overrides shared values through `reference_hyperparameters(file name) -> {field:
    value}`; under `preset="auto"` one with calibrated defaults of its own (AlphaEdit's clamp) through
    `auto_hyperparameters(spec) -> {field: value}`.
    """
    ref_name = reference_file_name(spec)
    ref = REFERENCE_FILES[ref_name]
    reference = args.preset == "reference"
    # The method's own values of shared settings under the preset: its reference files' or its calibrated ones.
    hook = getattr(method_cls, "reference_hyperparameters" if reference else "auto_hyperparameters", None)
    overrides = dict(hook(ref_name if reference else spec)) if hook is not None else {}
    if args.layers is not None:
        layers = tuple(args.layers)
    else:
        layers = ref.layers if reference and spec.num_layers == ref.num_layers else tuple(spec.default_layers())
        method_layers = getattr(method_cls, "default_layers", None)
        if method_layers is not None:
            layers = tuple(method_layers(spec, layers, method_config))
    if layers[-1] >= spec.num_layers:
        raise ValueError(f"EditingArguments.layers={list(layers)}: the model has only {spec.num_layers} "
                         f"layers (0..{spec.num_layers - 1}).")
    v_loss_layer = spec.num_layers - 1 if args.v_loss_layer is None else args.v_loss_layer
    if not layers[-1] <= v_loss_layer < spec.num_layers:
        raise ValueError(f"EditingArguments.v_loss_layer={v_loss_layer}: must lie between the last edited "
                         f"layer ({layers[-1]}) and the last layer ({spec.num_layers - 1}).")
    if v_loss_layer != spec.num_layers - 1:
        raise NotImplementedError("EditingArguments.v_loss_layer: only the last layer is supported "
                                  "(every reference file uses it); leave it unset.")

    def pick(name: str, auto_value: Any) -> Any:
        value = getattr(args, name)
        if value is not None:
            return value
        return overrides.get(name, getattr(ref, name) if reference else auto_value)

    return ResolvedHyperparameters(
        layers=layers,
        fact_token=args.fact_token,
        v_lr=pick("v_lr", None),
        v_lr_rms_factor=args.v_lr_rms_factor,
        v_num_grad_steps=pick("v_num_grad_steps", AUTO_V_NUM_GRAD_STEPS),
        v_weight_decay=pick("v_weight_decay", ref.v_weight_decay),
        clamp_norm_factor=pick("clamp_norm_factor", ref.clamp_norm_factor),
        kl_factor=pick("kl_factor", ref.kl_factor),
        v_early_stop_loss=args.v_early_stop_loss,
        nullspace_threshold=pick("nullspace_threshold", ref.nullspace_threshold),
        nullspace_threshold_mode=args.nullspace_threshold_mode,
        l2=pick("l2", ref.l2),
        mom2_update_weight=pick("mom2_update_weight", ref.mom2_update_weight),
        context_template_length=args.context_template_length,
        context_template_count=args.context_template_count,
        use_projection=getattr(method_cls, "projection", "optional") == "inherent" or bool(args.use_projection),
        mend_editor=args.mend_editor,
        context_template_special_tokens=args.context_template_special_tokens,
        reference_file=ref_name if reference else None,
    )
