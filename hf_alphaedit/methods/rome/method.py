from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch

from ...architectures import ModelSpec, round_half_up
from ...forward import right_pad, run_until
from ...hparams import CONTEXT_SEED_WORDS, ResolvedHyperparameters
from ...requests import EditRequest
from ...updates import BatchUpdate, LayerUpdate
from ..base import EditContext
from ..prompts import encode_with_subject, generate_context_templates
from ..targets import TargetOptimizer, TargetResult
from .config import REFERENCE_TARGET_SETTINGS, RomeConfig

_GATED_V_WEIGHT_DECAY = 1e-3
_GPT_V_WEIGHT_DECAY = 0.5


class Rome:
    """ROME (§6.1), one rank-one update per request and edited layer, applied at once.

    For request `r` at layer `l`, on the weights left by the previous request:
    `u = C₀⁻¹k̄ / ‖C₀⁻¹k̄‖` (or `k̄ / ‖k̄‖` without `mom2_adjustment`), with `k̄` `[d_k]` the uniform mean of the
    keys over ROME's templates; `v*` `[d]` the MLP output that makes the model emit the target (§3.8); `k`, `w`
    the key and the projection's output on the raw prompt (`key_mode="reference"`) or their template means
    (`"averaged"`); then `ΔW = ρ uᵀ` with `ρ = (v* − w) / (k·u)`, so that `ΔW k = v* − w`. The batch's update
    of a layer stacks the factors: `left = [ρ_1 … ρ_n]` `[d, n]`, `right = [u_1 … u_n]ᵀ` `[n, d_k]`.
    """

    title = "ROME"
    paper = 'Meng et al., "Locating and Editing Factual Associations in GPT", NeurIPS 2022, arXiv:2202.05262'

    sequential_state: tuple[str, ...] = ()  # `commit` keeps nothing; the covariance factors are constants

    @staticmethod
    def reference_hyperparameters(reference_file: str) -> dict[str, float]:
        """ROME's own reference values of the shared target settings (`preset="reference"`, §11.3)."""
        return dict(REFERENCE_TARGET_SETTINGS[reference_file])

    @staticmethod
    def default_layers(spec: ModelSpec, locate_then_edit_layers: tuple[int, ...], config: Any) -> tuple[int, ...]:
        """One layer (§11.7): the second MEMIT layer for gated-MLP models (Llama-3-8B: 5), the last for GPT-style
        ones (GPT-2 XL: 17), `round(0.18·N)` for GPT-J (5)."""
        if spec.model_type == "gptj":
            return (round_half_up(0.18 * spec.num_layers),)
        if spec.layer_style == "gated" and len(locate_then_edit_layers) > 1:
            return (locate_then_edit_layers[1],)
        return (locate_then_edit_layers[-1],)

    def __init__(self, context: EditContext, config: RomeConfig | None = None) -> None:
        self.context = context
        self.config = config if config is not None else RomeConfig()
        spec, hp = context.spec, context.hparams
        gated = spec.layer_style == "gated"
        mom2_adjustment = not gated if self.config.mom2_adjustment is None else self.config.mom2_adjustment
        weight_decay = self.config.rome_v_weight_decay
        if weight_decay is None:
            weight_decay = _GATED_V_WEIGHT_DECAY if gated else _GPT_V_WEIGHT_DECAY
        self.target_hparams: dict[int, ResolvedHyperparameters] = {
            layer: dataclasses.replace(hp, layers=(layer,), clamp_norm_factor=self.config.rome_clamp_norm_factor,
                                       v_weight_decay=weight_decay)
            for layer in hp.layers}
        self.templates = rome_context_templates(context.model, context.tokenizer, self.config,
                                                keep_special_tokens=hp.context_template_special_tokens)
        self.covariance_factors: dict[int, torch.Tensor] = (
            _covariance_factors(context, hp.layers) if mom2_adjustment else {})

    def target_optimizer(self, layer: int) -> TargetOptimizer:
        """The optimiser of `v*` at `layer` (§3.8): δ added to the edited projection's output, ROME's templates."""
        ctx = self.context
        return TargetOptimizer(ctx.model, ctx.tokenizer, ctx.spec, self.target_hparams[layer], self.templates,
                               batch_tokens=ctx.target_batch_tokens, memory_budget=ctx.target_memory_budget,
                               mode=ctx.forward_mode,
                               show_progress=False, site="mlp_output")

    def edit_batch(self, requests: Sequence[EditRequest]) -> BatchUpdate:
        layers = self.context.hparams.layers
        timings = {"targets": 0.0, "keys": 0.0, "solve": 0.0}
        parts: dict[int, list[LayerUpdate]] = {layer: [] for layer in layers}
        results: list[TargetResult] = []
        for request in requests:
            for layer in layers:
                update, result = self._edit(request, layer, timings)
                parts[layer].append(update)
            results.append(result)  # the last layer's target optimisation, like the z-layer of MEMIT
        updates = [LayerUpdate.stack(layer, parts[layer], torch.cat([p.keys for p in parts[layer]]))
                   for layer in layers]
        return BatchUpdate(updates, [r.losses[0] for r in results], [r.steps[0] for r in results],
                           [r.target_probabilities[0] for r in results], timings)

    def commit(self, update: BatchUpdate) -> None:
        """ROME keeps no state between batches."""

    def _edit(self, request: EditRequest, layer: int,
              timings: dict[str, float]) -> tuple[LayerUpdate, TargetResult]:
        """Compute and apply one request's rank-one update at `layer`; returns it as applied."""
        start = time.perf_counter()
        keys, outputs = self.projection_io(request, layer)
        mean_key = keys.mean(dim=0).double()
        factor = self.covariance_factors.get(layer)
        direction = mean_key if factor is None else torch.cholesky_solve(mean_key[:, None], factor)[:, 0]
        direction = direction / direction.norm()
        timings["keys"] += time.perf_counter() - start
        start = time.perf_counter()
        result = self.target_optimizer(layer).optimize([request])
        timings["targets"] += time.perf_counter() - start
        start = time.perf_counter()
        if self.config.key_mode == "reference":
            key, current = keys[0].double(), outputs[0].double()  # template 0 is the raw prompt
        else:
            key, current = mean_key, outputs.mean(dim=0).double()
        target = result.values[0].to(key.device, torch.float64)
        right_vector = (target - current) / (key @ direction)
        update = LayerUpdate(layer, right_vector[:, None].float(), direction[None, :].float(), key[None, :].float())
        applied = self.context.apply_update(update)
        timings["solve"] += time.perf_counter() - start
        return applied, result

    def projection_io(self, request: EditRequest, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Input `[T, d_k]` and output `[T, d]` (float32) of the edited projection of `layer` at the lookup
        position of the request's prompt in each of ROME's `T` templates (row 0: the raw prompt)."""
        ctx = self.context
        prefix, suffix = request.split_prompt()
        items = [(template.split("{}")[0] + prefix, request.subject, suffix) for template in self.templates]
        encoded = encode_with_subject(ctx.tokenizer, items, ctx.hparams.fact_token)
        device = next(ctx.model.parameters()).device
        pad_id = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else 0
        input_ids, attention_mask = right_pad([ids for ids, _ in encoded], pad_id, device)
        rows = torch.arange(len(encoded), device=device)
        lookup = torch.tensor([position for _, position in encoded], device=device)
        captured: dict[str, torch.Tensor] = {}

        def at_lookup(tokens: torch.Tensor) -> torch.Tensor:
            return tokens.reshape(len(encoded), -1, tokens.shape[-1])[rows, lookup].float()  # OPT flattens tokens

        def hook(_module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            captured["keys"], captured["outputs"] = at_lookup(args[0]), at_lookup(output)

        handle = ctx.spec.rewrite_module(ctx.model, layer).register_forward_hook(hook)
        try:
            with torch.no_grad():
                run_until(ctx.model, ctx.spec.block(ctx.model, layer), input_ids=input_ids,
                          attention_mask=attention_mask)
        finally:
            handle.remove()
        return captured["keys"], captured["outputs"]


def rome_context_templates(model: torch.nn.Module, tokenizer: Any, config: RomeConfig,
                           keep_special_tokens: bool = False) -> list[str]:
    """`["{}"]` plus `rome_templates_per_length` seeded samples of each length in `rome_template_lengths` (§3.8:
    21 templates by default), each ending in `". {}"`; the seed words take turns as in the reference
    (`keep_special_tokens`: see `generate_context_templates`)."""
    templates = ["{}"]
    per_round = len(CONTEXT_SEED_WORDS)
    calls = 0
    for length in config.rome_template_lengths:
        for first in range(0, config.rome_templates_per_length, per_round):
            count = min(per_round, config.rome_templates_per_length - first)
            samples = generate_context_templates(model, tokenizer, length, count,
                                                 seed=config.rome_template_seed + calls,
                                                 keep_special_tokens=keep_special_tokens)
            templates.extend(samples[1:])
            calls += 1
    return templates


def _covariance_factors(context: EditContext, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Cholesky factors `[d_k, d_k]` (float64) of the mean key second moment `C₀` of each layer."""
    statistics = context.statistics(layers)
    device = next(context.model.parameters()).device
    factors = {}
    for layer in layers:
        moment = statistics.second_moment(layer).to(device, torch.float64)
        factor, info = torch.linalg.cholesky_ex(moment)
        if int(info) != 0:
            raise ValueError(f"RomeConfig.mom2_adjustment: the key second moment of layer {layer} is singular "
                             f"(rank < {moment.shape[0]}); collect more statistics (EditingArguments."
                             "statistics_samples) or set mom2_adjustment=False.")
        factors[layer] = factor
    return factors


__all__ = ["Rome", "rome_context_templates"]
