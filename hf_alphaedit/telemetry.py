"""Read-only measurements of an edited model's state: the collapse telemetry of every batch, and the null-space room.

`BatchTelemetry` (recorded with every batch, `BatchRecord.telemetry`, and written into the edit log): per edited
matrix `‖ΔW‖_F`, `‖W‖_F` against the original `‖W₀‖_F` (norm growth is what precedes the collapse of long edit
sequences), the condition number of the layer's solve and the null-space room left; per request the target norms
`‖z‖`, `‖z − h‖` and the hidden state's `‖h‖` (the clamp bounds `‖z − h‖ / ‖h‖` by `clamp_norm_factor`).
`EditingArguments.collapse_guard` refuses a batch after which a matrix's norm grew past a bound.

`null_space_room`: how much of each edited layer's null space the applied edits already span. AlphaEdit writes
every update into the null space `Û` `[d_k, r]` of the preserved keys, and the previous edits' keys take part in
each later solve, so every linearly independent edit key (projected into that null space) uses up one of its `r`
directions; what is left is the room later edits have without disturbing earlier ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .modeling import AlphaEditModel
    from .state import BatchRecord
    from .updates import LayerUpdate


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


@dataclass
class LayerTelemetry:
    """One edited matrix after one batch.

    Attributes:
        layer: the edited layer; `module` the matrix (dotted path).
        update_norm: `‖ΔW‖_F` of the batch (restraint factors included).
        weight_norm: `‖W‖_F` after the batch; `original_norm`: `‖W₀‖_F` before any edit.
        condition_number: 2-norm condition number of the layer's linear system in this batch (None: the method
            solves none, e.g. ROME, FT, MEND).
        null_space_left: null-space directions no applied edit key spans yet (None: no null-space projection).
    """

    layer: int
    module: str
    update_norm: float
    weight_norm: float
    original_norm: float
    condition_number: float | None = None
    null_space_left: int | None = None

    @property
    def weight_growth(self) -> float:
        """`‖W‖_F / ‖W₀‖_F` (1.0 unedited)."""
        return self.weight_norm / self.original_norm if self.original_norm else math.inf


@dataclass
class BatchTelemetry:
    """The collapse telemetry of one batch: its matrices (`LayerTelemetry`) and per-request target norms."""

    layers: list[LayerTelemetry] = field(default_factory=list)
    target_norms: list[float] = field(default_factory=list)  # ‖z‖ per request
    target_shift_norms: list[float] = field(default_factory=list)  # ‖z − h‖ per request
    hidden_norms: list[float] = field(default_factory=list)  # ‖h‖ per request (the hidden state z starts from)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [{**asdict(layer), "weight_growth": layer.weight_growth} for layer in self.layers],
                "target_norms": self.target_norms, "target_shift_norms": self.target_shift_norms,
                "hidden_norms": self.hidden_norms}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> BatchTelemetry:
        fields = LayerTelemetry.__dataclass_fields__
        return cls([LayerTelemetry(**{k: v for k, v in layer.items() if k in fields}) for layer in values["layers"]],
                   *(list(values.get(name, [])) for name in ("target_norms", "target_shift_norms", "hidden_norms")))

    @property
    def max_weight_growth(self) -> float:
        """The largest `‖W‖/‖W₀‖` of the batch's matrices (1.0 without matrices)."""
        return max((layer.weight_growth for layer in self.layers), default=1.0)


class NullSpaceRoomTracker:
    """The room left in each layer's null space, kept up to date batch after batch at a cost that does not grow with
    the number of edits already applied.

    Holds per layer an orthonormal basis `Q` `[r, used]` (float64, on the projector's device) of the span of the
    applied edit keys projected into the null space, `K Û`. A batch's projected keys `X` `[n, r]` add the directions
    of their residual `X − X Q Qᵀ` (orthogonalised twice) whose singular values are above
    `max(N, r) · ε_float32 · s`, `N` the keys applied so far and `s` the largest singular value of any batch's `X`
    (NumPy's `matrix_rank` rule with the precision of the float32 forward passes the keys come from): one `[n, r]`
    SVD per layer and batch instead of a decomposition of everything applied. Batches are folded in once; an undo
    (or any other change of the applied batches) refolds them. An explicit `rtol` instead takes the numerical rank
    of all keys at once (`exact_room`).
    """

    def __init__(self, bases: Mapping[int, torch.Tensor], rewrite_modules: Mapping[int, str]) -> None:
        self.bases = {layer: basis.detach().to(torch.float64) for layer, basis in bases.items()}
        self.rewrite_modules = dict(rewrite_modules)  # layer -> the matrix whose keys the projector describes
        self._reset()

    def _reset(self) -> None:
        self._spans = {layer: basis.new_zeros(basis.shape[1], 0) for layer, basis in self.bases.items()}
        self._scales = dict.fromkeys(self.bases, 0.0)
        self._num_keys = dict.fromkeys(self.bases, 0)
        self._folded: list[BatchRecord] = []

    def room(self, batches: Sequence[BatchRecord], rtol: float | None = None) -> dict[int, NullSpaceRoom]:
        """`{layer: NullSpaceRoom}` after `batches` (the applied batches, in order); see `null_space_room`."""
        if rtol is not None:
            return self.exact_room(batches, rtol)
        self._fold(batches)
        return {layer: NullSpaceRoom(layer, *basis.shape, self._num_keys[layer], self._spans[layer].shape[1])
                for layer, basis in self.bases.items()}

    def exact_room(self, batches: Sequence[BatchRecord], rtol: float) -> dict[int, NullSpaceRoom]:
        """The numerical rank of all of `batches`' keys projected into each null space at once: the singular values
        of `K Û` `[N, r]` above `rtol · σ_max` (an SVD whose cost grows with `N`)."""
        if not 0 <= rtol < 1:
            raise ValueError(f"null_space_room: rtol={rtol!r} must be in [0, 1) (a fraction of the largest singular "
                             "value), or None for the float32 default.")
        room = {}
        for layer, basis in self.bases.items():
            keys = [update.keys for record in batches for update in self._updates(record) if update.layer == layer]
            num_keys, used = sum(k.shape[0] for k in keys), 0
            if keys and basis.shape[1]:
                singular_values = torch.linalg.svdvals(torch.cat([k.to(basis) for k in keys]) @ basis)
                used = int((singular_values > rtol * singular_values.max()).sum())
            room[layer] = NullSpaceRoom(layer, *basis.shape, num_keys, used)
        return room

    def _updates(self, record: BatchRecord) -> list[LayerUpdate]:
        """The record's updates of the matrices the projector describes (MEND also edits others of a layer)."""
        return [update for update in record.layers if update.layer in self.bases
                and update.module in (None, self.rewrite_modules[update.layer])]

    def _fold(self, batches: Sequence[BatchRecord]) -> None:
        folded = len(self._folded)
        if folded > len(batches) or any(a is not b for a, b in zip(self._folded, batches[:folded], strict=True)):
            self._reset()
            folded = 0
        for record in batches[folded:]:
            for update in self._updates(record):
                layer, basis = update.layer, self.bases[update.layer]
                self._num_keys[layer] += update.keys.shape[0]
                if not basis.shape[1]:
                    continue
                projected = update.keys.to(basis) @ basis  # X = K Û, [n, r]
                self._scales[layer] = max(self._scales[layer], float(torch.linalg.matrix_norm(projected, 2)))
                span, residual = self._spans[layer], projected
                for _ in range(2):  # Gram-Schmidt twice: one pass leaves round-off along the span
                    residual = residual - (residual @ span) @ span.T
                _, singular_values, directions = torch.linalg.svd(residual, full_matrices=False)
                tolerance = (max(self._num_keys[layer], basis.shape[1]) * torch.finfo(torch.float32).eps
                             * self._scales[layer])
                self._spans[layer] = torch.cat([span, directions[singular_values > tolerance].T], dim=1)
            self._folded.append(record)


def null_space_room(model: AlphaEditModel, rtol: float | None = None) -> dict[int, NullSpaceRoom]:
    """The room left in the null space of every edited layer of `model`, `{layer: NullSpaceRoom}`.

    For layer `l` with null-space basis `Û = model.projector.bases[l]` `[d_k, r]` and the keys of every applied
    batch stacked as `K` `[N, d_k]` (`model.state.batches[i].layers[j].keys`, each `[n_i, d_k]`), `used` is the
    numerical rank of `K Û` `[N, r]`. By default it is kept up to date batch by batch (`NullSpaceRoomTracker`: a
    batch's keys add the directions outside the span so far whose singular values are above
    `max(N, r) · ε_float32` times the largest singular value of a batch's keys), so keys that differ only by float32
    round-off count once, at a cost per batch that does not grow with `N`; an explicit `rtol` counts the singular
    values of all of `K Û` above `rtol · σ_max` at once.

    Needs a method that edits in the null space (`model.projector`, AlphaEdit or `use_projection=True`); building
    the projector the first time may collect key statistics.
    """
    model.projector  # noqa: B018 (builds the method and its projector; refuses a method that edits without one)
    return model.provider.null_space_room_tracker().room(model.state.batches, rtol)
