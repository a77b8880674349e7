"""The method registry, the `EditMethod` protocol and the shared locate-then-edit batch procedure (§5.1).

A third-party method is one file: a config dataclass deriving from `MethodConfig`, a class with
`__init__(context, config)`, `edit_batch(requests) -> BatchUpdate` and `commit(update)` (or a subclass of
`LocateThenEditMethod` that only writes `solve`), and one `register_method(name, ConfigClass, MethodClass)` call.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import nn

from ..architectures import ModelSpec
from ..arguments import ResolvedHyperparameters, coerce_scalar_fields
from ..projection import NullSpaceProjector
from ..requests import EditRequest
from ..statistics import KeyStatistics
from .keys_targets import ForwardMode, LayerKeyReader, TargetOptimizer, TargetResult

logger = logging.getLogger(__name__)

ProjectionSupport = Literal["inherent", "optional", "unsupported"]
PROJECTION_SUPPORT: tuple[str, ...] = ("inherent", "optional", "unsupported")


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
    # The last `restraint_rank` factor columns are the PRUNE restraint the weights hold after this batch
    # (methods/prune; lifted again before the next batch when it restrains at the "end").
    restraint_rank: int = 0

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
    """A plugin: built once per model as `method_cls(context, config)`, then called batch after batch.

    Optional class attribute `projection` (default `"optional"`) says how AlphaEdit's null-space projection
    relates to the method: `"inherent"` (it solves in the null space itself, like AlphaEdit), `"optional"`
    (`EditingArguments.use_projection=True` projects every update it applies through `context.apply_update`)
    or `"unsupported"` (its updates must not be projected).

    Optional attribute `sequential_state` (names of attributes, each a dict layer → tensor) says which tensors
    `commit` changes; the engine copies exactly those around each batch, so a failed batch leaves no trace, and
    restores them to rebuild the state after an undo. Undeclared, every dict-of-tensors attribute is copied
    (safe, but constants such as `λC₀` then cost a copy per batch).
    """

    def edit_batch(self, requests: Sequence[EditRequest]) -> BatchUpdate:
        """Apply the batch through `context.apply_update` and return what was applied."""

    def commit(self, update: BatchUpdate) -> None:
        """Called once the batch succeeded; update sequential state (e.g. previous-edit keys)."""


@dataclass
class MethodConfig:
    """Base of every method's config dataclass: saved with a run, parsed by `HfArgumentParser`.

    Subclasses add plain dataclass fields (scalars, `Literal` choices, lists); each becomes a CLI flag when the
    class is given to `HfArgumentParser((EditingArguments, TheConfig))`, so field names must not repeat
    `EditingArguments` fields. `to_dict()` adds the registered method name under `"method"` (the discriminator,
    like PEFT's `peft_type`); `MethodConfig.from_dict` uses it to pick the registered class.
    """

    def __post_init__(self) -> None:
        # HfArgumentParser.parse_dict / JSON / YAML do no type conversion ('1e-4' stays a string).
        coerce_scalar_fields(self)

    @property
    def method(self) -> str:
        """The name this config class is registered under."""
        try:
            return _CONFIG_NAMES[type(self)]
        except KeyError:
            raise ValueError(f"{type(self).__name__} is not registered; call hf_alphaedit.register_method(name, "
                             f"{type(self).__name__}, MethodClass) first.") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready `{"method": name, field: value, ...}`."""
        return {"method": self.method, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MethodConfig:
        """Build the config from `to_dict()` output.

        On `MethodConfig` itself the `"method"` key picks the registered class; on a subclass it must match (or
        be absent). Keys this version does not know are dropped with a warning, so newer files still load.
        """
        values = dict(values)
        name = values.pop("method", None)
        config_cls: type[MethodConfig] = cls
        if cls is MethodConfig:
            if name is None:
                raise ValueError("MethodConfig.from_dict: the dict has no 'method' key; give the registered "
                                 f"method name (one of {list_methods()}).")
            registered, _ = get_method_classes(name)
            if registered is None:
                raise ValueError(f"MethodConfig.from_dict: method {name!r} takes no config.")
            config_cls = registered
        elif name is not None and get_method_classes(name)[0] is not cls:
            raise ValueError(f"{cls.__name__}.from_dict: the dict is for method {name!r}, not "
                             f"{_CONFIG_NAMES.get(cls, cls.__name__)!r}.")
        known = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            logger.warning("%s: ignoring unknown field(s) %s (written by a newer version?)", config_cls.__name__,
                           unknown)
        return config_cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_json_string(cls, text: str) -> MethodConfig:
        return cls.from_dict(json.loads(text))


_REGISTRY: dict[str, tuple[type[MethodConfig] | None, type]] = {}
_CONFIG_NAMES: dict[type, str] = {}
_METHOD_NAME = re.compile(r"[a-z][a-z0-9_]*")


def register_method(name: str, config_cls: type[MethodConfig] | None, method_cls: type, *,
                    replace: bool = False) -> None:
    """Register an editing method under `name` so that `EditingArguments(method=name)` selects it.

    `config_cls` is the method's `MethodConfig` subclass (None when it has no settings); `method_cls` is built
    as `method_cls(context, config)` and follows the `EditMethod` protocol. Registering a different pair under
    a taken name needs `replace=True`.
    """
    key = name.lower()
    if not _METHOD_NAME.fullmatch(key):
        raise ValueError(f"register_method: name {name!r} must start with a letter and contain only letters, "
                         "digits and '_' (it becomes a CLI choice and a file name).")
    if config_cls is not None and not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig)
                                       and dataclasses.is_dataclass(config_cls)):
        raise TypeError(f"register_method({name!r}): config_cls must be a @dataclass deriving from "
                        f"hf_alphaedit.methods.MethodConfig (or None), got {config_cls!r}.")
    for hook in ("edit_batch", "commit"):
        if not callable(getattr(method_cls, hook, None)):
            raise TypeError(f"register_method({name!r}): {method_cls!r} has no {hook}() (see EditMethod).")
    projection_support(method_cls)
    if config_cls is not None and _CONFIG_NAMES.get(config_cls, key) != key:
        raise ValueError(f"register_method({name!r}): {config_cls.__name__} is already the config of method "
                         f"{_CONFIG_NAMES[config_cls]!r}; give each method its own config class.")
    if _REGISTRY.get(key, (config_cls, method_cls)) != (config_cls, method_cls):
        if not replace:
            raise ValueError(f"register_method: a different method is already registered as {key!r}; choose "
                             "another name or pass replace=True.")
        previous_config, _ = _REGISTRY[key]
        _CONFIG_NAMES.pop(previous_config, None)
    _REGISTRY[key] = (config_cls, method_cls)
    if config_cls is not None:
        _CONFIG_NAMES[config_cls] = key


def get_method_classes(name: str) -> tuple[type[MethodConfig] | None, type]:
    """`(config class or None, method class)` registered under `name`."""
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"EditingArguments.method={name!r}: unknown method; registered methods are "
                         f"{list_methods()} (add one with hf_alphaedit.register_method).") from None


def list_methods() -> list[str]:
    """Names of the registered editing methods."""
    return sorted(_REGISTRY)


def projection_support(method_cls: type) -> ProjectionSupport:
    """How the null-space projection applies to `method_cls` (its `projection` attribute; see `EditMethod`)."""
    support = getattr(method_cls, "projection", "optional")
    if support not in PROJECTION_SUPPORT:
        raise ValueError(f"{method_cls.__name__}.projection={support!r}: choose one of {list(PROJECTION_SUPPORT)}.")
    return support


class LocateThenEditMethod:
    """The multi-layer closed-form procedure shared by MEMIT and AlphaEdit (ALGORITHMS.md §5.1).

    Targets `z` are optimised once at the batch start; then for each edited layer in ascending order the keys
    `K` and z-layer outputs `H` are read with the layers below already updated, the residual
    `R = (Z - H) / (L - i)` is solved for by the subclass's `solve`, and the update is applied at once.
    """

    projection: ClassVar[ProjectionSupport] = "optional"
    sequential_state: tuple[str, ...] = ()

    def __init__(self, context: EditContext, config: Any = None) -> None:
        self.context = context
        self.config = config

    def solve(self, layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        """Right factor `B` `[n, d_k]` such that `ΔW = residualsᵀ @ B` for keys `[n, d_k]`, residuals `[n, d]`."""
        raise NotImplementedError

    def commit(self, update: BatchUpdate) -> None:
        """Stateless by default (a subclass that keeps state names it in `sequential_state`)."""

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
