"""`AlphaEditConfig`: the settings that are AlphaEdit's alone.

The hyperparameters that the reference files set per model (`l2`, `nullspace_threshold`, its mode) stay in
`EditingArguments`, where `preset` resolves them for the loaded model; a method config holds the switches of
the algorithm itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...registry import MethodConfig


@dataclass
class AlphaEditConfig(MethodConfig):
    """Settings of AlphaEdit (ALGORITHMS.md §5.4)."""

    protect_previous_edits: bool = field(default=True, metadata={"help": (
        "Keep the keys of earlier batches in the solve (the reference's C_p term), so that later edits do not "
        "overwrite earlier ones. Off: every batch is solved as if it were the first (an ablation).")})
