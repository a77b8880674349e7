"""The multi-layer closed-form procedure shared by MEMIT, AlphaEdit and NSE (ALGORITHMS.md §5.1)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from ..registry import ProjectionSupport
from ..requests import EditRequest
from ..updates import BatchUpdate, LayerUpdate
from .base import EditContext
from .keys import LayerKeyReader
from .targets import TargetOptimizer, TargetResult

CONDITION_ITERATIONS = 30


def _largest_eigenvalue(apply: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor) -> float:
    """The largest eigenvalue of the symmetric operator `apply` from `CONDITION_ITERATIONS` Lanczos steps from `start`
    `[m, 1]` (fully re-orthogonalised): the largest eigenvalue of the tridiagonal projection, from below, exact once
    the Krylov space holds every eigenvector `start` touches."""
    vectors = [start / start.norm()]
    diagonal: list[float] = []
    off_diagonal: list[float] = []
    for _ in range(min(CONDITION_ITERATIONS, start.shape[0])):
        image = apply(vectors[-1])
        diagonal.append(float(vectors[-1].T @ image))
        basis = torch.cat(vectors, dim=1)
        for _ in range(2):  # twice: once leaves round-off along the basis
            image = image - basis @ (basis.T @ image)
        norm = float(image.norm())
        if norm <= 1e-12 * max(abs(value) for value in diagonal):
            break
        off_diagonal.append(norm)
        vectors.append(image / norm)
    size = len(diagonal)
    tridiagonal = torch.diag(torch.tensor(diagonal, dtype=torch.float64))
    if size > 1:
        steps = torch.tensor(off_diagonal[:size - 1], dtype=torch.float64)
        tridiagonal += torch.diag(steps, 1) + torch.diag(steps, -1)
    return float(torch.linalg.eigvalsh(tridiagonal)[-1])


class LocateThenEditMethod:
    """The multi-layer closed-form procedure shared by MEMIT and AlphaEdit (ALGORITHMS.md §5.1).

    Targets `z` are optimised once at the batch start; then for each edited layer in ascending order the keys
    `K` and z-layer outputs `H` are read with the layers below already updated, the residual
    `R = (Z - H) / (L - i)` is solved for by the subclass's `solve`, and the update is applied at once. A `solve`
    that forms a linear system reports it with `note_condition` for the batch's collapse telemetry.
    """

    projection: ClassVar[ProjectionSupport] = "optional"
    target_rescaling: ClassVar[bool] = True
    sequential_state: tuple[str, ...] = ()

    def __init__(self, context: EditContext, config: Any = None) -> None:
        self.context = context
        self.config = config
        self.solve_conditions: dict[int, float] = {}  # layer -> condition number of this batch's system

    def solve(self, layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        """Right factor `B` `[n, d_k]` such that `ΔW = residualsᵀ @ B` for keys `[n, d_k]`, residuals `[n, d]`."""
        raise NotImplementedError

    def note_condition(self, layer: int, system: torch.Tensor,
                       inverse: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Record `layer`'s condition number `λ_max / λ_min` for the batch's telemetry, estimated for the symmetric
        positive definite `system` `[m, m]` by Lanczos with `system` and with `inverse` (`V ↦ system⁻¹ V` from the
        solve's own factorisation), `CONDITION_ITERATIONS` steps each: O(m²) work per step against the solve's
        O(m³), where an eigendecomposition would cost more than the solve. A lower bound of the exact ratio, which
        the extreme Ritz values approach fastest."""
        if system.numel() == 0:  # an empty null space: nothing is solved
            return
        generator = torch.Generator().manual_seed(0)
        start = torch.randn(system.shape[0], 1, generator=generator, dtype=torch.float64).to(system)
        largest, inverse_of_smallest = (_largest_eigenvalue(apply, start) for apply in (system.__matmul__, inverse))
        self.solve_conditions[layer] = largest * inverse_of_smallest if inverse_of_smallest > 0 else math.inf

    def commit(self, update: BatchUpdate) -> None:
        """Stateless by default (a subclass that keeps state names it in `sequential_state`)."""

    def edit_batch(self, requests: Sequence[EditRequest]) -> BatchUpdate:
        self.solve_conditions = {}
        timings = {"targets": 0.0, "keys": 0.0, "solve": 0.0}
        start = time.perf_counter()
        targets = self.optimize_targets(requests)
        timings["targets"] = time.perf_counter() - start
        updates = self.edit_layers(requests, targets.values, timings)
        return self.batch_update(updates, targets, timings)

    def batch_update(self, updates: list[LayerUpdate], targets: TargetResult,
                     timings: dict[str, float]) -> BatchUpdate:
        """The batch as the engine records it, with the telemetry's target norms `‖z‖`, `‖z − h‖`, `‖h‖` and the
        condition numbers of the solves."""
        shifts = (targets.values - targets.initial_hidden).norm(dim=1)
        return BatchUpdate(updates, targets.losses, targets.steps, targets.target_probabilities, timings,
                           targets.values.norm(dim=1).tolist(), shifts.tolist(), dict(self.solve_conditions),
                           hidden_norms=targets.initial_hidden.norm(dim=1).tolist())

    def optimize_targets(self, requests: Sequence[EditRequest]) -> TargetResult:
        """The batch's targets `z` (§3) on the model as it is now, rescaled by `context.rescale_targets` if set."""
        ctx = self.context
        targets = TargetOptimizer(ctx.model, ctx.tokenizer, ctx.spec, ctx.hparams, ctx.context_templates,
                                  batch_tokens=ctx.target_batch_tokens, memory_budget=ctx.target_memory_budget,
                                  mode=ctx.forward_mode, show_progress=ctx.show_progress).optimize(requests)
        return targets if ctx.rescale_targets is None else ctx.rescale_targets(requests, targets)

    def edit_layers(self, requests: Sequence[EditRequest], targets: torch.Tensor,
                    timings: dict[str, float]) -> list[LayerUpdate]:
        """The layer loop of §5.1 towards targets `z` `[n, d]`: each layer's update is applied before the next
        layer's keys are read; returns the updates as applied and adds to `timings["keys"]`/`["solve"]`."""
        ctx, hp = self.context, self.context.hparams
        device = next(ctx.model.parameters()).device
        z = targets.to(device)
        reader = LayerKeyReader(ctx.model, ctx.tokenizer, ctx.spec, hp, ctx.context_templates, requests,
                                use_block_runner=ctx.forward_mode != "full")
        updates = []
        for i, layer in enumerate(hp.layers):
            start = time.perf_counter()
            keys, z_outputs = reader.read(i)
            timings["keys"] += time.perf_counter() - start
            start = time.perf_counter()
            residuals = (z - z_outputs) / (len(hp.layers) - i)
            right = self.solve(layer, keys, residuals).float()
            update = LayerUpdate(layer, residuals.T.contiguous().float(), right.contiguous(), keys.float())
            updates.append(ctx.apply_update(update))
            timings["solve"] += time.perf_counter() - start
        return updates
