"""`RomeConfig`: the settings that are ROME's alone (ALGORITHMS.md §6.1, §3.8, §11.3).

ROME edits every layer of `EditingArguments.layers` in ascending order; unset, it edits one layer, as every
reference file does (`Rome.default_layers`, §11.7: 5 for SmolLM2-135M and Llama-3-8B, 17 for GPT-2 XL). The
target-optimisation settings shared with MEMIT (`v_lr`, `v_num_grad_steps`, `kl_factor`) come from
`EditingArguments` (under `preset="reference"` from ROME's own files, `REFERENCE_TARGET_SETTINGS`); the clamp and
the norm penalty are ROME's own because its δ lives in the MLP-output space, whose scale differs from the
residual stream's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...registry import MethodConfig

KEY_MODES = ("reference", "averaged")
REFERENCE_TEMPLATE_LENGTHS = (5, 10)
# ROME's own reference files (§11.3), which `preset="reference"` uses instead of the AlphaEdit files' target
# settings: Adam step 0.5 everywhere (AlphaEdit's Llama-3-8B file: 0.1) and 20 steps for GPT-J (AlphaEdit's: 25).
REFERENCE_TARGET_SETTINGS: dict[str, dict[str, float]] = {
    "gpt2-xl": {"v_lr": 0.5, "v_num_grad_steps": 20},
    "gpt-j-6b": {"v_lr": 0.5, "v_num_grad_steps": 20},
    "llama3-8b": {"v_lr": 0.5, "v_num_grad_steps": 25},
}


@dataclass
class RomeConfig(MethodConfig):
    """Settings of ROME (rank-one model editing)."""

    key_mode: Literal["reference", "averaged"] = field(default="reference", metadata={"help": (
        "'reference': the direction u comes from the template-averaged key but the update is fitted on the "
        "raw-prompt key (the reference). 'averaged': the averaged key is used in both places (the r-ROME fix, "
        "which avoids model collapse in long sequential runs).")})
    mom2_adjustment: bool | None = field(default=None, metadata={"help": (
        "Direction u = C_0⁻¹ k̄ (whitened by the key second moment of the statistics corpus) instead of k̄. "
        "Default: true for GPT-style models, false for gated-MLP models, as in the reference files.")})
    rome_clamp_norm_factor: float = field(default=4.0, metadata={"help": (
        "The MLP-output delta is clamped to this multiple of the MLP output's norm (4 in the reference files; "
        "3 for GPT-2 medium).")})
    rome_v_weight_decay: float | None = field(default=None, metadata={"help": (
        "Weight of the norm penalty ‖δ‖/‖m_init‖² in ROME's target loss. Default: 1e-3 for gated-MLP models, "
        "0.5 for GPT-style models (§11.3).")})
    rome_template_lengths: list[int] | None = field(default=None, metadata={"help": (
        "Token lengths of ROME's generated context templates. Default: 5 and 10 (the reference).")})
    rome_templates_per_length: int = field(default=10, metadata={"help": (
        "Generated context templates per length (reference: 10, two per seed word).")})
    rome_template_seed: int = field(default=0, metadata={"help": "Seed of ROME's context-template sampling."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.key_mode not in KEY_MODES:
            raise ValueError(f"RomeConfig.key_mode={self.key_mode!r}: choose one of {list(KEY_MODES)}.")
        if not self.rome_clamp_norm_factor > 0:
            raise ValueError(f"RomeConfig.rome_clamp_norm_factor={self.rome_clamp_norm_factor}: must be positive.")
        if self.rome_v_weight_decay is not None and not self.rome_v_weight_decay >= 0:
            raise ValueError(f"RomeConfig.rome_v_weight_decay={self.rome_v_weight_decay}: must be >= 0.")
        lengths = REFERENCE_TEMPLATE_LENGTHS if self.rome_template_lengths is None else self.rome_template_lengths
        self.rome_template_lengths = [int(length) for length in lengths]
        if not self.rome_template_lengths or min(self.rome_template_lengths) < 2:
            raise ValueError(f"RomeConfig.rome_template_lengths={self.rome_template_lengths}: give one or more "
                             "token lengths of at least 2.")
        if self.rome_templates_per_length < 1:
            raise ValueError(f"RomeConfig.rome_templates_per_length={self.rome_templates_per_length}: must be at "
                             "least 1.")
