"""Batched target optimisation: the values `z` every request should produce at the z-layer (ALGORITHMS.md §3).

Exact with respect to the reference procedure; the speed comes from
- optimising the targets of all requests of a batch at once, with one delta and one Adam state per request and
  per-request early stopping (converged requests leave the batch, so they cost nothing afterwards);
- running only the blocks above the z-layer (`BlockRunner`), and in `prefix_cache` mode only the tokens from each
  prompt's lookup position on: the hidden states below the z-layer and the tokens before δ do not depend on it;
- computing vocabulary logits only at the positions the loss reads.

Memory: requests are optimised in micro-batches whose token count keeps one step within `memory_budget`, sized from
the bytes autograd keeps per token in a probe step; when a single request does not fit, the re-run blocks are
recomputed in the backward pass instead of kept (activation checkpointing).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..architectures import ModelSpec, block_output_hidden
from ..errors import NonFiniteError
from ..forward import BlockRunner, cache_argument, right_pad, run_until
from ..hparams import ResolvedHyperparameters
from ..memory import SavedTensorBytes, format_bytes, resolve_memory_budget, tensor_bytes
from ..requests import EditRequest
from .prompts import encode_with_subject, target_token_ids

logger = logging.getLogger(__name__)

_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
# Re-capture the lower blocks' outputs for the still-active requests once they are at most this share of the
# captured batch: a partial forward is cheaper than carrying finished requests through every later step.
_RECAPTURE_FRACTION = 2 / 3
_KL_PROMPT = "{} is a"
_MODE_TOLERANCE = 1e-3
# Peak memory of a step over the bytes autograd saves for it: the gradients the backward pass creates and the
# allocator's slack (peak RSS was 1.6-1.7x the saved bytes for a Llama on CPU; see tests/test_memory.py).
_BACKWARD_FACTOR = 2.0

InjectionSite = Literal["block_output", "mlp_output"]
"""Where δ is added at the z-layer: the block's output (MEMIT/AlphaEdit/NSE, §3.4) or the output of its edited MLP
projection (ROME's compute_v, §3.8; `h_init` is then the projection's output `m_init`)."""

ForwardMode = Literal["prefix_cache", "blocks", "full"]
"""How target optimisation runs the model at each step, fastest first: only the tokens from the lookup position
on through the blocks above the z-layer, with a cache of the earlier tokens (`prefix_cache`); all tokens
through the blocks above the z-layer (`blocks`); the whole model (`full`). All give the same results."""


@dataclass
class _Sequence:
    ids: list[int]
    lookup: int
    label_positions: list[int] = field(default_factory=list)  # logits positions scored against the target
    kind: str = "rewrite"  # "rewrite" | "kl"


@dataclass
class TargetResult:
    """Optimised target values and how the optimisation went, per request."""

    values: torch.Tensor  # z = h_init + δ, [n, d] float32
    initial_hidden: torch.Tensor  # h_init, [n, d] float32
    losses: list[float]
    steps: list[int]
    target_probabilities: list[float]  # exp(-NLL): geometric-mean target token probability at the end


class TargetOptimizer:
    """Batched target optimisation (§3.9), exactly equivalent to the reference's per-request loop.

    Each request `r` gets a delta `δ_r` `[d]` added to the z-layer's output (or its edited projection's output,
    `site="mlp_output"`) at its lookup position in all of its prompts (one rewriting prompt per template and one KL
    prompt). Adam runs per row with its own step count, so a request
    that stops early keeps its value and state, as it would in its own loop.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, spec: ModelSpec, hparams: ResolvedHyperparameters,
                 templates: Sequence[str], *, batch_tokens: int = 4096, memory_budget: str | int | None = None,
                 mode: ForwardMode = "prefix_cache", show_progress: bool = False,
                 site: InjectionSite = "block_output") -> None:
        self.model, self.tokenizer, self.spec, self.hparams = model, tokenizer, spec, hparams
        self.site = site
        z_layer = hparams.z_layer
        self.site_module = spec.block(model, z_layer) if site == "block_output" else spec.rewrite_module(model, z_layer)
        # Blocks re-run at every step: those above the z-layer, or the z-layer's own block when δ enters inside it.
        self.first_rerun_block = z_layer + 1 if site == "block_output" else z_layer
        if not templates:
            raise ValueError("TargetOptimizer: templates is empty, so no request would have a rewriting prompt; pass "
                             "generate_context_templates(...) (its first template is '{}').")
        self.templates = list(templates)
        self.batch_tokens = batch_tokens
        self.memory_budget = memory_budget  # bytes, 'auto' or None (`memory.resolve_memory_budget`)
        self.checkpoint_blocks = False  # recompute the re-run blocks in the backward pass (set by the budget)
        self.mode = mode
        self.show_progress = show_progress
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def sequences(self, request: EditRequest) -> tuple[list[_Sequence], list[int]]:
        """The request's 6 rewriting prompts (+ all target tokens but the last) and its KL prompt."""
        target = target_token_ids(self.tokenizer, request.target_new)
        prefix, suffix = request.split_prompt()
        items = [(template.split("{}")[0] + prefix, request.subject, suffix) for template in self.templates]
        kl_prefix, kl_suffix = _KL_PROMPT.split("{}")
        items.append((kl_prefix, request.subject, kl_suffix))
        encoded = encode_with_subject(self.tokenizer, items, self.hparams.fact_token)
        sequences = []
        for ids, lookup in encoded[:-1]:
            start = len(ids) - 1
            sequences.append(_Sequence(ids + target[:-1], lookup, list(range(start, start + len(target)))))
        kl_ids, kl_lookup = encoded[-1]
        sequences.append(_Sequence(kl_ids, kl_lookup, [kl_lookup], kind="kl"))
        return sequences, target

    def optimize(self, requests: Sequence[EditRequest]) -> TargetResult:
        """Targets `z` for all requests, optimised in micro-batches of at most `batch_tokens` tokens that fit the
        memory budget (requests are independent: results equal up to float summation order)."""
        prepared = [self.sequences(r) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: _tokens(prepared[i]))
        budget = resolve_memory_budget(self.memory_budget, self.device)
        limit = self.batch_tokens if budget is None else min(self.batch_tokens,
                                                              self._tokens_within(budget, prepared[order[-1]]))
        chunks, current, tokens = [], [], 0
        for i in order:
            size = _tokens(prepared[i])
            if current and tokens + size > limit:
                chunks.append(current)
                current, tokens = [], 0
            current.append(i)
            tokens += size
        if current:
            chunks.append(current)
        d = self.spec.hidden_size
        values = torch.zeros(len(requests), d)
        initial = torch.zeros(len(requests), d)
        losses, steps, probs = [0.0] * len(requests), [0] * len(requests), [0.0] * len(requests)
        with tqdm(total=len(requests), desc="targets", unit="req", disable=not self.show_progress) as bar:
            for chunk in chunks:
                result = self._optimize_chunk([prepared[i] for i in chunk])
                for row, i in enumerate(chunk):
                    values[i], initial[i] = result.values[row], result.initial_hidden[row]
                    losses[i], steps[i] = result.losses[row], result.steps[row]
                    probs[i] = result.target_probabilities[row]
                bar.update(len(chunk))
        bad = [i for i in range(len(requests)) if not bool(torch.isfinite(values[i]).all())]
        if bad:
            names = ", ".join(f"{i} ({requests[i].subject!r})" for i in bad[:5])
            raise NonFiniteError(f"the target values of request(s) {names} are not finite (NaN or Inf): the model's "
                                 "hidden states or losses on their prompts are not finite (check its weights); "
                                 "nothing was applied.")
        return TargetResult(values, initial, losses, steps, probs)

    def _tokens_within(self, budget: int, longest: tuple[list[_Sequence], list[int]]) -> int:
        """Tokens per micro-batch that keep one step within `budget` bytes, from a probe step on the longest
        request; turns on activation checkpointing when that request alone does not fit without it."""
        tokens = _tokens(longest)
        self.checkpoint_blocks = False
        kept, recomputed = self._probe_bytes(longest)
        for checkpoint, needed in ((False, kept), (True, recomputed)):
            if needed is not None and needed <= budget:
                self.checkpoint_blocks = checkpoint
                if checkpoint:
                    logger.info("target optimisation: one request needs %s, more than the memory budget of %s, so "
                                "the re-run blocks are recomputed in the backward pass", format_bytes(kept),
                                format_bytes(budget))
                # A power of two, so that small changes of free memory ('auto') do not change the micro-batches.
                return 2 ** int(math.log2(budget * tokens / needed))
        self.checkpoint_blocks = recomputed is not None and recomputed < kept
        logger.warning("target optimisation: one request needs %s, more than the memory budget of %s%s; requests "
                       "are optimised one at a time", format_bytes(min(kept, recomputed or kept)),
                       format_bytes(budget), " even with activation checkpointing" if self.checkpoint_blocks else "")
        return 1

    def _probe_bytes(self, prepared: tuple[list[_Sequence], list[int]]) -> tuple[int, int | None]:
        """Peak bytes of one step on `prepared` (one request): keeping the re-run blocks' activations, and
        recomputing them in the backward pass (None where blocks are not re-run).

        Measured: the tensors autograd saves for the backward pass (split into the re-run blocks' and the rest),
        the micro-batch's captured states, and `_BACKWARD_FACTOR` for what the backward pass allocates on top.
        With recomputation a block keeps only its input, and one block's activations exist at a time.
        """
        batch = self._capture([prepared], [0])
        delta = torch.zeros(1, self.spec.hidden_size, device=self.device, requires_grad=True)
        with SavedTensorBytes(exclude=tuple(self.model.parameters())) as saved:
            last = self._last_hidden(batch, delta)
            blocks = saved.bytes
            log_probs = self._log_probs_at(batch, last)
            kl_log_probs = log_probs[batch.kl_positions]
            (batch.nll(log_probs) + (kl_log_probs.exp() * kl_log_probs).sum(-1)).sum()
        cached = [tensor for pair in batch.prefix_cache or [] for tensor in pair]
        rest = saved.bytes - blocks + tensor_bytes(batch.z_output, batch.rerun_input, *cached)
        kept = _BACKWARD_FACTOR * (blocks + rest)
        num_blocks = self.spec.num_layers - self.first_rerun_block
        if batch.runner is None or num_blocks == 0 or self.site != "block_output":
            # No re-run blocks, or δ added by a hook that is gone when a block is recomputed.
            return int(kept), None
        inputs = num_blocks * last.numel() * last.element_size()
        return int(kept), int(_BACKWARD_FACTOR * (inputs + blocks / num_blocks + rest))

    def initial_log_probs(self, requests: Sequence[EditRequest]) -> torch.Tensor:
        """Log-probabilities `[positions, vocab]` the loss reads at δ = 0 (to compare forward modes)."""
        prepared = [self.sequences(r) for r in requests]
        batch = self._capture(prepared, list(range(len(prepared))))
        with torch.no_grad():
            return self._log_probs(batch, torch.zeros(len(prepared), self.spec.hidden_size, device=self.device))

    def _optimize_chunk(self, prepared: list[tuple[list[_Sequence], list[int]]]) -> TargetResult:
        hp = self.hparams
        n, d = len(prepared), self.spec.hidden_size
        delta = torch.zeros(n, d, dtype=torch.float32, device=self.device)
        adam_m, adam_v = torch.zeros_like(delta), torch.zeros_like(delta)
        adam_steps = torch.zeros(n, dtype=torch.long)
        active = torch.ones(n, dtype=torch.bool)
        final_loss = torch.zeros(n)
        final_nll = torch.zeros(n)
        iterations = torch.zeros(n, dtype=torch.long)
        h_init = torch.zeros(n, d, dtype=torch.float32, device=self.device)
        kl_reference: torch.Tensor | None = None
        learning_rate = torch.zeros(n, dtype=torch.float32, device=self.device)
        batch: _Batch | None = None
        for it in range(hp.v_num_grad_steps):
            if batch is None or int(active[batch.rows].sum()) <= _RECAPTURE_FRACTION * len(batch.rows):
                batch = self._capture(prepared, active.nonzero().flatten().tolist())
                if it == 0:
                    h_init = batch.hidden_at_lookup().float()
                    rms = h_init.norm(dim=1) / math.sqrt(d)
                    learning_rate = rms * hp.v_lr_rms_factor if hp.v_lr is None else torch.full_like(rms, hp.v_lr)
            rows = batch.rows
            delta_rows = delta[rows].detach().requires_grad_(True)
            log_probs = self._log_probs(batch, delta_rows)
            nll = batch.nll(log_probs)
            kl_log_probs = log_probs[batch.kl_positions]
            if it == 0:
                kl_reference = kl_log_probs.detach()
                kl_reference_rows = rows
            reference = kl_reference[_positions_of(kl_reference_rows, rows)]
            kl = (kl_log_probs.exp() * (kl_log_probs - reference)).sum(-1)
            h_norm = h_init[rows].norm(dim=1)
            weight_decay = hp.v_weight_decay * delta_rows.norm(dim=1) / h_norm**2
            loss = nll + hp.kl_factor * kl + weight_decay
            loss_values = loss.detach().cpu()
            # Requests that stopped earlier but are still in the captured batch keep their recorded results.
            was_active = active[rows]
            evaluated = torch.tensor(rows)[was_active]
            final_loss[evaluated] = loss_values[was_active]
            final_nll[evaluated] = nll.detach().cpu()[was_active]
            iterations[evaluated] = it
            still = was_active & (loss_values >= hp.v_early_stop_loss)
            active[rows] = still
            if not still.any() or it == hp.v_num_grad_steps - 1:
                break
            (loss[still.to(loss.device)]).sum().backward()
            train = torch.tensor(rows)[still]
            grad = delta_rows.grad[still.to(self.device)]
            adam_steps[train] += 1
            adam_m[train] = _ADAM_BETAS[0] * adam_m[train] + (1 - _ADAM_BETAS[0]) * grad
            adam_v[train] = _ADAM_BETAS[1] * adam_v[train] + (1 - _ADAM_BETAS[1]) * grad * grad
            step = adam_steps[train].to(torch.float64)
            bias1 = (1 - _ADAM_BETAS[0] ** step).to(self.device)
            bias2 = (1 - _ADAM_BETAS[1] ** step).to(self.device)
            denom = adam_v[train].sqrt() / bias2.sqrt().float()[:, None] + _ADAM_EPS
            step_size = (learning_rate[train] / bias1.float())[:, None]
            updated = delta[train] - step_size * adam_m[train] / denom
            max_norm = hp.clamp_norm_factor * h_init[train].norm(dim=1, keepdim=True)
            norm = updated.norm(dim=1, keepdim=True)
            delta[train] = torch.where(norm > max_norm, updated * max_norm / norm, updated)
        values = (h_init + delta).detach().cpu()
        values[~torch.isfinite(final_loss)] = float("nan")  # a NaN loss "stops" at once; report it, never apply it
        return TargetResult(
            values=values, initial_hidden=h_init.cpu(),
            losses=final_loss.tolist(), steps=iterations.tolist(),
            target_probabilities=torch.exp(-final_nll).tolist())

    def _capture(self, prepared: list[tuple[list[_Sequence], list[int]]], rows: list[int]) -> _Batch:
        """Run everything that does not depend on δ for the sequences of `rows` (requests of this chunk)."""
        sequences, owners, targets = [], [], []
        for row in rows:
            seqs, target = prepared[row]
            sequences.extend(seqs)
            owners.extend([row] * len(seqs))
            targets.extend([target] * len(seqs))
        mode = "blocks" if self.mode == "prefix_cache" and any(s.lookup == 0 for s in sequences) else self.mode
        # In prefix mode every sequence is split at its lookup position: tokens before it never see δ, so their
        # keys/values in every layer are computed once and only the rest is re-run at each step.
        split = [s.lookup if mode == "prefix_cache" else 0 for s in sequences]
        batch = _Batch(rows, sequences, owners, targets, split, self.device)
        suffix_ids, suffix_mask = right_pad([s.ids[k:] for s, k in zip(sequences, split, strict=True)], self.pad_id,
                                       self.device)
        inputs: dict[str, Any] = {"input_ids": suffix_ids, "attention_mask": suffix_mask}
        if mode == "prefix_cache":
            inputs = self._prefix_inputs(batch, sequences, split, suffix_ids, suffix_mask)
        batch.inputs = inputs
        if mode == "full":
            batch.z_output = self._full_forward(batch, None, capture_z=True)
            return batch
        runner = BlockRunner(self.model, self.spec)
        captured: dict[str, torch.Tensor] = {}
        num_layers, start = self.spec.num_layers, self.first_rerun_block
        with self._adding_delta(batch, None, captured):
            cache = self._fresh_cache(batch)
            extra = {} if cache is None else {cache_argument(self.model): cache}
            block_inputs = runner.capture(range(start, num_layers), num_layers - 1, **inputs, **extra)
        batch.z_output, batch.runner, batch.rerun_input = captured["z"], runner, block_inputs.get(start)
        return batch

    def _prefix_inputs(self, batch: _Batch, sequences: list[_Sequence], split: list[int],
                       suffix_ids: torch.Tensor, suffix_mask: torch.Tensor) -> dict[str, Any]:
        """Left-padded prefixes through the whole model into a cache; inputs for the suffixes that follow it."""
        width = max(split)
        prefix_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        prefix_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, (seq, k) in enumerate(zip(sequences, split, strict=True)):
            prefix_ids[row, width - k:] = torch.tensor(seq.ids[:k])
            prefix_mask[row, width - k:] = 1
        prefix_ids, prefix_mask = prefix_ids.to(self.device), prefix_mask.to(self.device)
        prefix_positions = (prefix_mask.cumsum(1) - 1).clamp_min(0)
        cache = DynamicCache()
        with torch.no_grad():
            run_until(self.model, self.spec.block(self.model, self.spec.num_layers - 1), input_ids=prefix_ids,
                      attention_mask=prefix_mask, position_ids=prefix_positions, use_cache=True,
                      **{cache_argument(self.model): cache})
        batch.prefix_cache = [(layer.keys, layer.values) for layer in cache.layers]
        lengths = torch.tensor(split, device=self.device)[:, None]
        suffix_positions = lengths + torch.arange(suffix_ids.shape[1], device=self.device)[None, :]
        return {"input_ids": suffix_ids, "attention_mask": torch.cat([prefix_mask, suffix_mask], dim=1),
                "position_ids": suffix_positions, "use_cache": True}

    def _fresh_cache(self, batch: _Batch) -> DynamicCache | None:
        """A new copy of the prefix cache (attention layers append to the cache they are given), or None."""
        if batch.prefix_cache is None:
            return None
        cache = DynamicCache()
        for index, (keys, values) in enumerate(batch.prefix_cache):
            cache.update(keys, values, index)
        return cache

    def _log_probs(self, batch: _Batch, delta_rows: torch.Tensor) -> torch.Tensor:
        """Log-softmax `[positions, vocab]` (float32) at every position the losses read."""
        return self._log_probs_at(batch, self._last_hidden(batch, delta_rows))

    def _log_probs_at(self, batch: _Batch, last: torch.Tensor) -> torch.Tensor:
        """Log-softmax `[positions, vocab]` (float32) from the last block's output `last` `[seqs, seq_len, d]`."""
        gathered = last[batch.position_rows, batch.position_cols]
        return torch.log_softmax(self.spec.logits(self.model, gathered).float(), dim=-1)

    def _last_hidden(self, batch: _Batch, delta_rows: torch.Tensor) -> torch.Tensor:
        """Output `[seqs, seq_len, d]` of the last block with δ of `delta_rows` `[requests, d]` added."""
        if batch.runner is not None:
            cache = self._fresh_cache(batch)
            start, stop = self.first_rerun_block, self.spec.num_layers
            if self.site == "block_output":
                last = batch.runner.run(batch.with_delta(batch.z_output, delta_rows), start, stop, cache,
                                        checkpoint=self.checkpoint_blocks)
            else:
                with self._adding_delta(batch, delta_rows):
                    last = batch.runner.run(batch.rerun_input, start, stop, cache, checkpoint=self.checkpoint_blocks)
            return last
        return self._full_forward(batch, delta_rows)

    def _full_forward(self, batch: _Batch, delta_rows: torch.Tensor | None, capture_z: bool = False) -> torch.Tensor:
        """Fallback without `BlockRunner`: the whole model, with δ added by a hook on the injection site."""
        outputs: dict[str, torch.Tensor] = {}

        def keep_last(_m: nn.Module, _a: Any, out: Any) -> None:
            outputs["last"] = block_output_hidden(out)

        last_block = self.spec.block(self.model, self.spec.num_layers - 1)
        # δ's hook goes first: the injection site may be the last block itself.
        with self._adding_delta(batch, delta_rows, outputs if capture_z else None):
            handle = last_block.register_forward_hook(keep_last)
            try:
                with torch.set_grad_enabled(delta_rows is not None):
                    run_until(self.model, last_block, **batch.inputs)
            finally:
                handle.remove()
        return outputs["z"] if capture_z else outputs["last"]

    @contextlib.contextmanager
    def _adding_delta(self, batch: _Batch, delta_rows: torch.Tensor | None,
                      captured: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
        """Within the context the injection site's output gets δ at the lookup positions (none if `delta_rows` is
        None); its output before δ, `[sequences, seq_len, d]`, is stored as `captured["z"]` when asked."""
        def hook(_m: nn.Module, _a: Any, out: Any) -> Any:
            hidden = block_output_hidden(out)
            shaped = hidden.reshape(len(batch.lookup), -1, hidden.shape[-1])  # OPT's MLP flattens the tokens
            if captured is not None:
                captured["z"] = shaped.detach()
            if delta_rows is None:
                return out
            hidden = batch.with_delta(shaped, delta_rows).reshape(hidden.shape)
            return (hidden, *out[1:]) if isinstance(out, (tuple, list)) else hidden

        handle = self.site_module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


def choose_forward_mode(model: nn.Module, tokenizer: Any, spec: ModelSpec, hparams: ResolvedHyperparameters,
                        templates: Sequence[str], probe: Sequence[EditRequest]) -> ForwardMode:
    """The fastest forward mode that reproduces the full model's log-probabilities on `probe` requests.

    The shortcuts rely on blocks taking everything but the hidden state as arguments and on the model's cache
    handling; this checks both numerically once per model instead of trusting them per architecture.
    """
    def log_probs(mode: ForwardMode) -> torch.Tensor:
        return TargetOptimizer(model, tokenizer, spec, hparams, templates, mode=mode).initial_log_probs(probe)

    reference = log_probs("full")
    for mode in ("prefix_cache", "blocks"):
        try:
            error = float((log_probs(mode) - reference).abs().max())
        except Exception as exc:  # a model whose blocks or cache cannot be driven this way
            logger.warning("fast path %r unavailable for %s (%s: %s); trying a slower one (same results)", mode,
                           spec.model_type, type(exc).__name__, exc)
            continue
        if error < _MODE_TOLERANCE:
            return mode
        logger.warning("fast path %r differs from the full model by %.2g for %s; trying a slower one (same "
                       "results)", mode, error, spec.model_type)
    logger.warning("editing %s with full forward passes (slower, same results)", spec.model_type)
    return "full"


def _tokens(prepared: tuple[list[_Sequence], list[int]]) -> int:
    """Tokens of one request's prompts (what micro-batches are sized by)."""
    return sum(len(s.ids) for s in prepared[0])


def _positions_of(reference_rows: list[int], rows: list[int]) -> list[int]:
    index = {row: i for i, row in enumerate(reference_rows)}
    return [index[row] for row in rows]


class _Batch:
    """Padded sequences of a set of requests plus index tensors for injecting δ and reading losses.

    Positions are relative to the part of each sequence that is run at every step (everything after `split`).
    """

    def __init__(self, rows: list[int], sequences: list[_Sequence], owners: list[int], targets: list[list[int]],
                 split: list[int], device: torch.device) -> None:
        self.rows = rows
        self.inputs: dict[str, Any] = {}
        self.runner: BlockRunner | None = None
        self.z_output: torch.Tensor | None = None
        self.prefix_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.rerun_input: torch.Tensor | None = None  # input of the first re-run block, `[seqs, seq_len, d]`
        local = {row: i for i, row in enumerate(rows)}
        self.seq_owner = torch.tensor([local[o] for o in owners], device=device)
        self.lookup = torch.tensor([s.lookup - k for s, k in zip(sequences, split, strict=True)], device=device)
        self.first_prompt = torch.tensor([i for i, s in enumerate(sequences)
                                          if s.kind == "rewrite" and (i == 0 or owners[i - 1] != owners[i])],
                                         device=device)
        position_rows, position_cols, label_ids, label_owner, label_seq = [], [], [], [], []
        kl_positions, seqs_per_owner = [], torch.zeros(len(rows))
        for i, s in enumerate(sequences):
            if s.kind == "kl":
                kl_positions.append(len(position_rows))
                position_rows.append(i)
                position_cols.append(s.lookup - split[i])
                continue
            seqs_per_owner[local[owners[i]]] += 1
            for position, token in zip(s.label_positions, targets[i], strict=True):
                position_rows.append(i)
                position_cols.append(position - split[i])
                label_ids.append(token)
                label_owner.append(local[owners[i]])
                label_seq.append(i)
        self.position_rows = torch.tensor(position_rows, device=device)
        self.position_cols = torch.tensor(position_cols, device=device)
        self.kl_positions = torch.tensor(kl_positions, device=device)
        kl_set = set(kl_positions)
        self.label_index = torch.tensor([j for j in range(len(position_rows)) if j not in kl_set], device=device)
        self.label_ids = torch.tensor(label_ids, device=device)
        self.label_owner = torch.tensor(label_owner, device=device)
        # Each label's weight in its request's NLL: 1 / (target length · number of rewriting prompts).
        target_lengths = torch.tensor([len(targets[i]) for i in label_seq], dtype=torch.float32)
        self.label_weight = (1.0 / (target_lengths * seqs_per_owner[label_owner])).to(device)

    def with_delta(self, hidden: torch.Tensor, delta_rows: torch.Tensor) -> torch.Tensor:
        """`hidden` `[seqs, seq_len, d]` with δ of each sequence's request added at its lookup position."""
        addition = torch.zeros_like(hidden)
        addition = addition.index_put((torch.arange(len(self.lookup), device=hidden.device), self.lookup),
                                      delta_rows[self.seq_owner].to(hidden.dtype))
        return hidden + addition

    def hidden_at_lookup(self) -> torch.Tensor:
        """z-layer output at the lookup position of each request's first ("{}") prompt, `[requests, d]`."""
        return self.z_output[self.first_prompt, self.lookup[self.first_prompt]]

    def nll(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Per-request mean over rewriting prompts of the mean target-token NLL, `[requests]`."""
        token_log_probs = log_probs[self.label_index].gather(1, self.label_ids[:, None]).squeeze(1)
        per_request = torch.zeros(len(self.rows), device=log_probs.device, dtype=log_probs.dtype)
        return per_request.index_add(0, self.label_owner, -token_log_probs * self.label_weight)
