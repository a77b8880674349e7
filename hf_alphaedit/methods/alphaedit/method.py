from __future__ import annotations

from typing import Any

import torch

from ...projection import NullSpaceProjector
from ..base import BatchUpdate, EditContext, LocateThenEditMethod


class AlphaEdit(LocateThenEditMethod):
    """AlphaEdit with the exact reduced solve of ALGORITHMS.md §5.4.

    The reference solves `M X = P K Rᵀ` with `M = P (K Kᵀ + C_p) + λ₂ I` (`[d_k, d_k]`, non-symmetric, `d`
    right-hand sides) and adds `ΔW = Xᵀ`. With the null-space basis `Û` `[d_k, r]` (`P = Û Ûᵀ`) and the
    previous-edit keys kept in reduced form `G = Ûᵀ C_p Û` `[r, r]`, the same update is `ΔW = R · B` with
    `B = (Û (G + ÛᵀK KᵀÛ + λ₂ I)⁻¹ ÛᵀK)ᵀ`: an `r × r` symmetric positive-definite system, solved by Cholesky
    in float64 with `n` right-hand sides. `R` is `[d, n]`, `K` is `[d_k, n]` (columns are requests).
    """

    def __init__(self, context: EditContext, config: Any = None,
                 projector: NullSpaceProjector | None = None) -> None:
        super().__init__(context, config)
        hp = context.hparams
        if projector is None:
            projector = context.projector(hp.layers)
        missing = sorted(set(hp.layers) - set(projector.layers))
        if missing:
            raise ValueError(f"the null-space projector has no layer(s) {missing}; it covers {projector.layers}.")
        self.projector = projector
        device = next(context.model.parameters()).device
        self.bases = {layer: projector.bases[layer].to(device, torch.float64) for layer in hp.layers}
        self.previous_gram = {layer: torch.zeros(b.shape[1], b.shape[1], dtype=torch.float64, device=device)
                              for layer, b in self.bases.items()}

    def solve(self, layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        basis = self.bases[layer]
        projected_keys = basis.T @ keys.T.double()  # Ûᵀ K, [r, n]
        system = self.previous_gram[layer] + projected_keys @ projected_keys.T
        system.diagonal().add_(self.context.hparams.l2)
        factor = torch.linalg.cholesky(system)
        solution = torch.cholesky_solve(projected_keys, factor)  # [r, n]
        return (basis @ solution).T

    def commit(self, update: BatchUpdate) -> None:
        for layer_update in update.layers:
            projected = self.bases[layer_update.layer].T @ layer_update.keys.T.double()
            self.previous_gram[layer_update.layer] += projected @ projected.T
