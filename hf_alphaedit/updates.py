"""What an edit changes, in factored form: the data the methods produce and the engine applies, records and undoes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class LayerUpdate:
    """One matrix's update of one batch in factored form: `ΔW = left @ right` (math orientation `[d_out, d_in]`).

    `module` is the dotted path of the edited `nn.Linear` / GPT-2 `Conv1D`; None means the rewrite module (the MLP
    output projection) of `layer`, which is what every locate-then-edit method edits. The engine decides the
    stored orientation from the module's type, never from shapes.
    """

    layer: int
    left: torch.Tensor  # [d_out, n] float32
    right: torch.Tensor  # [n, d_in] float32
    keys: torch.Tensor  # [n, d_in] float32, the batch's keys (module inputs) at this matrix
    # The last `restraint_rank` factor columns are the PRUNE restraint the weights hold after this batch
    # (methods/prune; lifted again before the next batch when it restrains at the "end").
    restraint_rank: int = 0
    module: str | None = None

    @property
    def delta(self) -> torch.Tensor:
        """`left @ right`, `[d_out, d_in]`."""
        return self.left @ self.right

    @classmethod
    def stack(cls, layer: int, parts: Sequence[LayerUpdate], keys: torch.Tensor) -> LayerUpdate:
        """One update holding the factors of all `parts` (of the same matrix) side by side, so
        `ΔW = Σ part.left @ part.right`; `keys` `[n, d_in]` are the batch's keys at that matrix."""
        return cls(layer, torch.cat([part.left for part in parts], dim=1),
                   torch.cat([part.right for part in parts], dim=0), keys, module=parts[0].module if parts else None)

    @property
    def norm(self) -> float:
        return float(torch.linalg.matrix_norm(self.delta))


@dataclass
class BatchUpdate:
    """Everything a method did to one batch: per-matrix factors, target optimisation results, timings.

    The optional diagnostics feed the collapse telemetry (`telemetry.BatchTelemetry`): `target_norms` `‖z‖`,
    `target_shift_norms` `‖z − h‖` and `hidden_norms` `‖h‖` per request (methods that optimise targets; the clamp
    bounds `‖z − h‖ / ‖h‖` by `clamp_norm_factor`), `solve_conditions` the 2-norm
    condition number of each layer's linear system (methods that solve one). `method_state` holds the tensors
    `commit` needs besides the factors (e.g. a running normaliser's inputs); it is recorded and saved with the batch,
    so an undo or a resumed run rebuilds the method's sequential state from it.
    """

    layers: list[LayerUpdate]
    target_losses: list[float] = field(default_factory=list)
    target_steps: list[int] = field(default_factory=list)
    target_probabilities: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    target_norms: list[float] = field(default_factory=list)
    target_shift_norms: list[float] = field(default_factory=list)
    solve_conditions: dict[int, float] = field(default_factory=dict)
    method_state: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden_norms: list[float] = field(default_factory=list)
