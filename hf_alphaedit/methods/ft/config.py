"""`FTConfig`: the constrained fine-tuning baseline's settings (ALGORITHMS.md §6.2, §11.4).

FT trains the edited MLP output projection of every layer in `EditingArguments.layers`; unset, one layer as in the
reference files (`FineTune.default_layers`): layer 0 with the L∞ box (GPT-2 XL's constrained file), `round(0.66·N)`
with `norm_constraint=None` (Llama-3-8B: 21).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...fields import setting
from ...registry import MethodConfig

OBJECTIVES = ("prompt_last", "target_new")


@dataclass
class FTConfig(MethodConfig):
    """Settings of constrained fine-tuning."""

    objective: Literal["prompt_last", "target_new"] = field(default="prompt_last", metadata={"help": (
        "'prompt_last' (reference): every target token is scored against the next-token distribution at the "
        "last prompt token. 'target_new' (EasyEdit): teacher-forced NLL of the target tokens after the prompt.")})
    lr: float = setting("Adam learning rate.", default=5e-4, low=0, low_open=True)
    num_steps: int = setting("Maximum number of epochs over the batch's requests.", default=25, low=1)
    weight_decay: float = setting("Adam (L2) weight decay on the trained weights, as torch.optim.Adam applies it "
                                  "(0 in every reference file).", default=0.0, low=0)
    norm_constraint: float | None = setting(
        "L∞ box: after every chunk each trained weight entry is clamped to within this distance of its value "
        "before the batch. None: unconstrained fine-tuning.", default=5e-4, low=0, low_open=True)
    chunk_size: int = setting("Requests per optimisation step (the reference's batch_size).", default=64, low=1)
    early_stop_loss: float = setting(
        "A chunk whose loss is below this takes no step, and training stops once an epoch's mean loss is below "
        "it.", default=1e-2, low=0, low_open=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise ValueError(f"FTConfig.objective={self.objective!r}: choose one of {list(OBJECTIVES)}.")
