"""`FTConfig`: the constrained fine-tuning baseline's settings (ALGORITHMS.md §6.2, §11.4).

FT trains the edited MLP output projection of every layer in `EditingArguments.layers`; unset, one layer as in the
reference files (`FineTune.default_layers`): layer 0 with the L∞ box (GPT-2 XL's constrained file), `round(0.66·N)`
with `norm_constraint=None` (Llama-3-8B: 21).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..base import MethodConfig

OBJECTIVES = ("prompt_last", "target_new")


@dataclass
class FTConfig(MethodConfig):
    """Settings of constrained fine-tuning."""

    objective: Literal["prompt_last", "target_new"] = field(default="prompt_last", metadata={"help": (
        "'prompt_last' (reference): every target token is scored against the next-token distribution at the "
        "last prompt token. 'target_new' (EasyEdit): teacher-forced NLL of the target tokens after the prompt.")})
    lr: float = field(default=5e-4, metadata={"help": "Adam learning rate."})
    num_steps: int = field(default=25, metadata={"help": "Maximum number of epochs over the batch's requests."})
    weight_decay: float = field(default=0.0, metadata={"help": (
        "Adam (L2) weight decay on the trained weights, as torch.optim.Adam applies it (0 in every reference "
        "file).")})
    norm_constraint: float | None = field(default=5e-4, metadata={"help": (
        "L∞ box: after every chunk each trained weight entry is clamped to within this distance of its value "
        "before the batch. None: unconstrained fine-tuning.")})
    chunk_size: int = field(default=64, metadata={"help": "Requests per optimisation step (the reference's "
                                                          "batch_size)."})
    early_stop_loss: float = field(default=1e-2, metadata={"help": (
        "A chunk whose loss is below this takes no step, and training stops once an epoch's mean loss is below "
        "it.")})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise ValueError(f"FTConfig.objective={self.objective!r}: choose one of {list(OBJECTIVES)}.")
        for name in ("lr", "early_stop_loss"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"FTConfig.{name}={value}: must be a positive finite number.")
        if not self.weight_decay >= 0:
            raise ValueError(f"FTConfig.weight_decay={self.weight_decay}: must be >= 0.")
        if self.norm_constraint is not None and not self.norm_constraint > 0:
            raise ValueError(f"FTConfig.norm_constraint={self.norm_constraint}: give a positive box size, or None "
                             "for unconstrained fine-tuning.")
        for name in ("num_steps", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"FTConfig.{name}={getattr(self, name)}: must be at least 1.")
