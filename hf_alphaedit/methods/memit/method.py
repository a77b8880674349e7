from __future__ import annotations

from typing import Any

import torch

from ..base import EditContext, LocateThenEditMethod


class Memit(LocateThenEditMethod):
    """MEMIT (reference, no previous-edit term): `ΔW = R · (A⁻¹K)ᵀ` with `A = λ C₀ + K Kᵀ`, solved in float64."""

    def __init__(self, context: EditContext, config: Any = None) -> None:
        super().__init__(context, config)
        layers = context.hparams.layers
        statistics = context.statistics(layers)
        device = next(context.model.parameters()).device
        self.second_moments = {layer: statistics.second_moment(layer).to(device, torch.float64) for layer in layers}

    def solve(self, layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        keys64 = keys.T.double()  # [d_k, n]
        system = self.context.hparams.mom2_update_weight * self.second_moments[layer] + keys64 @ keys64.T
        return torch.linalg.solve(system, keys64).T
