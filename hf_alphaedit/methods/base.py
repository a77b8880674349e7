"""The method registry, the `EditMethod` protocol and the shared locate-then-edit batch procedure (§5.1)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..architectures import ModelSpec
from ..arguments import ResolvedHyperparameters
from ..projection import NullSpaceProjector
from ..requests import EditRequest
from ..statistics import KeyStatistics
from .keys_targets import ForwardMode, LayerKeyReader, TargetOptimizer, TargetResult


@dataclass
class EditContext:
    """What a method may use: the model, its spec, resolved hyperparameters and engine services."""

    model: nn.Module
    tokenizer: Any
    spec: ModelSpec
    hparams: ResolvedHyperparameters
    context_templates: list[str]
    statistics: Callable[[Sequence[int]], KeyStatistics]  # layers -> key statistics (collected or cached)
    # layers -> the null-space projector for the run's threshold (from a Hub/local artifact or the statistics)
    projector: Callable[[Sequence[int]], NullSpaceProjector]
    apply_delta: Callable[[int, torch.Tensor], None]  # (layer, ΔW [d, d_k]) -> adds it to the edited weight
    forward_mode: ForwardMode = "prefix_cache"
    target_batch_tokens: int = 4096
    show_progress: bool = False
    # Optional constraint on every update before it is applied (e.g. the null-space projection of a method
    # that does not solve in the null space itself); returns the update as it will be applied.
    constrain_update: Callable[[LayerUpdate], LayerUpdate] | None = None

    def apply_update(self, update: LayerUpdate) -> LayerUpdate:
        """Constrain (if configured) and apply `update`; returns the update as applied."""
        if self.constrain_update is not None:
            update = self.constrain_update(update)
        self.apply_delta(update.layer, update.delta)
        return update


@dataclass
class LayerUpdate:
    """One layer's update of one batch in factored form: `ΔW = left @ right` (math orientation `[d, d_k]`)."""

    layer: int
    left: torch.Tensor  # [d, n] float32
    right: torch.Tensor  # [n, d_k] float32
    keys: torch.Tensor  # [n, d_k] float32, the batch's keys at this layer

    @property
    def delta(self) -> torch.Tensor:
        return self.left @ self.right

    @classmethod
    def stack(cls, layer: int, parts: Sequence[LayerUpdate], keys: torch.Tensor) -> LayerUpdate:
        """One update holding the factors of all `parts` side by side, so `ΔW = Σ part.left @ part.right`;
        `keys` `[n, d_k]` are the batch's keys at `layer`."""
        return cls(layer, torch.cat([part.left for part in parts], dim=1),
                   torch.cat([part.right for part in parts], dim=0), keys)

    @property
    def norm(self) -> float:
        return float(torch.linalg.matrix_norm(self.delta))


@dataclass
class BatchUpdate:
    """Everything a method did to one batch: per-layer factors, target optimisation results, timings."""

    layers: list[LayerUpdate]
    target_losses: list[float] = field(default_factory=list)
    target_steps: list[int] = field(default_factory=list)
    target_probabilities: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class EditMethod(Protocol):
    """A plugin: built once per model with `(context, config)`, then called batch after batch."""

    def edit_batch(self, requests: Sequence[EditRequest]) -> BatchUpdate:
        """Apply the batch through `context.apply_delta` and return what was applied."""

    def commit(self, update: BatchUpdate) -> None:
        """Called once the batch succeeded; update sequential state (e.g. previous-edit keys)."""


_REGISTRY: dict[str, tuple[type | None, type]] = {}


def register_method(name: str, config_cls: type | None, method_cls: type) -> None:
    """Register an editing method under `name` (its config dataclass may be None)."""
    _REGISTRY[name.lower()] = (config_cls, method_cls)


def get_method_classes(name: str) -> tuple[type | None, type]:
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"EditingArguments.method={name!r}: unknown method; registered methods are "
                         f"{list_methods()} (add one with hf_alphaedit.register_method).") from None


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


class LocateThenEditMethod:
    """The multi-layer closed-form procedure shared by MEMIT and AlphaEdit (ALGORITHMS.md §5.1).

    Targets `z` are optimised once at the batch start; then for each edited layer in ascending order the keys
    `K` and z-layer outputs `H` are read with the layers below already updated, the residual
    `R = (Z - H) / (L - i)` is solved for by the subclass's `solve`, and the update is applied at once.
    """

    def __init__(self, context: EditContext, config: Any = None) -> None:
        self.context = context
        self.config = config

    def solve(self, layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        """Right factor `B` `[n, d_k]` such that `ΔW = residualsᵀ @ B` for keys `[n, d_k]`, residuals `[n, d]`."""
        raise NotImplementedError

    def commit(self, update: BatchUpdate) -> None:
        """Stateless by default."""

    def edit_batch(self, requests: Sequence[EditRequest]) -> BatchUpdate:
        timings = {"targets": 0.0, "keys": 0.0, "solve": 0.0}
        start = time.perf_counter()
        targets = self.optimize_targets(requests)
        timings["targets"] = time.perf_counter() - start
        updates = self.edit_layers(requests, targets.values, timings)
        return BatchUpdate(updates, targets.losses, targets.steps, targets.target_probabilities, timings)

    def optimize_targets(self, requests: Sequence[EditRequest]) -> TargetResult:
        """The batch's targets `z` (§3) on the model as it is now."""
        ctx = self.context
        return TargetOptimizer(ctx.model, ctx.tokenizer, ctx.spec, ctx.hparams, ctx.context_templates,
                               batch_tokens=ctx.target_batch_tokens, mode=ctx.forward_mode,
                               show_progress=ctx.show_progress).optimize(requests)

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
