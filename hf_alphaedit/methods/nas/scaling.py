"""NAS, Norm-Anchor Scaling (Liu et al. 2026, "Norm Anchors Make Model Edits Last", arXiv 2602.02543).

Locate-then-edit methods optimise, per request, a delta `δ` `[d]` added to the z-layer block's output at the lookup
token (ALGORITHMS.md §3), so the target is `z = h_init + δ`. NAS reads `δ` as a change of the z-layer's MLP output
instead: with `v0` the output of the edited projection (`spec.rewrite_module`) at the lookup token of the request's
bare prompt (template "{}"), the residual stream before the MLP is `r = h_init − v0` and the desired MLP output is
`v* = v0 + δ`. The paper ties the collapse of long edit sequences to the growth of such norms; NAS pins `‖v*‖`:

    anchor = upper-trimmed mean of ‖v*‖ over sampled requests on the unedited model (largest floor(n/20) dropped)
    v*    := v0                       if ‖v*‖ > 2 · anchor   (the request's δ is dropped)
    v*    := anchor · v* / ‖v*‖       otherwise
    z     := r + v*

Everything after the targets (keys, the residual spread over the layers, the solve) is unchanged. The reference
(`util/vstar_stats.py`) draws its samples at random (seed 0) from MultiCounterFact and optimises them with the MEMIT
settings on bare prompts only, jointly in batches of 16 with a batch-mean loss; here the first records given are
optimised exactly as the run's edits are (its settings, every context template, one Adam state and early stop per
request), so the anchor describes the very `v*` it rescales.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ...architectures import ModelSpec, block_output_hidden
from ...errors import check_finite
from ...forward import right_pad, run_until
from ...hparams import ResolvedHyperparameters
from ...requests import EditRequest
from ..prompts import encode_with_subject
from ..targets import ForwardMode, TargetOptimizer, TargetResult

logger = logging.getLogger(__name__)

NAS_PAPER = 'Liu et al., "Norm Anchors Make Model Edits Last", 2026, arXiv:2602.02543'

SKIP_FACTOR = 2.0  # a v* longer than this many anchors is dropped instead of rescaled
TRIM_DIVISOR = 20  # the largest floor(n / 20) norms (the reference's upper 5 %) do not enter the anchor
_ZERO_NORM = 1e-10  # the reference's eps: a v* shorter than this has no direction to rescale along


@dataclass(frozen=True)
class NormAnchor:
    """The anchor of one z-layer: the upper-trimmed mean of `‖v*‖` over `len(norms)` requests."""

    value: float
    layer: int
    norms: tuple[float, ...]  # ‖v*‖ of every sampled request, in record order
    dropped: int  # how many of the largest norms the mean left out

    @property
    def raw_mean(self) -> float:
        """The untrimmed mean of `norms`."""
        return sum(self.norms) / len(self.norms)

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "layer": self.layer, "norms": list(self.norms), "dropped": self.dropped}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> NormAnchor:
        return cls(float(values["value"]), int(values["layer"]), tuple(float(x) for x in values["norms"]),
                   int(values["dropped"]))


def upper_trimmed_mean(values: Sequence[float]) -> tuple[float, int]:
    """`(mean, dropped)`: the mean of `values` without their `dropped = floor(len / 20)` largest ones."""
    if not values:
        raise ValueError("upper_trimmed_mean: no values; give at least one.")
    ordered = sorted(values)
    dropped = len(ordered) // TRIM_DIVISOR
    kept = ordered[:len(ordered) - dropped]
    return sum(kept) / len(kept), dropped


def mlp_outputs_at_lookup(model: nn.Module, tokenizer: Any, spec: ModelSpec, hparams: ResolvedHyperparameters,
                          requests: Sequence[EditRequest]) -> torch.Tensor:
    """`v0` `[n, d]` (float32, on the CPU): the z-layer rewrite module's output at the lookup token of each request's
    bare prompt (the first rewriting prompt of target optimisation, whose `h_init` it splits), on the model as it is.
    """
    items = []
    for request in requests:
        prefix, suffix = request.split_prompt()
        items.append((prefix, request.subject, suffix))
    encoded = encode_with_subject(tokenizer, items, hparams.fact_token)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    input_ids, attention_mask = right_pad([ids for ids, _ in encoded], pad_id, device)
    lookup = torch.tensor([position for _, position in encoded], device=device)
    module = spec.rewrite_module(model, hparams.z_layer)
    captured: dict[str, torch.Tensor] = {}

    def keep(_m: nn.Module, _a: Any, out: Any) -> None:
        captured["v0"] = block_output_hidden(out).detach()

    handle = module.register_forward_hook(keep)
    try:
        with torch.no_grad():
            run_until(model, module, input_ids=input_ids, attention_mask=attention_mask)
    finally:
        handle.remove()
    outputs = captured["v0"].reshape(len(items), -1, spec.hidden_size)  # OPT's MLP flattens the tokens
    v0 = outputs[torch.arange(len(items), device=device), lookup].float().cpu()
    check_finite(v0, f"the outputs of {spec.rewrite_module_name(hparams.z_layer)}",
                 "the model's activations there are not finite (check its weights); nothing was applied")
    return v0


def rescale_to_anchor(values: torch.Tensor, initial_hidden: torch.Tensor, mlp_outputs: torch.Tensor,
                      anchor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NAS targets `z' = r + v*'` `[n, d]` (float32) from targets `z` `values`, `h_init` `initial_hidden` and `v0`
    `mlp_outputs` (all `[n, d]`), computed in float64: `v* = v0 + (z − h_init)` is rescaled to norm `anchor`, or
    replaced by `v0` when `‖v*‖ > 2·anchor`; `r = h_init − v0`. Also returns which requests' `δ` was dropped, `[n]`
    bool. An `anchor` ≤ 0 leaves the targets as they are."""
    if anchor <= 0:
        return values.float(), torch.zeros(len(values), dtype=torch.bool)
    z, h_init, v0 = values.double(), initial_hidden.double(), mlp_outputs.double()
    v_star = v0 + (z - h_init)
    norm = v_star.norm(dim=1, keepdim=True)
    scaled = torch.where(norm > _ZERO_NORM, v_star * (anchor / norm.clamp_min(_ZERO_NORM)), v_star)
    dropped = norm > SKIP_FACTOR * anchor
    v_star = torch.where(dropped, v0, scaled)
    return ((h_init - v0) + v_star).float(), dropped.squeeze(1)


def compute_norm_anchor(model: nn.Module, tokenizer: Any, spec: ModelSpec, hparams: ResolvedHyperparameters,
                        templates: Sequence[str], requests: Sequence[EditRequest], *, batch_tokens: int = 4096,
                        memory_budget: str | int | None = None, mode: ForwardMode = "prefix_cache",
                        show_progress: bool = False) -> NormAnchor:
    """The anchor of the z-layer: targets of `requests` optimised with `hparams` and `templates` (as edits are, by
    `TargetOptimizer`), `‖v*‖ = ‖v0 + δ‖` `[n]` of each, and their upper-trimmed mean. Reads the model as it is:
    call it on the unedited weights."""
    targets = TargetOptimizer(model, tokenizer, spec, hparams, templates, batch_tokens=batch_tokens,
                              memory_budget=memory_budget, mode=mode, show_progress=show_progress).optimize(requests)
    v0 = mlp_outputs_at_lookup(model, tokenizer, spec, hparams, requests)
    norms = (v0.double() + (targets.values.double() - targets.initial_hidden.double())).norm(dim=1).tolist()
    value, dropped = upper_trimmed_mean(norms)
    return NormAnchor(value, hparams.z_layer, tuple(norms), dropped)


class NormAnchorScaling:
    """`EditContext.rescale_targets` for NAS: each batch's targets rescaled to `anchor` (`rescale_to_anchor`), with
    `v0` read from the model as it is when the targets were optimised.

    The losses, steps and target probabilities of the returned `TargetResult` still describe the optimised `δ`.
    """

    def __init__(self, anchor: NormAnchor, model: nn.Module, tokenizer: Any, spec: ModelSpec,
                 hparams: ResolvedHyperparameters) -> None:
        if anchor.layer != hparams.z_layer:
            raise ValueError(f"NormAnchorScaling: the anchor is of layer {anchor.layer}, but the targets are at the "
                             f"z-layer {hparams.z_layer}; compute the anchor with these hyperparameters.")
        self.anchor = anchor
        self.model, self.tokenizer, self.spec, self.hparams = model, tokenizer, spec, hparams

    def __call__(self, requests: Sequence[EditRequest], targets: TargetResult) -> TargetResult:
        """`targets` (values `[n, d]`) of `requests` with NAS values; `initial_hidden` unchanged."""
        v0 = mlp_outputs_at_lookup(self.model, self.tokenizer, self.spec, self.hparams, requests)
        values, dropped = rescale_to_anchor(targets.values, targets.initial_hidden, v0, self.anchor.value)
        if dropped.any():
            logger.info("NAS: %d of %d request(s) have ‖v*‖ above %g x the anchor %.4g; their targets keep the MLP "
                        "output v0 (their δ is dropped)", int(dropped.sum()), len(requests), SKIP_FACTOR,
                        self.anchor.value)
        return replace(targets, values=values)
