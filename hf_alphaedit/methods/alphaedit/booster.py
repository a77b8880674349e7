"""AlphaEdit's null-space projection as a booster for methods that do not solve in the null space."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...projection import NullSpaceProjector
from ...updates import LayerUpdate


class NullSpaceBooster:
    """`EditContext.constrain_update` that projects each update onto the null space: `ΔW ← ΔW P`.

    An update `ΔW = L·B` (`L` `[d, n]`, `B` `[n, d_k]`) becomes `L·((B Û) Ûᵀ)` with the null-space basis `Û`
    `[d_k, r]` (`P = Û Ûᵀ`), still rank ≤ n, so `ΔW (I − P) = 0` and preserved keys (`P k₀ ≈ 0`) keep their
    outputs, as with AlphaEdit.

    What "MEMIT + AlphaEdit's projection" (the AlphaEdit paper's boosted baselines, ALGORITHMS.md §14) means
    here: the method's own solution is projected, the method's objective is not re-solved in the null space (that
    re-solve is AlphaEdit itself). The projected update no longer fits `ΔW K = R` exactly; the locate-then-edit
    procedure reads each layer's residual after the layers below were updated, so the upper layers make up part
    of what the projection removed. Earlier edits are protected only if the method protects them (MEMIT_seq).
    """

    def __init__(self, projector: NullSpaceProjector, layers: Sequence[int], device: torch.device) -> None:
        self.projector = projector
        self.bases = null_space_bases(projector, layers, device)

    def __call__(self, update: LayerUpdate) -> LayerUpdate:
        """The update with its right factor `[n, d_k]` replaced by `(right Û) Ûᵀ` (same dtype).

        An update that names another matrix than the rewrite module of its layer (`update.module`, e.g. MEND's
        gate/up projections) passes unchanged: its inputs are the residual stream, not the keys the projector
        describes, so the projector says nothing about them.
        """
        if update.module is not None:
            return update
        basis = self.bases[update.layer]
        projected = (update.right.double() @ basis) @ basis.T
        return LayerUpdate(update.layer, update.left, projected.to(update.right.dtype), update.keys)


def null_space_bases(projector: NullSpaceProjector, layers: Sequence[int],
                     device: torch.device) -> dict[int, torch.Tensor]:
    """`{layer: Û [d_k, r]}` in float64 on `device`; refuses a projector that lacks one of `layers`."""
    missing = sorted(set(layers) - set(projector.layers))
    if missing:
        raise ValueError(f"the null-space projector has no layer(s) {missing}; it covers {projector.layers}.")
    return {layer: projector.bases[layer].to(device, torch.float64) for layer in layers}
