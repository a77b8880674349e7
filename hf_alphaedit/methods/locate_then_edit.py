"""The multi-layer closed-form procedure shared by MEMIT, AlphaEdit and NSE (ALGORITHMS.md §5.1)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ..registry import ProjectionSupport
from ..requests import EditRequest
from ..updates import BatchUpdate, LayerUpdate
from .base import EditContext
from .keys import LayerKeyReader
from .targets import TargetOptimizer, TargetResult


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

    def note_condition(self, layer: int, system: torch.Tensor) -> None:
        """Record the 2-norm condition number `λ_max / λ_min` of `layer`'s symmetric positive definite system
        `[m, m]` (one eigendecomposition, a fraction of the batch's time; the last system of a layer counts)."""
        if system.numel() == 0:  # an empty null space: nothing is solved
            return
        eigenvalues = torch.linalg.eigvalsh(system)
        smallest, largest = float(eigenvalues[0]), float(eigenvalues[-1])
        self.solve_conditions[layer] = largest / smallest if smallest > 0 else math.inf

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
        """The batch as the engine records it, with the telemetry's target norms `‖z‖`, `‖z − h‖` and the
        condition numbers of the solves."""
        shifts = (targets.values - targets.initial_hidden).norm(dim=1)
        return BatchUpdate(updates, targets.losses, targets.steps, targets.target_probabilities, timings,
                           targets.values.norm(dim=1).tolist(), shifts.tolist(), dict(self.solve_conditions))

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
