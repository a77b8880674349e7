"""The pieces of a MEND edit that touch the language model (ALGORITHMS.md §8.2, §8.4, §8.5).

Nothing here patches a module: the gradient factors are read with forward hooks during a
`torch.func.functional_call` that gives the inner parameters detached leaves (so only their outputs' gradients are
computed), and the edited model is `functional_call` with `W + ΔW`, `ΔW` kept differentiable in the editor. The
orientation of every matrix comes from its module type (`Conv1D` stores `[d_in, d_out]`).

`ModelRunner` runs one batch either through the whole model or, when the edit only touches blocks from `start` on,
through the lower blocks once (recording every block call, `forward.BlockRunner`) and then through blocks `start..N-1`
alone for each evaluation (before the edit, after it); logits are only computed where a label is read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from ...architectures import ModelSpec
from ...forward import BlockRunner, right_pad
from ..prompts import target_token_ids
from .editor import GradientFactors, MendEditor

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_BLOCKS_TOLERANCE = 1e-3


@dataclass
class EncodedBatch:
    """Right-padded sequences and their labels: `labels[b, j]` is the token at `j` the loss reads (from the logits
    at `j − 1`) or `IGNORE_INDEX`."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L]

    def to(self, device: torch.device | str) -> EncodedBatch:
        return EncodedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


def encode_continuations(tokenizer: Any, prompts: Sequence[str], continuations: Sequence[str]) -> EncodedBatch:
    """`prompt ++ " " + continuation` as token ids (the prompt as the tokenizer encodes a text, the continuation as
    the other methods encode a target, `prompts.target_token_ids`), with the continuation's tokens as labels."""
    rows, labels = [], []
    for prompt, continuation in zip(prompts, continuations, strict=True):
        prompt_ids, target_ids = tokenizer(prompt)["input_ids"], target_token_ids(tokenizer, continuation)
        rows.append(prompt_ids + target_ids)
        labels.append([IGNORE_INDEX] * len(prompt_ids) + target_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids, attention_mask = right_pad(rows, pad, torch.device("cpu"))
    label_ids = torch.full_like(input_ids, IGNORE_INDEX)
    for i, row in enumerate(labels):
        label_ids[i, : len(row)] = torch.tensor(row)
    return EncodedBatch(input_ids, attention_mask, label_ids)


def concatenate(batches: Sequence[EncodedBatch]) -> EncodedBatch:
    """The rows of `batches` in one right-padded batch (widths may differ; added padding has id 0, masked out)."""
    width = max(b.input_ids.shape[1] for b in batches)

    def padded(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)

    return EncodedBatch(torch.cat([padded(b.input_ids, 0) for b in batches]),
                        torch.cat([padded(b.attention_mask, 0) for b in batches]),
                        torch.cat([padded(b.labels, IGNORE_INDEX) for b in batches]))


@dataclass
class LabelLogits:
    """Logits `[N, V]` at the `N` positions whose next token is a label, the sequence `rows [N]` each belongs to and
    the label `tokens [N]`, for a batch of `num_rows` sequences."""

    logits: torch.Tensor
    rows: torch.Tensor
    tokens: torch.Tensor
    num_rows: int

    def log_probs(self) -> torch.Tensor:
        return torch.log_softmax(self.logits.float(), dim=-1)

    def select(self, first: int, stop: int) -> LabelLogits:
        """The positions of sequences `first .. stop-1` (renumbered from 0)."""
        keep = (self.rows >= first) & (self.rows < stop)
        return LabelLogits(self.logits[keep], self.rows[keep] - first, self.tokens[keep], stop - first)

    def nll(self) -> torch.Tensor:
        """Mean negative log-likelihood of each sequence's labels, `[num_rows]` (0 for a row without labels)."""
        token_nll = -self.log_probs().gather(1, self.tokens[:, None])[:, 0]
        return self._per_row(token_nll) / self._per_row(torch.ones_like(token_nll)).clamp(min=1)

    def accuracy(self) -> torch.Tensor:
        """Whether every label of each sequence is the argmax prediction, `[num_rows]` (1.0 / 0.0)."""
        wrong = (self.logits.argmax(-1) != self.tokens).float()
        return (self._per_row(wrong) == 0).float()

    def _per_row(self, values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.num_rows, device=values.device, dtype=values.dtype).index_add(0, self.rows, values)


def locality_kl(pre: LabelLogits, post: LabelLogits) -> torch.Tensor:
    """`KL(p_pre ‖ p_post)` of the next-token distributions at the same labelled positions, averaged over them
    (§8.5); `pre` is treated as a constant."""
    pre_log_probs, post_log_probs = pre.log_probs().detach(), post.log_probs()
    return (pre_log_probs.exp() * (pre_log_probs - post_log_probs)).sum(-1).mean()


class ModelRunner:
    """Runs `model` on one `EncodedBatch`, with inner weights replaced by given tensors, returning `LabelLogits`.

    With `start` (the first block any inner parameter lives in), the blocks below it run once here (their output
    does not depend on the edit) and every `label_logits` call runs blocks `start..N-1`, the final norm and the LM
    head at the labelled positions only. Without it, each call is a whole-model `functional_call`.
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, batch: EncodedBatch, start: int | None = None) -> None:
        self.model, self.spec, self.batch, self.start = model, spec, batch, start
        self._positions = label_positions(batch).nonzero(as_tuple=True)
        self._blocks: BlockRunner | None = None
        self._hidden: torch.Tensor | None = None
        if start is not None:
            self._blocks = BlockRunner(model, spec)
            with torch.no_grad():
                captured = self._blocks.capture(range(start, spec.num_layers), spec.num_layers - 1,
                                                input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            self._hidden = captured[start]

    def label_logits(self, weights: Mapping[str, torch.Tensor] | None = None) -> LabelLogits:
        """`LabelLogits` of the batch with the parameters named in `weights` (full names, e.g.
        `model.layers.27.mlp.down_proj.weight`) replaced."""
        rows, positions = self._positions
        tokens = self.batch.labels[:, 1:][rows, positions]
        weights = dict(weights or {})
        if self._blocks is None:
            logits = functional_call(self.model, weights, args=(), kwargs={
                "input_ids": self.batch.input_ids, "attention_mask": self.batch.attention_mask,
                "use_cache": False}).logits[rows, positions]
        else:
            last = self._blocks.run(self._hidden, self.start, self.spec.num_layers,
                                    parameters=self._per_block(weights))
            logits = self.spec.logits(self.model, last[rows, positions])
        return LabelLogits(logits, rows, tokens, self.batch.size)

    def _per_block(self, weights: Mapping[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
        per_block: dict[int, dict[str, torch.Tensor]] = {}
        for name, tensor in weights.items():
            layer = self.spec.layer_of(name)
            if layer < self.start:
                raise ValueError(f"{name} lies below block {self.start}, where this runner starts.")
            per_block.setdefault(layer, {})[name.removeprefix(self.spec.block_name(layer) + ".")] = tensor
        return per_block


def blocks_match_full_model(model: nn.Module, spec: ModelSpec, batch: EncodedBatch, start: int) -> bool:
    """Whether running from block `start` reproduces the whole model's logits on `batch` (checked once per model,
    like the target optimisation's fast path: the shortcut relies on blocks taking everything but the hidden state
    as arguments)."""
    with torch.no_grad():
        reference = ModelRunner(model, spec, batch).label_logits().logits
        try:
            shortcut = ModelRunner(model, spec, batch, start).label_logits().logits
        except Exception as error:  # a model whose blocks cannot be driven this way
            logger.warning("MEND: running blocks %d.. alone fails for %s (%s: %s); using whole-model forwards",
                           start, spec.model_type, type(error).__name__, error)
            return False
    error = float((shortcut.float() - reference.float()).abs().max())
    if error >= _BLOCKS_TOLERANCE:
        logger.warning("MEND: running blocks %d.. alone differs from the whole model by %.2g for %s; using "
                       "whole-model forwards", start, error, spec.model_type)
    return error < _BLOCKS_TOLERANCE


def label_positions(batch: EncodedBatch) -> torch.Tensor:
    """`[B, L]` bool: the positions whose logits the loss reads (the next token is a label)."""
    labelled = batch.labels != IGNORE_INDEX
    return torch.cat([labelled[:, 1:], torch.zeros_like(labelled[:, :1])], dim=1)


def module_activations(runner: ModelRunner, modules: Sequence[str],
                       loss_of: Callable[[LabelLogits], torch.Tensor],
                       ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], LabelLogits]:
    """The input `[B·L, d_in]` of each matrix in `modules` and the gradient `[B·L, d_out]` of `loss_of(label
    logits)` w.r.t. its output, at every token position flattened row-major (OPT's MLP sees the tokens flattened),
    detached and in the model's dtype, and the batch's `LabelLogits` (detached). The model's weights are not changed
    and get no gradient: the matrices' weights are replaced by detached leaves, so only the outputs' gradients are
    computed."""
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(name: str):
        def hook(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            captured[name] = (args[0], output)
        return hook

    targets = {name: runner.model.get_submodule(name) for name in modules}
    leaves = {f"{name}.weight": module.weight.detach().requires_grad_() for name, module in targets.items()}
    handles = [module.register_forward_hook(capture(name)) for name, module in targets.items()]
    try:
        with torch.enable_grad():
            logits = runner.label_logits(leaves)
            grads = torch.autograd.grad(loss_of(logits), [captured[name][1] for name in modules])
    finally:
        for handle in handles:
            handle.remove()
    activations = {}
    for name, grad in zip(modules, grads, strict=True):
        inputs = captured[name][0].detach()
        activations[name] = (inputs.reshape(-1, inputs.shape[-1]), grad.detach().reshape(-1, grad.shape[-1]))
    return activations, LabelLogits(logits.logits.detach(), logits.rows, logits.tokens, logits.num_rows)


def gradient_factors(runner: ModelRunner, modules: Sequence[str], num_edit_rows: int | None = None,
                     ) -> tuple[dict[str, GradientFactors], LabelLogits]:
    """The input `x_t` and output gradient `δ_t` of each matrix in `modules` at every token row that leads to a
    label of the first `num_edit_rows` sequences (all by default), for the loss `Σ_b mean NLL_b` over those
    sequences (each request's rows are what they would be alone), and the batch's `LabelLogits` (detached).

    Rows are the positions before each sequence's last label (padding and later positions have `δ = 0`); rows with
    an all-zero `x` or `δ` are dropped as well (§8.2). The model's weights are not changed and get no gradient.
    """
    batch = runner.batch
    edit_rows = batch.size if num_edit_rows is None else num_edit_rows
    activations, logits = module_activations(runner, modules,
                                             lambda label_logits: label_logits.select(0, edit_rows).nll().sum())
    mask = _rows_leading_to_labels(batch, edit_rows).reshape(-1)
    factors = {}
    for name, (inputs, output_grads) in activations.items():
        inputs, output_grads = inputs[mask].float(), output_grads[mask].float()
        nonzero = (inputs != 0).any(-1) & (output_grads != 0).any(-1)
        factors[name] = GradientFactors(inputs[nonzero], output_grads[nonzero])
    return factors, logits


def _rows_leading_to_labels(batch: EncodedBatch, edit_rows: int) -> torch.Tensor:
    """`[B, L]` bool: positions `j <` the last labelled position of each of the first `edit_rows` sequences."""
    labelled = batch.labels != IGNORE_INDEX
    positions = torch.arange(labelled.shape[1], device=labelled.device)
    last = torch.where(labelled, positions, -1).max(dim=1).values  # -1 when a row has no label
    mask = positions[None, :] < last[:, None]
    mask[edit_rows:] = False
    return mask & batch.attention_mask.bool()


def edited_weights(model: nn.Module, deltas: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`{"<module>.weight": W + ΔW}` for each `ΔW` `[d_out, d_in]` (math orientation, keyed by module path; added
    transposed to a Conv1D's stored `[d_in, d_out]` weight), differentiable in the `ΔW`s."""
    weights = {}
    for name, delta in deltas.items():
        module = model.get_submodule(name)
        stored = delta.T if isinstance(module, Conv1D) else delta
        weights[f"{name}.weight"] = module.weight + stored.to(module.weight.dtype)
    return weights


@dataclass
class MendLosses:
    """The training objective of one batch of edits (§8.5) and what is logged with it (all scalars)."""

    total: torch.Tensor  # edit_weight · edit + locality_weight · locality (differentiable in the editor)
    edit: torch.Tensor  # mean target NLL of the outer inputs after the edit
    locality: torch.Tensor  # KL(p_pre ‖ p_post) on the locality inputs' answer positions
    edit_accuracy: torch.Tensor  # fraction of outer inputs whose every target token is the argmax after the edit
    pre_edit: torch.Tensor  # the same NLL and accuracy before the edit
    pre_edit_accuracy: torch.Tensor
    prompt_accuracy: torch.Tensor  # accuracy on the edit inputs themselves after the edit

    def metrics(self) -> dict[str, float]:
        """The logged values by name: `edit_loss`, `locality_loss`, `edit_accuracy`, `pre_edit_loss`,
        `pre_edit_accuracy`, `prompt_accuracy`."""
        return {"edit_loss": float(self.edit), "locality_loss": float(self.locality),
                "edit_accuracy": float(self.edit_accuracy), "pre_edit_loss": float(self.pre_edit),
                "pre_edit_accuracy": float(self.pre_edit_accuracy), "prompt_accuracy": float(self.prompt_accuracy)}


@dataclass
class EditEpisode:
    """One training example of MEND: a batch edit of the `edit` inputs, scored on the `outer` inputs (rephrases and/or
    the edit prompts themselves) and the `locality` inputs (their labels mark the answer positions). The three
    groups are one batch, `[edit; locality; outer]`, run by one `ModelRunner` (so a runner that starts at the
    editor's first block runs the blocks below once, and can be kept to skip them in later epochs)."""

    runner: ModelRunner
    num_edits: int
    num_locality: int

    @classmethod
    def build(cls, model: nn.Module, spec: ModelSpec, edit: EncodedBatch, outer: EncodedBatch, locality: EncodedBatch,
              from_block: int | None = None) -> EditEpisode:
        """`from_block`: the editor's first block (see `blocks_match_full_model`), or None for whole-model runs."""
        return cls(ModelRunner(model, spec, concatenate([edit, locality, outer]), from_block), edit.size,
                   locality.size)

    @property
    def groups(self) -> dict[str, tuple[int, int]]:
        """`(first row, stop row)` of the edit, locality and outer inputs in the runner's batch."""
        locality_stop = self.num_edits + self.num_locality
        return {"edit": (0, self.num_edits), "locality": (self.num_edits, locality_stop),
                "outer": (locality_stop, self.runner.batch.size)}


def mend_losses(editor: MendEditor, episode: EditEpisode, *, edit_weight: float,
                locality_weight: float) -> MendLosses:
    """Edit the model functionally with `editor` on the episode's edit inputs (all of them one batch edit) and score
    the edited model (§8.5): `edit_weight ·` target NLL on the outer inputs `+ locality_weight ·` KL on the
    locality inputs. Runs the model twice: before the edit (gradient factors, locality reference, baseline) and
    after it."""
    runner, groups = episode.runner, episode.groups
    factors, pre = gradient_factors(runner, [p.module for p in editor.inner_params], num_edit_rows=episode.num_edits)
    updates = editor(factors)
    post = runner.label_logits(edited_weights(runner.model, {name: left @ right
                                                             for name, (left, right) in updates.items()}))
    post_outer, pre_outer = post.select(*groups["outer"]), pre.select(*groups["outer"])
    edit_nll = post_outer.nll().mean()
    kl = locality_kl(pre.select(*groups["locality"]), post.select(*groups["locality"]))
    total = edit_weight * edit_nll + locality_weight * kl
    with torch.no_grad():
        return MendLosses(total, edit_nll.detach(), kl.detach(), post_outer.accuracy().mean(),
                          pre_outer.nll().mean(), pre_outer.accuracy().mean(),
                          post.select(*groups["edit"]).accuracy().mean())


__all__ = ["IGNORE_INDEX", "EditEpisode", "EncodedBatch", "LabelLogits", "MendLosses", "ModelRunner",
           "blocks_match_full_model", "concatenate", "edited_weights", "encode_continuations", "gradient_factors",
           "label_positions", "locality_kl", "mend_losses", "module_activations"]
