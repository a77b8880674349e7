"""Read-only measurements of an edited model's state: the collapse telemetry of every batch, and the null-space room.

`BatchTelemetry` (recorded with every batch, `BatchRecord.telemetry`, and written into the edit log): per edited
matrix `‖ΔW‖_F`, `‖W‖_F` against the original `‖W₀‖_F` (norm growth is what precedes the collapse of long edit
sequences), the condition number of the layer's solve and the null-space room left; per request the target norms
`‖z‖` and `‖z − h‖`. `EditingArguments.collapse_guard` refuses a batch after which a matrix's norm grew past a bound.

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

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [{**asdict(layer), "weight_growth": layer.weight_growth} for layer in self.layers],
                "target_norms": self.target_norms, "target_shift_norms": self.target_shift_norms}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> BatchTelemetry:
        fields = LayerTelemetry.__dataclass_fields__
        return cls([LayerTelemetry(**{k: v for k, v in layer.items() if k in fields}) for layer in values["layers"]],
                   list(values.get("target_norms", [])), list(values.get("target_shift_norms", [])))

    @property
    def max_weight_growth(self) -> float:
        """The largest `‖W‖/‖W₀‖` of the batch's matrices (1.0 without matrices)."""
        return max((layer.weight_growth for layer in self.layers), default=1.0)


class NullSpaceRoomTracker:
    """The room left in each layer's null space, kept up to date batch after batch at the cost of one `[r, r]`
    eigendecomposition per layer.

    Holds per layer the Gram matrix `G = Ûᵀ Kᵀ K Û` `[r, r]` (float64) of the applied edit keys `K` projected into
    the null space `Û` `[d_k, r]`; the rank of `K Û` is the number of eigenvalues of `G` above `rtol² · λ_max`
    (`σ = √λ`). Batches are folded in once; an undo (or any other change of the applied batches) refolds them.
    """

    def __init__(self, bases: Mapping[int, torch.Tensor], rewrite_modules: Mapping[int, str]) -> None:
        self.bases = {layer: basis.detach().to("cpu", torch.float64) for layer, basis in bases.items()}
        self.rewrite_modules = dict(rewrite_modules)  # layer -> the matrix whose keys the projector describes
        self._reset()

    def _reset(self) -> None:
        self._grams = {layer: basis.new_zeros(basis.shape[1], basis.shape[1]) for layer, basis in self.bases.items()}
        self._num_keys = dict.fromkeys(self.bases, 0)
        self._folded: list[BatchRecord] = []

    def room(self, batches: Sequence[BatchRecord], rtol: float | None = None) -> dict[int, NullSpaceRoom]:
        """`{layer: NullSpaceRoom}` after `batches` (the applied batches, in order); see `null_space_room`."""
        if rtol is not None and not 0 <= rtol < 1:
            raise ValueError(f"null_space_room: rtol={rtol!r} must be in [0, 1) (a fraction of the largest singular "
                             "value), or None for the float32 default.")
        self._fold(batches)
        room = {}
        for layer, basis in self.bases.items():
            key_dim, null_space_dim = basis.shape
            num_keys, used = self._num_keys[layer], 0
            if num_keys and null_space_dim:
                eigenvalues = torch.linalg.eigvalsh(self._grams[layer])
                tolerance = max(num_keys, null_space_dim) * torch.finfo(torch.float32).eps if rtol is None else rtol
                largest = float(eigenvalues[-1])
                used = int((eigenvalues > tolerance ** 2 * largest).sum()) if largest > 0 else 0
            room[layer] = NullSpaceRoom(layer, key_dim, null_space_dim, num_keys, used)
        return room

    def _fold(self, batches: Sequence[BatchRecord]) -> None:
        folded = len(self._folded)
        if folded > len(batches) or any(a is not b for a, b in zip(self._folded, batches[:folded], strict=True)):
            self._reset()
            folded = 0
        for record in batches[folded:]:
            for update in record.layers:
                basis = self.bases.get(update.layer)
                if basis is None or update.module not in (None, self.rewrite_modules[update.layer]):
                    continue  # another matrix of the layer (MEND edits several)
                projected = update.keys.to("cpu", torch.float64) @ basis  # K Û, [n, r]
                self._grams[update.layer] += projected.T @ projected
                self._num_keys[update.layer] += update.keys.shape[0]
            self._folded.append(record)


def null_space_room(model: AlphaEditModel, rtol: float | None = None) -> dict[int, NullSpaceRoom]:
    """The room left in the null space of every edited layer of `model`, `{layer: NullSpaceRoom}`.

    For layer `l` with null-space basis `Û = model.projector.bases[l]` `[d_k, r]` and the keys of every applied
    batch stacked as `K` `[N, d_k]` (`model.state.batches[i].layers[j].keys`, each `[n_i, d_k]`), `used` is the
    numerical rank of `K Û` `[N, r]`: its singular values above `rtol · σ_max` count (computed in float64 as the
    eigenvalues of `Ûᵀ Kᵀ K Û` above `rtol² · λ_max`, `NullSpaceRoomTracker`). The default `rtol` is
    `max(N, r) · ε_float32` (NumPy's `matrix_rank` rule with the precision of the float32 forward passes the keys
    come from), so keys that differ only by round-off count once.

    Needs a method that edits in the null space (`model.projector`, AlphaEdit or `use_projection=True`); building
    the projector the first time may collect key statistics.
    """
    model.projector  # noqa: B018 (builds the method and its projector; refuses a method that edits without one)
    return model.provider.null_space_room_tracker().room(model.state.batches, rtol)
