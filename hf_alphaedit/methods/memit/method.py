from __future__ import annotations

import torch

from ...updates import BatchUpdate
from ..base import EditContext
from ..locate_then_edit import LocateThenEditMethod
from .config import MemitConfig


class Memit(LocateThenEditMethod):
    """MEMIT: `ΔW = R · (A⁻¹K)ᵀ` with `A = λ C₀ + K Kᵀ` `[d_k, d_k]`, solved in float64 (§5.2).

    With `MemitConfig(protect_previous_edits=True)` the keys of earlier batches join the system,
    `A = λ C₀ + C_p + K Kᵀ` (MEMIT_seq, §5.3); `C_p` is folded into `preserved` after each batch.
    """

    title = "MEMIT"
    paper = 'Meng et al., "Mass-Editing Memory in a Transformer", ICLR 2023, arXiv:2210.07229'

    def __init__(self, context: EditContext, config: MemitConfig | None = None) -> None:
        super().__init__(context, config if config is not None else MemitConfig())
        layers = context.hparams.layers
        statistics = context.statistics(layers)
        device = next(context.model.parameters()).device
        weight = context.hparams.mom2_update_weight
        # λ C₀ (+ C_p): the part of the normal equations that does not depend on the current batch.
        self.preserved = {layer: weight * statistics.second_moment(layer).to(device, torch.float64)
                          for layer in layers}

    @property
    def sequential_state(self) -> tuple[str, ...]:
        return ("preserved",) if self.config.protect_previous_edits else ()

    def solve(self, layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        keys64 = keys.T.double()  # [d_k, n]
        system = self.preserved[layer] + keys64 @ keys64.T
        factors, pivots = torch.linalg.lu_factor(system)  # what linalg.solve does, kept for the condition estimate
        self.note_condition(layer, system, lambda vectors: torch.linalg.lu_solve(factors, pivots, vectors))
        return torch.linalg.lu_solve(factors, pivots, keys64).T

    def commit(self, update: BatchUpdate) -> None:
        if not self.config.protect_previous_edits:
            return
        for layer_update in update.layers:
            keys64 = layer_update.keys.to(self.preserved[layer_update.layer])  # [n, d_k]
            self.preserved[layer_update.layer] += keys64.T @ keys64
