"""Read-only measurements of an edited model's state, for dashboards and the Space demo.

`null_space_room`: how much of each edited layer's null space the applied edits already span. AlphaEdit writes
every update into the null space `Û` `[d_k, r]` of the preserved keys, and the previous edits' keys take part in
each later solve, so every linearly independent edit key (projected into that null space) uses up one of its `r`
directions; what is left is the room later edits have without disturbing earlier ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .modeling import AlphaEditModel


@dataclass(frozen=True)
class NullSpaceRoom:
    """The null space of one edited layer and how much of it the applied edits span.

    Attributes:
        layer: the edited layer.
        key_dim: `d_k`, the dimension of the layer's keys (its edited projection's input).
        null_space_dim: `r`, the directions the projector lets edits use.
        num_keys: edit keys applied at this layer so far (one per edited fact and batch).
        used: the numerical rank of those keys projected into the null space (`Ûᵀ Kᵀ`), at most
            `min(num_keys, r)`.
    """

    layer: int
    key_dim: int
    null_space_dim: int
    num_keys: int
    used: int

    @property
    def left(self) -> int:
        """Null-space directions no applied edit key spans yet: `null_space_dim - used`."""
        return self.null_space_dim - self.used

    @property
    def fraction_left(self) -> float:
        """`left / null_space_dim` (0.0 for an empty null space)."""
        return self.left / self.null_space_dim if self.null_space_dim else 0.0


def null_space_room(model: AlphaEditModel, rtol: float | None = None) -> dict[int, NullSpaceRoom]:
    """The room left in the null space of every edited layer of `model`, `{layer: NullSpaceRoom}`.

    For layer `l` with null-space basis `Û = model.projector.bases[l]` `[d_k, r]` and the keys of every applied
    batch stacked as `K` `[N, d_k]` (`model.state.batches[i].layers[j].keys`, each `[n_i, d_k]`), `used` is the
    numerical rank of `K Û` `[N, r]` (computed in float64): its singular values above `rtol · σ_max` count.
    The default `rtol` is `max(N, r) · ε_float32` (NumPy's `matrix_rank` rule with the precision of the float32
    forward passes the keys come from), so keys that differ only by round-off count once.

    Needs a method that edits in the null space (`model.projector`, AlphaEdit or `use_projection=True`); building
    the projector the first time may collect key statistics.
    """
    if rtol is not None and not 0 <= rtol < 1:
        raise ValueError(f"null_space_room: rtol={rtol!r} must be in [0, 1) (a fraction of the largest singular "
                         "value), or None for the float32 default.")
    projector = model.projector
    room = {}
    for layer in model.hparams.layers:
        basis = projector.bases[layer].double()
        key_dim, null_space_dim = basis.shape
        keys = [update.keys for record in model.state.batches for update in record.layers if update.layer == layer]
        used = 0
        num_keys = sum(k.shape[0] for k in keys)
        if keys and null_space_dim:
            projected = torch.cat([k.to(basis.device, torch.float64) for k in keys]) @ basis
            singular_values = torch.linalg.svdvals(projected)
            tolerance = (max(projected.shape) * torch.finfo(torch.float32).eps if rtol is None else rtol)
            used = int((singular_values > tolerance * singular_values.max()).sum())
        room[layer] = NullSpaceRoom(layer, key_dim, null_space_dim, num_keys, used)
    return room
