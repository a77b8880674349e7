from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import torch

from ...requests import EditRequest
from ...updates import BatchUpdate, LayerUpdate
from ..base import EditContext
from ..keys import LayerKeyReader
from ..memit import Memit, MemitConfig
from ..targets import TargetResult
from .config import REFERENCE_ERROR_BOUNDS, REFERENCE_MOM2_UPDATE_WEIGHT, NSEConfig

_GPTJ_NEURON_THRESHOLD = 0.8


class NSE(Memit):
    """NSE (§9.1): sequential MEMIT (`A = λ C₀ + C_p + K Kᵀ`, §5.3) with three changes.

    1. Targets from the original model. The reference precomputes `z` for the whole dataset before editing; a
       sequential run cannot see future requests, so each batch's `z` is optimised with the edited layers'
       weights temporarily set back to `W₀` (their values when the method was built): the same targets.
    2. Neuron selection: each layer's solve is restricted to the key dimensions `S` with the largest `Σ|K|`
       over the solved requests (cumulative share ≤ `neuron_threshold`); `ΔW[:, S] = R (A[S,S]⁻¹ K_S)ᵀ`, the
       other columns stay zero.
    3. Re-editing: up to `max_iterations` checks of `‖z − h‖` on all requests at the z-layer; while it is not
       the last check, the requests with `alpha < ‖z − h‖ < upper_bound` get a full layer pass (§5.1).
    Finally `C_p += K Kᵀ` with every request's keys on the edited model. A layer's update stacks the factors
    of all passes (`left` `[d, m]`, `right` `[m, d_k]`, `m` = requests edited summed over passes).
    """

    title = "NSE"
    paper = ('Jiang et al., "Neuron-Level Sequential Editing for Large Language Models", '
             '2024, arXiv:2410.04045')

    @staticmethod
    def reference_hyperparameters(reference_file: str) -> dict[str, float]:
        """NSE's own reference value of the shared `mom2_update_weight` (`preset="reference"`, §9.1)."""
        return {"mom2_update_weight": REFERENCE_MOM2_UPDATE_WEIGHT[reference_file]}

    def __init__(self, context: EditContext, config: NSEConfig | None = None) -> None:
        super().__init__(context, MemitConfig(protect_previous_edits=True))
        self.nse_config = config if config is not None else NSEConfig()
        spec = context.spec
        self.neuron_threshold = self.nse_config.neuron_threshold
        if self.neuron_threshold is None:
            self.neuron_threshold = _GPTJ_NEURON_THRESHOLD if spec.model_type == "gptj" else 1.0
        self.original_weights = tuple(spec.weight(context.model, layer).detach().clone()
                                      for layer in context.hparams.layers)

    def optimize_targets(self, requests: Sequence[EditRequest]) -> TargetResult:
        with self.original_model():
            return super().optimize_targets(requests)

    @contextlib.contextmanager
    def original_model(self) -> Iterator[None]:
        """Within the context the edited layers hold their original weights `W₀` (bit for bit restored after)."""
        ctx = self.context
        weights = [ctx.spec.weight(ctx.model, layer) for layer in ctx.hparams.layers]
        current = [weight.detach().clone() for weight in weights]
        with torch.no_grad():
            for weight, original in zip(weights, self.original_weights, strict=True):
                weight.copy_(original)
        try:
            yield
        finally:
            with torch.no_grad():
                for weight, value in zip(weights, current, strict=True):
                    weight.copy_(value)

    def selected_neurons(self, keys: torch.Tensor) -> torch.Tensor:
        """Ascending indices `[s]` of the key dimensions with the largest `Σ_requests |k|` whose cumulative sum
        stays within `neuron_threshold` of the total (at least one), for keys `[n, d_k]`."""
        scores, order = keys.double().abs().sum(dim=0).sort(descending=True)
        cumulative = scores.cumsum(dim=0)
        count = int(torch.searchsorted(cumulative, self.neuron_threshold * cumulative[-1], right=True))
        return order[:max(count, 1)].sort().values

    def solve(self, layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        selected = self.selected_neurons(keys)
        keys64 = keys.T.double()[selected]  # [s, n]
        system = self.preserved[layer][selected][:, selected] + keys64 @ keys64.T
        factors, pivots = torch.linalg.lu_factor(system)  # what linalg.solve does, kept for the condition estimate
        self.note_condition(layer, system, lambda vectors: torch.linalg.lu_solve(factors, pivots, vectors))
        right = keys64.new_zeros(keys.shape)  # [n, d_k]
        right[:, selected] = torch.linalg.lu_solve(factors, pivots, keys64).T
        return right

    def error_bounds(self, targets: TargetResult) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-request `(alpha, upper_bound)` `[n]` each: the configured values, else the reference file's
        absolute ones under `preset="reference"`, else fractions of `‖h_init‖`."""
        cfg = self.nse_config
        norms = targets.initial_hidden.norm(dim=1).double()
        reference_file = self.context.hparams.reference_file
        ref_alpha, ref_upper = REFERENCE_ERROR_BOUNDS[reference_file] if reference_file else (None, None)

        def bound(value: float | None, reference: float | None, fraction: float) -> torch.Tensor:
            value = value if value is not None else reference
            return norms * fraction if value is None else torch.full_like(norms, value)

        return (bound(cfg.alpha, ref_alpha, cfg.alpha_fraction),
                bound(cfg.upper_bound, ref_upper, cfg.upper_bound_fraction))

    def edit_batch(self, requests: Sequence[EditRequest]) -> BatchUpdate:
        ctx, hp = self.context, self.context.hparams
        self.solve_conditions = {}
        timings = {"targets": 0.0, "keys": 0.0, "solve": 0.0}
        start = time.perf_counter()
        targets = self.optimize_targets(requests)
        timings["targets"] = time.perf_counter() - start
        alpha, upper = self.error_bounds(targets)
        z = targets.values.double()
        parts: dict[int, list[LayerUpdate]] = {layer: [] for layer in hp.layers}
        for check in range(self.nse_config.max_iterations):
            start = time.perf_counter()
            reader = LayerKeyReader(ctx.model, ctx.tokenizer, ctx.spec, hp, ctx.context_templates, requests,
                                    use_block_runner=ctx.forward_mode != "full")
            first_keys, outputs = reader.read(0)
            timings["keys"] += time.perf_counter() - start
            error = (z - outputs.cpu().double()).norm(dim=1)
            kept = ((error > alpha) & (error < upper)).nonzero().flatten().tolist()
            if not kept or check == self.nse_config.max_iterations - 1:
                break
            for update in self.edit_layers([requests[i] for i in kept], targets.values[kept], timings):
                parts[update.layer].append(update)
        start = time.perf_counter()
        # The weights did not change since the last check, so its reader gives every request's final keys.
        keys = [first_keys] + [reader.read(i)[0] for i in range(1, len(hp.layers))]
        timings["keys"] += time.perf_counter() - start
        empty = LayerUpdate(hp.layers[0], first_keys.new_zeros(ctx.spec.hidden_size, 0),
                            first_keys.new_zeros(0, ctx.spec.key_size), first_keys.new_zeros(0, ctx.spec.key_size))
        updates = [LayerUpdate.stack(layer, parts[layer] or [empty], layer_keys.float())
                   for layer, layer_keys in zip(hp.layers, keys, strict=True)]
        return self.batch_update(updates, targets, timings)
