"""`NSEConfig`: the settings NSE adds to sequential MEMIT (ALGORITHMS.md §9.1).

`mom2_update_weight` and the target-optimisation settings come from `EditingArguments`, as for MEMIT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ...registry import MethodConfig

# [PROPOSAL] Thresholds relative to each request's z-layer hidden-state norm ‖h‖ when no absolute value is given:
# the reference values are absolute hidden-state distances tuned per model (GPT-2 XL 35/150, GPT-J 15/100,
# Llama-3-8B 2.5/50) and do not transfer; the reference α are roughly a fifth of typical ‖h‖ at their z-layers.
DEFAULT_ALPHA_FRACTION = 0.2
DEFAULT_UPPER_BOUND_FRACTION = 2.0
# NSE's own reference files (§9.1), used under `preset="reference"`: absolute (alpha, upper_bound) and the
# preserved-key weight λ (GPT-2 XL's NSE file: 10,000, not the MEMIT file's 20,000).
REFERENCE_ERROR_BOUNDS: dict[str, tuple[float, float]] = {
    "gpt2-xl": (35.0, 150.0), "gpt-j-6b": (15.0, 100.0), "llama3-8b": (2.5, 50.0)}
REFERENCE_MOM2_UPDATE_WEIGHT: dict[str, float] = {"gpt2-xl": 10000.0, "gpt-j-6b": 15000.0, "llama3-8b": 15000.0}


@dataclass
class NSEConfig(MethodConfig):
    """Settings of NSE (neuron-level sequential editing)."""

    alpha: float | None = field(default=None, metadata={"help": (
        "A request is (re-)edited only while its remaining error ‖z − h‖ at the last edited layer is above this "
        "(absolute hidden-state units; reference: GPT-2 XL 35, GPT-J 15, Llama-3-8B 2.5). Default: the reference "
        "file's value under preset='reference', else alpha_fraction × ‖h‖ of each request.")})
    upper_bound: float | None = field(default=None, metadata={"help": (
        "... and below this (reference: GPT-2 XL 150, GPT-J 100, Llama-3-8B 50). Default: the reference file's "
        "value under preset='reference', else upper_bound_fraction × ‖h‖ of each request.")})
    alpha_fraction: float = field(default=DEFAULT_ALPHA_FRACTION, metadata={"help": (
        "alpha relative to the request's hidden-state norm at the last edited layer, when alpha is not set.")})
    upper_bound_fraction: float = field(default=DEFAULT_UPPER_BOUND_FRACTION, metadata={"help": (
        "upper_bound relative to the request's hidden-state norm, when upper_bound is not set.")})
    max_iterations: int = field(default=3, metadata={"help": (
        "Error checks per batch: at most max_iterations − 1 layer passes, each on the requests whose error is "
        "between alpha and upper_bound.")})
    neuron_threshold: float | None = field(default=None, metadata={"help": (
        "Per layer, only the key dimensions with the largest |k| summed over the batch whose cumulative share is "
        "within this fraction are updated (1.0: all). Default: 0.8 for GPT-J, 1.0 otherwise (reference files).")})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("alpha", "upper_bound"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"NSEConfig.{name}={value}: must be a non-negative finite number (or None).")
        for name in ("alpha_fraction", "upper_bound_fraction"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"NSEConfig.{name}={getattr(self, name)}: must be a non-negative finite number.")
        if self.max_iterations < 2:
            raise ValueError(f"NSEConfig.max_iterations={self.max_iterations}: must be at least 2 (the last check "
                             "never edits).")
        if self.neuron_threshold is not None and not 0 < self.neuron_threshold <= 1:
            raise ValueError(f"NSEConfig.neuron_threshold={self.neuron_threshold}: must be in (0, 1].")
