"""UltraEdit (Gu et al., 2025): training-, subject- and memory-free lifelong editing, as the reference code does it.

Per batch (the reference's "turn"), for every edited matrix `W` `[d_out, d_in]`:

1. The requests, sorted longest first and cut into chunks of `chunk_size` (the reference's `collate_fn` and
   `dataset.batch_size`), run through the model; each chunk's loss is the mean cross-entropy over its answer tokens,
   and at every position whose logits predict an answer token (the reference's `token: ans`) the matrix's input
   `k` `[d_in]` and the gradient `g` `[d_out]` of the loss w.r.t. its output are read (float32).
2. A lifelong running normaliser per matrix shape (shared by the matrices of one shape, never reset) is updated
   with each chunk's rows `[k, g]`, chunk by chunk and matrix by matrix in `edit_modules` order, with the
   reference's `RunningMeanStd.update` (`fold`), before anything is solved.
3. The batch's rows are standardised, `(k̂, ĝ) = ([k, g] − mean) / (std + ε)`, the pseudo-values are
   `v = −lr · ‖k̂‖² · ĝ` and, with the batch's raw keys `K` `[N, d_in]` and values `V` `[N, d_out]`, the update is
   the ridge solution `ΔW = Vᵀ K (KᵀK + I)⁻¹` (the reference's `(KᵀK + I)⁻¹ KᵀV`, stored transposed in a Linear).

`N` covers the rows of this batch only (the reference reloads just the current turn's cached keys: memory-free).
The reference standardises the rows in blocks of `editor.batch_size`, zero-padded and cut back; the standardisation
is row-wise and frozen during it, so that blocking changes nothing and is not a setting here. Two deviations, both
where the reference breaks: a chunk with a single answer-token row contributes zero spread to the normaliser (the
reference's unbiased variance of one row is NaN, which would poison the normaliser for good), and a batch that is
not a multiple of `chunk_size` keeps its last, shorter chunk (the reference reads `ceil(n / b)` key files but only
`floor(n / b)` gradient files).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...architectures import ModelSpec
from ...registry import ProjectionSupport
from ...requests import EditRequest
from ...updates import BatchUpdate, LayerUpdate
from ..base import EditContext
from ..mend.editor import InnerParameter, resolve_inner_params
from ..mend.functional import (
    EncodedBatch,
    LabelLogits,
    ModelRunner,
    encode_continuations,
    label_positions,
    module_activations,
)
from .config import UltraEditConfig

DEFAULT_BLOCKS = 9  # the reference's GPT-J, Phi-4, Qwen2.5-7B and Gemma-3-27B configs: 9 blocks ending at N − 2
_EPSILON = torch.finfo(torch.float32).eps  # the reference's torch.finfo(x.dtype).eps on float32 rows

Statistics = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (n [1], mean [D], var [D]) of one normaliser


def row_statistics(rows: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """What `RunningMeanStd.update` reads from rows `[B, D]`: `(B, mean [D], unbiased variance [D])`; the variance of
    a single row is 0 (the reference's is NaN)."""
    mean = rows.mean(0)
    return rows.shape[0], mean, rows.var(0) if rows.shape[0] > 1 else torch.zeros_like(mean)


def fold(state: Statistics, count: int, batch_mean: torch.Tensor, batch_var: torch.Tensor) -> Statistics:
    """The reference's `RunningMeanStd.update` of `state` with a chunk of `count` rows, operation for operation.

    `var` is the reference's accumulator (not a variance): it adds `B · var_x + n · B · δ² / (n + B)`, where `var_x` is
    the chunk's unbiased variance, so it is not Chan's exact merge; `standardise` divides it by `n − 1 + ε`.
    """
    n, mean, var = state
    total = n + count
    delta = batch_mean - mean
    return total, mean + count * delta / total, var + (count * batch_var + n * count * delta.pow(2) / total)


def standardise(state: Statistics, rows: torch.Tensor) -> torch.Tensor:
    """Rows `[M, D]` through the reference's `RunningMeanStd.forward`: `(x − mean) / (std + ε)` with
    `std = sqrt(var / (n − 1 + ε))`."""
    n, mean, var = state
    std = (var / (n - 1 + _EPSILON)).sqrt()
    return (rows - mean) / (std + _EPSILON)


class UltraEdit:
    """UltraEdit (see the module docstring) on the matrices `UltraEditConfig.edit_modules`, batch after batch.

    Each matrix's update `ΔW = left @ right` (`left = Vᵀ` `[d_out, N]`, `right = K (KᵀK + I)⁻¹` `[N, d_in]`, keys
    `K`) is applied through `context.apply_update`, so undo, LoRA export, publishing, the null-space projection of the
    rewrite modules (`use_projection=True`; other matrices' inputs are the residual stream, not the keys the projector
    describes, so their updates pass unprojected, as MEND's) and PRUNE (`prune=True`, with `edited_modules` naming
    the matrices besides the rewrite modules) work as for any method.

    The running normalisers are the sequential state (`normalizer`: `"<shape>.n"` `[1]`, `".mean"` and `".var"`
    `[d_in + d_out]` per shape `in<d_in>_out<d_out>`). `edit_batch` leaves them alone and records every update it
    folded in as `BatchUpdate.method_state` (`"<shape>.count"` `[U]`, `".mean"` and `".var"` `[U, d_in + d_out]`, in
    fold order); `commit` folds those into `normalizer`, so an undo or a resumed run rebuilds it bit for bit.
    """

    title = "UltraEdit"
    paper = ('Gu et al., "UltraEdit: Training-, Subject-, and Memory-Free Lifelong Editing in Large Language Models", '
             '2025, arXiv:2505.14679')

    projection: ClassVar[ProjectionSupport] = "optional"
    sequential_state: tuple[str, ...] = ("normalizer",)

    @staticmethod
    def default_layers(spec: ModelSpec, locate_then_edit_layers: tuple[int, ...],
                       config: UltraEditConfig | None) -> tuple[int, ...]:
        """The blocks holding `edit_modules` when they are given; else the nine blocks ending at the second-to-last
        (clipped to the model), as the reference's GPT-J, Phi-4, Qwen2.5-7B and Gemma-3-27B configs."""
        modules = (config if config is not None else UltraEditConfig()).edit_modules
        if modules is not None:
            try:
                return tuple(sorted({spec.layer_of(module) for module in modules}))
            except ValueError as error:
                raise ValueError(f"UltraEditConfig.edit_modules: {error}; give dotted paths of matrices inside the "
                                 f"blocks (e.g. '{spec.rewrite_module_name(0)}').") from None
        last = max(spec.num_layers - 2, 0)
        return tuple(range(max(last - DEFAULT_BLOCKS + 1, 0), last + 1))

    def __init__(self, context: EditContext, config: UltraEditConfig | None = None) -> None:
        self.context = context
        self.config = config if config is not None else UltraEditConfig()
        model, spec, layers = context.model, context.spec, sorted(set(context.hparams.layers))
        modules = self.config.edit_modules or [spec.rewrite_module_name(layer) for layer in layers]
        try:
            self.params: list[InnerParameter] = resolve_inner_params(model, spec, modules)
        except ValueError as error:
            raise ValueError(f"UltraEditConfig.edit_modules: {error} Give dotted paths of nn.Linear / Conv1D "
                             f"matrices inside the blocks, e.g. {spec.mlp_matrices(model, layers[-1])}.") from None
        module_layers = sorted({param.layer for param in self.params})
        if module_layers != layers:
            raise ValueError(f"EditingArguments.layers={list(context.hparams.layers)}, but UltraEditConfig."
                             f"edit_modules lie in blocks {module_layers}; set layers={module_layers} (or leave "
                             "layers unset).")
        # LayerUpdate.module of each matrix: None for the rewrite module of its block, its path otherwise.
        self.update_modules = {param.module: None if param.module == spec.rewrite_module_name(param.layer)
                               else param.module for param in self.params}
        self.edited_modules = tuple(module for module in self.update_modules.values() if module is not None)
        device = next(model.parameters()).device
        self.normalizer: dict[str, torch.Tensor] = {}
        for param in self.params:
            size = sum(param.shape)
            self.normalizer.setdefault(f"{param.network}.n", torch.zeros(1, device=device))
            self.normalizer.setdefault(f"{param.network}.mean", torch.zeros(size, device=device))
            self.normalizer.setdefault(f"{param.network}.var", torch.zeros(size, device=device))

    def commit(self, update: BatchUpdate) -> None:
        """Fold the batch's normaliser updates (`update.method_state`) into `normalizer`."""
        self.normalizer = self.folded(update.method_state)

    def folded(self, method_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`normalizer` with the updates recorded in `method_state` folded in, in their order (a new dict)."""
        folded = dict(self.normalizer)
        for network in sorted({param.network for param in self.params}):
            missing = [f"{network}.{name}" for name in ("count", "mean", "var") if f"{network}.{name}" not in
                       method_state]
            if missing:
                raise ValueError(f"UltraEdit: the batch's method_state lacks {missing}: it was not edited by "
                                 "ultraedit with these edit_modules; load it with the UltraEditConfig it was made "
                                 "with.")
            state = (folded[f"{network}.n"], folded[f"{network}.mean"], folded[f"{network}.var"])
            device = state[1].device
            for count, mean, var in zip(method_state[f"{network}.count"].tolist(),
                                        method_state[f"{network}.mean"].to(device),
                                        method_state[f"{network}.var"].to(device), strict=True):
                state = fold(state, count, mean, var)
            folded[f"{network}.n"], folded[f"{network}.mean"], folded[f"{network}.var"] = state
        return folded

    def edit_batch(self, requests: Sequence[EditRequest]) -> BatchUpdate:
        ctx = self.context
        device = next(ctx.model.parameters()).device
        start = time.perf_counter()
        encoded = encode_continuations(ctx.tokenizer, [r.prompt_with_subject for r in requests],
                                       [r.target_new for r in requests])
        lengths = encoded.attention_mask.sum(1).tolist()
        order = sorted(range(len(requests)), key=lambda i: lengths[i], reverse=True)  # stable, as collate_fn
        size = self.config.chunk_size
        runners = [ModelRunner(ctx.model, ctx.spec, _select(encoded, order[i: i + size]).to(device))
                   for i in range(0, len(order), size)]
        modules = [param.module for param in self.params]
        rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {module: [] for module in modules}
        updates: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for runner in runners:
            activations, _ = module_activations(runner, modules, _mean_answer_cross_entropy)
            answers = label_positions(runner.batch).reshape(-1)
            for param in self.params:
                inputs, output_grads = activations[param.module]
                keys, grads = inputs[answers].float(), output_grads[answers].float()
                rows[param.module].append((keys, grads))
                updates.setdefault(param.network, []).append(row_statistics(torch.cat([keys, grads], dim=1)))
        method_state = {}
        for network, stats in updates.items():
            counts, means, variances = zip(*stats, strict=True)
            method_state.update({f"{network}.count": torch.tensor(counts), f"{network}.mean": torch.stack(means),
                                 f"{network}.var": torch.stack(variances)})
        normalizer = self.folded(method_state)
        gradients = time.perf_counter()
        applied, conditions = [], {}
        for param in self.params:
            keys = torch.cat([k for k, _ in rows[param.module]])
            grads = torch.cat([g for _, g in rows[param.module]])
            left, right = self.solve(param, keys, grads, normalizer)
            module = self.update_modules[param.module]
            applied.append(ctx.apply_update(LayerUpdate(param.layer, left, right, keys, module=module)))
            if module is None:
                conditions[param.layer] = _ridge_condition(keys)
        solved = time.perf_counter()
        losses = torch.empty(len(requests))
        with torch.no_grad():
            for first, runner in zip(range(0, len(order), size), runners, strict=True):
                losses[order[first: first + size]] = runner.label_logits().nll().float().cpu()
        timings = {"gradients": gradients - start, "solve": solved - gradients, "check": time.perf_counter() - solved}
        return BatchUpdate(applied, losses.tolist(), [1] * len(requests), torch.exp(-losses).tolist(), timings,
                           solve_conditions=conditions, method_state=method_state)

    def solve(self, param: InnerParameter, keys: torch.Tensor, grads: torch.Tensor,
              normalizer: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(left [d_out, N], right [N, d_in])` of `ΔW = Vᵀ K (KᵀK + I)⁻¹` for one matrix, from its raw keys
        `K` `[N, d_in]` and output gradients `[N, d_out]`, standardised with `normalizer` (this batch's folded in)."""
        d_in = param.shape[1]
        state = (normalizer[f"{param.network}.n"], normalizer[f"{param.network}.mean"],
                 normalizer[f"{param.network}.var"])
        keys_hat, grads_hat = standardise(state, torch.cat([keys, grads], dim=1)).split([d_in, param.shape[0]], 1)
        coefficients = -self.config.lr * (keys_hat * keys_hat).sum(-1).unsqueeze(-1)
        values = coefficients * grads_hat
        system = keys.T @ keys + torch.eye(d_in, device=keys.device)
        right = torch.linalg.solve(system, keys.T).T
        return values.T.contiguous(), right.contiguous()


def _mean_answer_cross_entropy(logits: LabelLogits) -> torch.Tensor:
    """The reference's `util.cross_entropy`: the mean over all answer tokens of the chunk."""
    return F.cross_entropy(logits.logits, logits.tokens)


def _select(batch: EncodedBatch, rows: Sequence[int]) -> EncodedBatch:
    """Rows `rows` of a right-padded batch, cut to their longest sequence."""
    index = torch.tensor(list(rows))
    width = int(batch.attention_mask[index].sum(1).max())
    return EncodedBatch(batch.input_ids[index, :width], batch.attention_mask[index, :width],
                        batch.labels[index, :width])


def _ridge_condition(keys: torch.Tensor) -> float:
    """The 2-norm condition number of `KᵀK + I` from the singular values of `K` `[N, d_in]` (its smallest
    eigenvalue is 1 unless `N ≥ d_in`)."""
    singular = torch.linalg.svdvals(keys.double())
    smallest = float(singular[-1]) ** 2 if keys.shape[0] >= keys.shape[1] else 0.0
    return (1.0 + float(singular[0]) ** 2) / (1.0 + smallest)


__all__ = ["DEFAULT_BLOCKS", "UltraEdit", "fold", "row_statistics", "standardise"]
