"""The editing engine: the only code that writes edited weights.

Every weight change of an edit, an undo, published edits or a resumed checkpoint goes through `EditEngine`:

- `apply(update)` adds a factored update `ΔW = left @ right` to the matrix it names. Low-precision weights are
  written from a float32 master copy, so small sequential updates are not rounded away; the exact original value
  of every matrix is kept (on the CPU) the first time it is written, so `reset()` is bit-exact.
- `atomic()`: what happens inside completes or leaves the touched weights, their masters, the method's
  sequential state and the edit state exactly as they were (copy-on-write: only touched matrices are copied).
- `without_edits()`: the exact original weights inside the block (statistics, restraints and baselines describe
  the base model), the edited ones, bit for bit, after it.
- `revert(n)` rebuilds the weights from the originals by re-applying the remaining batches in order (no drift
  from repeated subtraction); `reset()` restores the originals.
- `lock`: one re-entrant lock that every state-changing call holds, and every forward pass of the wrapper, since
  editing hooks modules that a concurrent forward would run through.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import torch
from accelerate.utils import has_offloaded_params
from torch import nn
from transformers.pytorch_utils import Conv1D

from .architectures import ModelSpec
from .errors import CollapseGuardError, check_finite
from .requests import EditRequest
from .state import BatchRecord, EditState, revert_event
from .telemetry import BatchTelemetry, LayerTelemetry, NullSpaceRoom
from .updates import BatchUpdate, LayerUpdate

logger = logging.getLogger(__name__)


@dataclass
class BatchReport:
    """What happened in one batch of `edit()`."""

    index: int
    num_edits: int
    seconds: float
    timings: dict[str, float]
    target_losses: list[float]
    target_steps: list[int]
    target_probabilities: list[float]
    update_norms: dict[int, float]
    telemetry: BatchTelemetry


@dataclass
class EditResult:
    """Per-batch reports of one `edit()` call."""

    batches: list[BatchReport] = field(default_factory=list)

    @property
    def num_edits(self) -> int:
        return sum(b.num_edits for b in self.batches)

    @property
    def seconds(self) -> float:
        return sum(b.seconds for b in self.batches)


class Restraint(Protocol):
    """What the engine calls around a batch when a restraint such as PRUNE is on (see `methods.prune`)."""

    def lift(self, previous: Sequence[LayerUpdate]) -> None:
        """Before a batch: take out of the weights whatever must not be seen by it (`previous`: the last batch's
        recorded updates)."""

    def restrain(self, history: Sequence[LayerUpdate], updates: Sequence[LayerUpdate]) -> list[LayerUpdate]:
        """After a batch: restrain the accumulated update and return the batch's factors to record."""

    def add_modules(self, original_weights: Mapping[str, torch.Tensor]) -> None:
        """Also restrain these matrices (`{module: original weight [d_out, d_in]}`)."""


class EditEngine:
    """Owns the edited weights of `model` and the edit state `state` (see the module docstring).

    `method` (an `EditMethod`, set with `set_method` once built) is the plugin whose sequential state is copied
    around each batch and rebuilt after an undo; `restraint` optionally restrains every batch. `null_space_room`
    (set when the method edits in a null space) measures the room left after each batch for its telemetry.
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, state: EditState) -> None:
        refuse_offloaded_layers(model, spec, state.layers)
        self.model, self.spec, self.state = model, spec, state
        self.lock = threading.RLock()
        self.method: Any = None
        self.restraint: Restraint | None = None
        self.null_space_room: Callable[[Sequence[BatchRecord]], dict[int, NullSpaceRoom]] | None = None
        self._room_warned: set[int] = set()  # layers whose running out of null-space room was reported
        # How target optimisation runs the model (`methods.targets.ForwardMode`), chosen once per model.
        self.forward_mode: str | None = None
        # Edit-log lines of reverted batches (publishing.revert_event), written into edit_log.jsonl.
        self.revert_log: list[dict[str, Any]] = []
        self._initial_method_state: dict[str, dict[Any, torch.Tensor]] = {}
        self._originals: dict[str, torch.Tensor] = {}  # module -> stored weight before its first edit (CPU)
        self._masters: dict[str, torch.Tensor] = {}  # module -> float32 master of a low-precision weight
        # During `atomic`: module -> (weight, master or None) as they were before the block touched them.
        self._backup: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None

    # -- weights -----------------------------------------------------------------------------------------------

    def module_name(self, update: LayerUpdate) -> str:
        """The dotted path of the matrix `update` edits (the rewrite module of its layer unless it names one)."""
        return update.module if update.module is not None else self.spec.rewrite_module_name(update.layer)

    def weight(self, module: str) -> torch.Tensor:
        """The current weight of `module` in math orientation `[d_out, d_in]` (a view for GPT-2 Conv1D)."""
        layer = self.model.get_submodule(module)
        return layer.weight.T if isinstance(layer, Conv1D) else layer.weight

    def original_weight(self, module: str) -> torch.Tensor:
        """The weight of `module` before any edit, bit for bit, in math orientation `[d_out, d_in]`."""
        layer = self.model.get_submodule(module)
        stored = self._originals.get(module, layer.weight.detach())
        return stored.T if isinstance(layer, Conv1D) else stored

    @property
    def edited_modules(self) -> list[str]:
        """Every matrix an edit has written to (also if later reverted), in first-write order."""
        return list(self._originals)

    def apply(self, update: LayerUpdate, *, subtract: bool = False) -> None:
        """Add (or subtract) `update.left @ update.right` to the matrix it names; refuses non-finite factors."""
        name = self.module_name(update)
        check_finite(update.left, f"the update of {name} (left factor)",
                     "the targets, keys or solve of this batch went wrong; nothing was applied")
        check_finite(update.right, f"the update of {name} (right factor)",
                     "the targets, keys or solve of this batch went wrong; nothing was applied")
        delta = update.delta
        self.add_delta(name, -delta if subtract else delta)

    def add_delta(self, module: str, delta: torch.Tensor) -> None:
        """In place `W += delta` for `module`, with `delta` `[d_out, d_in]` in math orientation (any dtype/device).

        Float32/64 weights are added to directly; lower precision goes through the float32 master copy.
        """
        layer = self.model.get_submodule(module)
        stored = layer.weight
        conv1d = isinstance(layer, Conv1D)
        expected = tuple(stored.shape[::-1]) if conv1d else tuple(stored.shape)
        if tuple(delta.shape) != expected:
            raise ValueError(f"the update of {module} must have shape [d_out, d_in] = {list(expected)} (math "
                             f"orientation, v = W k), got {list(delta.shape)}")
        with torch.no_grad():
            self._remember(module)
            change = delta.to(device=stored.device, dtype=torch.float32)
            if conv1d:
                change = change.T
            if stored.dtype in (torch.float32, torch.float64):
                stored.add_(change.to(stored.dtype))
                return
            master = self._masters.get(module)
            if master is None:
                master = self._masters[module] = stored.float().clone()
            master += change
            stored.copy_(master.to(stored.dtype))

    def _set_weight(self, module: str, stored_value: torch.Tensor, master: torch.Tensor | None) -> None:
        """Write `stored_value` (stored orientation) into `module` and set (or drop) its float32 master."""
        self._remember(module)
        with torch.no_grad():
            weight = self.model.get_submodule(module).weight
            weight.copy_(stored_value.to(weight.device))
        if master is None:
            self._masters.pop(module, None)
        else:
            self._masters[module] = master.to(weight.device)

    def _remember(self, module: str) -> None:
        """Keep the original of a matrix written for the first time, and its state before the current `atomic`."""
        weight = self.model.get_submodule(module).weight.detach()
        if module not in self._originals:
            self._originals[module] = weight.to("cpu", copy=True)
        if self._backup is not None and module not in self._backup:
            master = self._masters.get(module)
            self._backup[module] = (weight.clone(), None if master is None else master.clone())

    # -- atomic batches, undo, the base weights ---------------------------------------------------------------------

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """Inside, everything happens completely or not at all: on any exception the touched weights and masters,
        the method's sequential state, the edit state's batches and the revert log are restored bit for bit."""
        with self.lock:
            if self._backup is not None:  # nested: the outer block restores
                yield
                return
            self._backup = {}
            method = self.method
            method_state = copy_method_state(method)
            batches, reverts = list(self.state.batches), len(self.revert_log)
            try:
                yield
            except BaseException:
                with torch.no_grad():
                    for module, (weight, master) in self._backup.items():
                        self.model.get_submodule(module).weight.copy_(weight)
                        if master is None:
                            self._masters.pop(module, None)
                        else:
                            self._masters[module] = master
                if method is not None:
                    restore_method_state(method, method_state)
                self.state.batches[:] = batches
                del self.revert_log[reverts:]
                raise
            finally:
                self._backup = None

    @contextlib.contextmanager
    def without_edits(self) -> Iterator[None]:
        """The exact original weights inside the block; the edited ones, bit for bit, after it."""
        with self.lock:
            if not self._originals:
                yield
                return
            edited = {module: self.model.get_submodule(module).weight.detach().clone() for module in self._originals}
            try:
                with torch.no_grad():
                    for module, original in self._originals.items():
                        self.model.get_submodule(module).weight.copy_(original)
                yield
            finally:
                with torch.no_grad():
                    for module, weight in edited.items():
                        self.model.get_submodule(module).weight.copy_(weight)

    def revert(self, num_batches: int) -> None:
        """Undo the last `num_batches` batches: the originals, then the remaining batches' factors re-applied in
        order (bit-exact where each batch's update of a matrix was applied as one product, within float32
        round-off of one sum otherwise), and the method's sequential state rebuilt. Atomic; logged."""
        with self.lock:  # the number of batches is read under the lock, with the batches it describes
            self._revert(num_batches)

    def _revert(self, num_batches: int) -> None:
        applied = len(self.state.batches)
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or not 1 <= num_batches <= applied:
            raise ValueError(f"revert: num_batches={num_batches!r} must be an integer between 1 and the number of "
                             f"applied batches ({applied}).")
        with self.atomic():
            reverted = self.state.batches[applied - num_batches:]
            self._restore_originals()
            for record in self.state.batches[:applied - num_batches]:
                for update in record.layers:
                    self.apply(update)
            del self.state.batches[applied - num_batches:]
            self.rebuild_method_state()
            now = datetime.now(timezone.utc).timestamp()
            self.revert_log.extend(revert_event(record, self.state.method, now) for record in reversed(reverted))

    def reset(self) -> None:
        """Undo every applied batch: the original weights, bit for bit."""
        with self.lock:
            if self.state.batches:
                self._revert(len(self.state.batches))

    def _restore_originals(self) -> None:
        for module, original in self._originals.items():
            self._set_weight(module, original, None)

    def apply_batches(self, records: Sequence[BatchRecord]) -> None:
        """Apply recorded batches (published edits) on top of the current state and record them; atomic."""
        with self.atomic():
            for record in records:
                for update in record.layers:
                    self.apply(update)
            self.state.batches.extend(records)
            self.rebuild_method_state()

    def restore(self, weights: Mapping[str, torch.Tensor], masters: Mapping[str, torch.Tensor],
                records: Sequence[BatchRecord]) -> None:
        """Put the engine in a saved state (a checkpoint): `weights` `{module: stored weight}` and `masters`
        `{module: float32 master}` as `edited_tensors` returned them, and the batches that produced them."""
        with self.atomic():
            for module, weight in weights.items():
                self._set_weight(module, weight, masters.get(module))
            self.state.batches[:] = records
            self.rebuild_method_state()

    def follow_model(self) -> None:
        """After the model moved (`to`, `cuda`, ...): masters follow their weights' device, the method, whose
        constants live on the old device, is dropped to be rebuilt (its sequential state from the batches), and the
        forward mode is probed again (a shortcut exact in one dtype or on one device need not be in another)."""
        for module, master in self._masters.items():
            self._masters[module] = master.to(self.model.get_submodule(module).weight.device)
        self.method, self.restraint, self.forward_mode, self.null_space_room = None, None, None, None

    def edited_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """`({module: stored weight}, {module: float32 master})` of every edited matrix, on the CPU."""
        weights = {module: self.model.get_submodule(module).weight.detach().cpu().clone() for module in self._originals}
        return weights, {module: master.detach().cpu().clone() for module, master in self._masters.items()}

    # -- the method's sequential state ----------------------------------------------------------------------------

    def set_method(self, method: Any, restraint: Restraint | None = None) -> None:
        """Adopt a freshly built method (its sequential state describes the base model) and bring its state up to
        the applied batches; the restraint also covers the matrices the method names in `edited_modules`."""
        if restraint is not None:
            restraint.add_modules({module: self.original_weight(module)
                                   for module in getattr(method, "edited_modules", ())})
        self.method, self.restraint = method, restraint
        self._initial_method_state = copy_method_state(method)
        self.rebuild_method_state()

    def rebuild_method_state(self) -> None:
        """The method's sequential state as if exactly `state.batches` had been made: its initial state, then the
        commit of each batch in order (bitwise what editing produced)."""
        if self.method is None:
            return
        restore_method_state(self.method, self._initial_method_state)
        self._initial_method_state = copy_method_state(self.method)  # the commits below update these in place
        for record in self.state.batches:
            self.method.commit(BatchUpdate(record.layers, method_state=record.method_state))

    def run_batch(self, requests: Sequence[EditRequest], collapse_guard: float | None = None) -> BatchReport:
        """Edit one batch with the method (and the restraint), atomically; returns its report. The batch's
        telemetry is recorded with it; a batch after which an edited matrix's `‖W‖_F / ‖W₀‖_F` exceeds
        `collapse_guard` is refused (`CollapseGuardError`, nothing applied)."""
        start = time.perf_counter()
        with self.atomic():
            if self.restraint is not None:
                self.restraint.lift(self.state.batches[-1].layers if self.state.batches else [])
            update = self.method.edit_batch(requests)
            self.method.commit(update)
            layers = update.layers if self.restraint is None else self.restraint.restrain(
                [u for b in self.state.batches for u in b.layers], update.layers)
            record = BatchRecord(len(self.state.batches), list(requests), layers, update.target_losses,
                                 update.target_steps, update.target_probabilities, update.timings, time.time(),
                                 method_state=update.method_state)
            self.state.batches.append(record)
            telemetry = self.batch_telemetry(record, update)
            record.telemetry = telemetry.to_dict()
            check_collapse_guard(record, telemetry, collapse_guard)
        self.warn_when_room_runs_out(telemetry, len(requests))
        return BatchReport(record.index, len(requests), time.perf_counter() - start, update.timings,
                           update.target_losses, update.target_steps, update.target_probabilities,
                           record.update_norms, telemetry)

    def batch_telemetry(self, record: BatchRecord, update: BatchUpdate) -> BatchTelemetry:
        """The collapse telemetry of `record`, the batch just applied (`update`: what the method reported)."""
        room = self.null_space_room(self.state.batches) if self.null_space_room is not None else {}
        deltas: dict[str, torch.Tensor] = {}
        layer_of: dict[str, int] = {}
        for layer_update in record.layers:
            module = self.module_name(layer_update)
            delta = layer_update.delta
            deltas[module] = deltas[module] + delta if module in deltas else delta
            layer_of[module] = layer_update.layer
        layers = []
        for module, delta in deltas.items():
            layer = layer_of[module]
            rewrite = module == self.spec.rewrite_module_name(layer)
            current = self._masters.get(module, self.weight(module))
            layers.append(LayerTelemetry(
                layer, module, float(torch.linalg.matrix_norm(delta.float())),
                float(torch.linalg.matrix_norm(current.detach().float())),
                float(torch.linalg.matrix_norm(self.original_weight(module).float())),
                update.solve_conditions.get(layer) if rewrite else None,
                room[layer].left if rewrite and layer in room else None))
        return BatchTelemetry(layers, list(update.target_norms), list(update.target_shift_norms),
                              list(update.hidden_norms))

    def warn_when_room_runs_out(self, telemetry: BatchTelemetry, batch_edits: int) -> None:
        """Warn (once per layer) when an edited layer has fewer null-space directions left than the batch just
        applied had edits: once they are all spanned, later edits there share directions with earlier ones, which
        the solve trades off (on SmolLM2 efficacy then declines slowly and specificity more, not at once)."""
        for layer in telemetry.layers:
            left = layer.null_space_left
            if left is None or left >= batch_edits or layer.layer in self._room_warned:
                continue
            self._room_warned.add(layer.layer)
            logger.warning(
                "layer %d: %d null-space directions left after %d edits, fewer than this batch's %d: from here on "
                "edits at this layer share directions with earlier edits and the solve trades new edits off against "
                "old ones (the preserved keys stay protected: every update still lies in their null space; measured "
                "on SmolLM2: a slow decline of efficacy and specificity, see the README's lifelong section). A "
                "projector with more room (a higher nullspace_threshold) protects less of what the model knew.",
                layer.layer, left, self.state.num_edits, batch_edits)

    @contextlib.contextmanager
    def editing_mode(self) -> Iterator[None]:
        """Eval mode, frozen parameters and gradients enabled (also under a caller's `torch.no_grad()` or
        `inference_mode()`) while editing; everything restored afterwards, whatever happens."""
        with self.lock:
            flags = {name: p.requires_grad for name, p in self.model.named_parameters()}
            was_training = self.model.training
            try:
                self.model.eval()
                self.model.requires_grad_(False)
                with torch.inference_mode(False), torch.enable_grad():
                    yield
            finally:
                for name, p in self.model.named_parameters():
                    p.requires_grad_(flags[name])
                self.model.train(was_training)


def check_collapse_guard(record: BatchRecord, telemetry: BatchTelemetry, collapse_guard: float | None) -> None:
    """Raise `CollapseGuardError` when the batch `record` grew an edited matrix past `collapse_guard`."""
    if collapse_guard is None or telemetry.max_weight_growth <= collapse_guard:
        return
    worst = max(telemetry.layers, key=lambda layer: layer.weight_growth)
    raise CollapseGuardError(
        f"collapse_guard: batch {record.index} ({len(record.requests)} edits) would grow {worst.module} to "
        f"{worst.weight_growth:.4f}x its original Frobenius norm ({worst.weight_norm:.4g} against "
        f"{worst.original_norm:.4g}), past collapse_guard={collapse_guard:g}; the batch was not applied. Edit "
        "these requests in smaller batches or with a smaller step, revert earlier batches, or raise "
        "EditingArguments.collapse_guard (None turns it off).")


def refuse_offloaded_layers(model: nn.Module, spec: ModelSpec, layers: Sequence[int]) -> None:
    """Raise `ValueError` naming the first of `layers` whose edited matrix `device_map` offloaded (to the CPU of a
    GPU machine, or to disk): accelerate loads such a weight for each forward, so it cannot be edited in place."""
    for layer in layers:
        module = spec.rewrite_module(model, layer)
        if has_offloaded_params(module) or module.weight.device.type == "meta":
            raise ValueError(
                f"layers: layer {layer} ({spec.rewrite_module_name(layer)}) is offloaded by the device_map, and an "
                "offloaded weight cannot be edited in place. Keep the edited layers on a device: give "
                f"'{spec.block_name(layer)}' a GPU in the device_map (or 'cpu' on a machine without one), raise "
                "max_memory, or edit other layers.")


def copy_method_state(method: Any) -> dict[str, dict[Any, torch.Tensor]]:
    """Copies of the tensors a method's `commit` changes (its `sequential_state`, e.g. AlphaEdit's previous-edit
    Gram matrices); a method that does not declare it gets every dict-of-tensors attribute copied."""
    if method is None:
        return {}
    names = getattr(method, "sequential_state", None)
    if names is None:
        names = [name for name, value in vars(method).items()
                 if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values())]
    return {name: {k: v.clone() for k, v in getattr(method, name).items()} for name in names}


def restore_method_state(method: Any, state: Mapping[str, Mapping[Any, torch.Tensor]]) -> None:
    """Put back what `copy_method_state` copied."""
    for name, value in state.items():
        setattr(method, name, dict(value))

