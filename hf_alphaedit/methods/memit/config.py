"""`MemitConfig`: the settings that are MEMIT's alone (`mom2_update_weight` stays in `EditingArguments`,
where `preset` resolves it per model)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...registry import MethodConfig


@dataclass
class MemitConfig(MethodConfig):
    """Settings of MEMIT (ALGORITHMS.md §5.2–5.3)."""

    protect_previous_edits: bool = field(default=False, metadata={"help": (
        "Add the keys of earlier batches to MEMIT's normal equations, A = λ·C_0 + C_p + K·Kᵀ: sequential MEMIT "
        "(MEMIT_seq, §5.3). Off: the reference MEMIT, which ignores earlier edits.")})
