from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...architectures import ModelSpec, round_half_up
from ...forward import right_pad
from ...requests import EditRequest
from ...updates import BatchUpdate, LayerUpdate
from ..base import EditContext
from ..prompts import target_token_ids
from .config import FTConfig


@dataclass
class _Example:
    """One request as a token sequence and the `(logits position, target token)` pairs its loss reads."""

    ids: list[int]
    labels: list[tuple[int, int]]


class FineTune:
    """Constrained fine-tuning (§6.2) of the edited projection `W_l` `[d, d_k]` of every edited layer.

    The trained variable is `Δ_l` `[d, d_k]` (float32, from zero), added to the projection's output as `x Δ_lᵀ`:
    the model's own weights stay untouched while training, the L∞ box is `|Δ_l| ≤ ε` elementwise (the
    reference clamps `W` into `[W₀ − ε, W₀ + ε]`, the same set), and Adam sees exactly the gradients it sees on
    `W` (weight decay is added as `wd · (W₀ + Δ)`, as `torch.optim.Adam` does on `W`). Only weights are
    trained: for GPT-2 the reference also trains `c_proj.bias`, which the engine's factored updates (undo, LoRA
    export) do not cover. The result is applied through `context.apply_update` as the exact thin factorisation
    `Δ = I_d · Δ` (or `Δ · I_{d_k}` when `d > d_k`); FT has no keys (`keys` is `[0, d_k]`).
    """

    title = "FT"
    paper = 'Zhu et al., "Modifying Memories in Transformer Models", 2020, arXiv:2012.00363'

    sequential_state: tuple[str, ...] = ()  # `commit` keeps nothing

    @staticmethod
    def default_layers(spec: ModelSpec, locate_then_edit_layers: tuple[int, ...],
                       config: FTConfig | None) -> tuple[int, ...]:
        """One layer (§11.4, §11.7): 0 with the L∞ box (the reference's constrained files), `round(0.66·N)`
        without it (Llama-3-8B: 21)."""
        constrained = (config if config is not None else FTConfig()).norm_constraint is not None
        return (0,) if constrained else (round_half_up(0.66 * spec.num_layers),)

    def __init__(self, context: EditContext, config: FTConfig | None = None) -> None:
        self.context = context
        self.config = config if config is not None else FTConfig()

    def commit(self, update: BatchUpdate) -> None:
        """FT keeps no state between batches."""

    def edit_batch(self, requests: Sequence[EditRequest]) -> BatchUpdate:
        ctx, cfg = self.context, self.config
        start = time.perf_counter()
        device = next(ctx.model.parameters()).device
        spec = ctx.spec
        deltas = {layer: torch.zeros(spec.hidden_size, spec.key_size, device=device, requires_grad=True)
                  for layer in ctx.hparams.layers}
        examples = [self.example(request) for request in requests]
        chunks = [examples[i: i + cfg.chunk_size] for i in range(0, len(examples), cfg.chunk_size)]
        optimizer = torch.optim.Adam(list(deltas.values()), lr=cfg.lr)
        epochs = 0
        with self.trained(deltas), torch.enable_grad():
            for _ in range(cfg.num_steps):
                epochs += 1
                total = 0.0
                for chunk in chunks:
                    loss = self.losses(chunk).mean()
                    total += float(loss) * len(chunk)
                    if float(loss) >= cfg.early_stop_loss:
                        optimizer.zero_grad()
                        loss.backward()
                        self._add_weight_decay(deltas)
                        optimizer.step()
                    if cfg.norm_constraint is not None:
                        with torch.no_grad():
                            for delta in deltas.values():
                                delta.clamp_(-cfg.norm_constraint, cfg.norm_constraint)
                if total / len(examples) < cfg.early_stop_loss:
                    break
            with torch.no_grad():
                final = torch.cat([self.losses(chunk) for chunk in chunks]).cpu()
        seconds = time.perf_counter() - start
        updates = [ctx.apply_update(_thin_update(layer, delta.detach())) for layer, delta in deltas.items()]
        return BatchUpdate(updates, final.tolist(), [epochs] * len(examples), torch.exp(-final).tolist(),
                           {"train": seconds})

    def example(self, request: EditRequest) -> _Example:
        """The request's token ids and loss labels under the configured objective."""
        prompt = self.context.tokenizer(request.prompt_with_subject)["input_ids"]
        target = target_token_ids(self.context.tokenizer, request.target_new)
        last = len(prompt) - 1
        if self.config.objective == "prompt_last":
            return _Example(prompt, [(last, token) for token in target])
        return _Example(prompt + target[:-1], [(last + m, token) for m, token in enumerate(target)])

    def losses(self, examples: Sequence[_Example]) -> torch.Tensor:
        """Per-request loss `[n]`: the mean over its labels of `−log p(token | position)` (padding never scored)."""
        ctx = self.context
        device = next(ctx.model.parameters()).device
        pad_id = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else 0
        input_ids, attention_mask = right_pad([e.ids for e in examples], pad_id, device)
        logits = ctx.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        owners = torch.tensor([i for i, e in enumerate(examples) for _ in e.labels], device=device)
        positions = torch.tensor([p for e in examples for p, _ in e.labels], device=device)
        tokens = torch.tensor([t for e in examples for _, t in e.labels], device=device)
        weights = torch.tensor([1.0 / len(e.labels) for e in examples for _ in e.labels], device=device)
        log_probs = torch.log_softmax(logits[owners, positions].float(), dim=-1)
        token_log_probs = log_probs.gather(1, tokens[:, None])[:, 0]
        return torch.zeros(len(examples), device=device).index_add(0, owners, -token_log_probs * weights)

    @contextlib.contextmanager
    def trained(self, deltas: dict[int, torch.Tensor]) -> Iterator[None]:
        """Within the context the edited projection of each layer computes `x (W + Δ)ᵀ (+ b)`."""
        def make_hook(delta: torch.Tensor):
            def hook(_module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
                return output + (args[0].to(delta.dtype) @ delta.T).to(output.dtype)
            return hook

        handles = [self.context.spec.rewrite_module(self.context.model, layer).register_forward_hook(make_hook(d))
                   for layer, d in deltas.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _add_weight_decay(self, deltas: dict[int, torch.Tensor]) -> None:
        if not self.config.weight_decay:
            return
        with torch.no_grad():
            for layer, delta in deltas.items():
                weight = self.context.spec.weight(self.context.model, layer).float()
                delta.grad.add_(weight + delta, alpha=self.config.weight_decay)


def _thin_update(layer: int, delta: torch.Tensor) -> LayerUpdate:
    """`delta` `[d, d_k]` as exact factors of rank `min(d, d_k)` (a product with an identity is exact)."""
    d, d_k = delta.shape
    if d <= d_k:
        left, right = torch.eye(d, device=delta.device), delta
    else:
        left, right = delta, torch.eye(d_k, device=delta.device)
    return LayerUpdate(layer, left, right.contiguous(), delta.new_zeros(0, d_k))
