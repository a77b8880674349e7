"""MEND as an editing method: one forward/backward of the batch's edit inputs, the trained editor, low-rank updates."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import ClassVar

import torch

from ...architectures import ModelSpec
from ...registry import ProjectionSupport
from ...requests import EditRequest
from ...updates import BatchUpdate, LayerUpdate
from ..base import EditContext
from .config import MendConfig
from .editor import DEFAULT_INNER_BLOCKS, MendEditor
from .functional import ModelRunner, encode_continuations, gradient_factors


class Mend:
    """Edit with a trained `MendEditor` (ALGORITHMS.md §8.4), batch after batch on the weights as they are.

    A batch's edit inputs (`prompt + " " + target_new`) run through the model once; the loss is the sum over
    requests of each request's mean target NLL, so every request contributes the token rows it would contribute
    alone and the editor (row-wise) turns the batch into the sum of the requests' single edits. Each inner matrix's
    update `ΔW = left @ right` (`left = −η_W δ'ᵀ` `[d_out, T]`, `right = x'` `[T, d_in]`, `T` token rows) is applied
    through `context.apply_update`, so undo, LoRA export, publishing, the null-space projection of the rewrite
    modules (`use_projection=True`; the other matrices' inputs are the residual stream, not the keys the projector
    describes, so their updates pass unprojected) and PRUNE (`prune=True`, every inner matrix, `edited_modules`
    naming those besides the rewrite modules) work as for any method. The keys recorded are the matrices' raw
    inputs `x` `[T, d_in]`.

    `EditingArguments.layers` must be the editor's blocks (by default the last three, as the editor's default inner
    parameters); the editor is checked against the model when loaded.
    """

    title = "MEND"
    paper = 'Mitchell et al., "Fast Model Editing at Scale", ICLR 2022, arXiv:2110.11309'

    projection: ClassVar[ProjectionSupport] = "optional"
    sequential_state: tuple[str, ...] = ()  # `commit` keeps nothing

    @staticmethod
    def default_layers(spec: ModelSpec, locate_then_edit_layers: tuple[int, ...],
                       config: MendConfig | None) -> tuple[int, ...]:
        """The last three blocks (§8.1), where the default inner parameters live."""
        return tuple(range(max(0, spec.num_layers - DEFAULT_INNER_BLOCKS), spec.num_layers))

    def __init__(self, context: EditContext, config: MendConfig | None = None) -> None:
        self.context = context
        self.config = config if config is not None else MendConfig()
        hp, spec = context.hparams, context.spec
        if not hp.mend_editor:
            raise ValueError("EditingArguments.mend_editor is not set: give the Hub repo id or folder of a trained "
                             "MEND editor (train one with `hf-alphaedit train-mend`).")
        device = next(context.model.parameters()).device
        self.editor = MendEditor.from_pretrained(
            hp.mend_editor, revision=self.config.mend_editor_revision, model=context.model, spec=spec,
            token=context.hub_token, strict=self.config.strict_base).to(device).eval().requires_grad_(False)
        if list(hp.layers) != self.editor.config.layers:
            raise ValueError(f"EditingArguments.layers={list(hp.layers)}, but the MEND editor {hp.mend_editor!r} "
                             f"edits blocks {self.editor.config.layers}; set layers={self.editor.config.layers} "
                             "(or leave layers unset for an editor of the last three blocks).")
        self.modules = [param.module for param in self.editor.inner_params]
        # LayerUpdate.module of each inner matrix: None for the rewrite module of its block (what the null-space
        # projection and every other method edit), its path otherwise.
        self.update_modules = {param.module: None if param.module == spec.rewrite_module_name(param.layer)
                               else param.module for param in self.editor.inner_params}
        self.edited_modules = tuple(module for module in self.update_modules.values() if module is not None)

    def commit(self, update: BatchUpdate) -> None:
        """MEND keeps no state between batches."""

    def edit_batch(self, requests: Sequence[EditRequest]) -> BatchUpdate:
        ctx = self.context
        device = next(ctx.model.parameters()).device
        start = time.perf_counter()
        batch = encode_continuations(ctx.tokenizer, [r.prompt_with_subject for r in requests],
                                     [r.target_new for r in requests]).to(device)
        runner = ModelRunner(ctx.model, ctx.spec, batch)
        factors, _ = gradient_factors(runner, self.modules)
        gradients = time.perf_counter()
        with torch.no_grad():
            updates = self.editor(factors, step_scale=self.config.lr_scale)
        applied = [ctx.apply_update(LayerUpdate(param.layer, updates[param.module][0].contiguous(),
                                                updates[param.module][1].contiguous(),
                                                factors[param.module].inputs,
                                                module=self.update_modules[param.module]))
                   for param in self.editor.inner_params]
        edited = time.perf_counter()
        with torch.no_grad():
            losses = runner.label_logits().nll().cpu()  # the edit inputs' target NLL after the edit
        timings = {"gradients": gradients - start, "editor": edited - gradients,
                   "check": time.perf_counter() - edited}
        return BatchUpdate(applied, losses.tolist(), [1] * len(requests), torch.exp(-losses).tolist(), timings)


__all__ = ["Mend"]
