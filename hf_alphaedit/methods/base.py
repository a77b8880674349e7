"""The method protocol: what a plugin implements (`EditMethod`) and what the engine gives it (`EditContext`).

A third-party method is one file: a config dataclass deriving from `MethodConfig`, a class with
`__init__(context, config)`, `edit_batch(requests) -> BatchUpdate` and `commit(update)` (or a subclass of
`LocateThenEditMethod` that only writes `solve`), and one `register_method(name, ConfigClass, MethodClass)` call.
The registry and `MethodConfig` live in `hf_alphaedit.registry` and are re-exported here for plugin authors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from ..architectures import ModelSpec
from ..hparams import ResolvedHyperparameters
from ..projection import NullSpaceProjector
from ..registry import (
    PROJECTION_SUPPORT,
    MethodConfig,
    ProjectionSupport,
    get_method_classes,
    list_methods,
    projection_support,
    register_method,
)
from ..requests import EditRequest
from ..statistics import KeyStatistics
from ..updates import BatchUpdate, LayerUpdate
from .targets import ForwardMode, TargetResult

__all__ = ["PROJECTION_SUPPORT", "BatchUpdate", "EditContext", "EditMethod", "LayerUpdate", "MethodConfig",
           "ProjectionSupport", "get_method_classes", "list_methods", "projection_support", "register_method"]


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
    apply: Callable[[LayerUpdate], None]  # adds an update's `left @ right` to the matrix it names (the engine)
    forward_mode: ForwardMode = "prefix_cache"
    target_batch_tokens: int = 4096
    target_memory_budget: str | None = None  # EditingArguments.target_memory_budget
    show_progress: bool = False
    # Optional constraint on every update before it is applied (e.g. the null-space projection of a method
    # that does not solve in the null space itself); returns the update as it will be applied.
    constrain_update: Callable[[LayerUpdate], LayerUpdate] | None = None
    # Optional rescaling of a batch's optimised targets before the layers are solved for (NAS, `methods.nas`), applied
    # by `LocateThenEditMethod.optimize_targets` on the model as the targets were optimised on.
    rescale_targets: Callable[[Sequence[EditRequest], TargetResult], TargetResult] | None = None
    hub_token: str | None = None  # for a method that fetches a trained artifact (MEND's editor) from the Hub

    def apply_update(self, update: LayerUpdate) -> LayerUpdate:
        """Constrain (if configured) and apply `update`; returns the update as applied."""
        if self.constrain_update is not None:
            update = self.constrain_update(update)
        self.apply(update)
        return update


class EditMethod(Protocol):
    """A plugin: built once per model as `method_cls(context, config)`, then called batch after batch.

    Optional class attributes `title` (how model cards name the method; default: its registered name) and `paper`
    (how to cite it, one line, `arXiv:NNNN.NNNNN` becomes a link) are read from the class itself, not inherited, so
    a subclass registered as another method never shows its parent's name or paper.

    Optional class attribute `projection` (default `"optional"`) says how AlphaEdit's null-space projection
    relates to the method: `"inherent"` (it solves in the null space itself, like AlphaEdit), `"optional"`
    (`EditingArguments.use_projection=True` projects every update it applies through `context.apply_update`)
    or `"unsupported"` (its updates must not be projected).

    Optional attribute `sequential_state` (names of attributes, each a dict layer → tensor) says which tensors
    `commit` changes; the engine copies exactly those around each batch, so a failed batch leaves no trace, and
    restores them to rebuild the state after an undo. Undeclared, every dict-of-tensors attribute is copied
    (safe, but constants such as `λC₀` then cost a copy per batch).

    Optional class attribute `target_rescaling` (default False; True on `LocateThenEditMethod`) says that the method
    optimises its targets through `LocateThenEditMethod.optimize_targets`, so `EditingArguments.norm_anchor=True`
    (NAS, `context.rescale_targets`) applies to it; methods with their own target procedure refuse it.

    Optional attribute `edited_modules` (dotted module paths) names the matrices besides the rewrite modules of
    `hparams.layers` that the method's updates change (`LayerUpdate.module`, e.g. MEND's gate/up projections), so
    that `prune=True` restrains them too.

    Optional static hooks read when hyperparameters are resolved (`hparams.resolve_hyperparameters`):
    `default_layers(spec, locate_then_edit_layers, config)` (ROME, FT pick their own layers),
    `reference_hyperparameters(reference_file) -> {field: value}` (ROME, NSE: their own reference files' values of
    shared settings under `preset="reference"`) and `auto_hyperparameters(spec) -> {field: value}` (AlphaEdit: its
    calibrated defaults of shared settings under `preset="auto"`).
    """

    def edit_batch(self, requests: Sequence[EditRequest]) -> BatchUpdate:
        """Apply the batch through `context.apply_update` and return what was applied."""

    def commit(self, update: BatchUpdate) -> None:
        """Called once the batch succeeded; update sequential state (e.g. previous-edit keys)."""
