"""Where a model's key statistics and null-space projectors come from: a projection artifact (`editing_args.
projection`), memory, the disk cache, or one collection pass over `statistics_corpus`, in that order.

Statistics always describe the base model: they are read, fingerprinted and collected inside
`engine.without_edits()`. Under `torchrun` / `accelerate launch` the collection pass is shared by the processes
(`distributed.data_parallel`); every rank gets the combined statistics and rank 0 alone writes the cache and
pushes. The disk cache is keyed on an exact digest of the weights they depend on (embeddings and the blocks up to
the layer), the model dtype, the transformers version, the corpus and the sampling settings, so statistics of other
weights are never reused; non-finite statistics are never cached. NAS's anchor norm (`methods.nas`), another
property of the base model, is cached in the same folder, keyed on a digest of every weight.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import transformers
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

from ._version import __version__
from .architectures import ModelSpec
from .artifacts import ArtifactError, check_artifact, default_artifact_repo_id, model_provenance
from .corpus import corpus_fingerprint, load_corpus_texts
from .distributed import data_parallel
from .engine import EditEngine
from .evaluation import load_edit_records
from .fingerprint import records_sha256, weight_fingerprint, weights_digests, weights_sha256
from .hparams import ResolvedHyperparameters
from .hub import ModelSource, hub_namespace, hub_unreachable_reason
from .memory import resolve_memory_budget
from .methods.nas import NormAnchor, NormAnchorScaling, compute_norm_anchor
from .methods.prompts import check_request_lengths, ensure_context_templates
from .methods.targets import ForwardMode, choose_forward_mode
from .projection import LoadedArtifact, NullSpaceProjector, load_projection_artifact
from .requests import EditRequest, as_edit_requests
from .state import atomic_write
from .statistics import (
    KeyStatistics,
    collect_key_statistics,
    load_layer_statistics,
    save_layer_statistics,
    statistics_cache_key,
)
from .telemetry import NullSpaceRoomTracker

logger = logging.getLogger(__name__)

MAX_STATISTICS_LENGTH = 4096
# What the targets whose norms NAS averages depend on, besides the weights, the templates and the records.
_TARGET_HYPERPARAMETERS = ("z_layer", "fact_token", "v_lr", "v_lr_rms_factor", "v_num_grad_steps", "v_weight_decay",
                           "clamp_norm_factor", "kl_factor", "v_early_stop_loss")
# What makes `projection="auto"` fall back to computing: no artifact there, no Hub, or an unusable artifact.
_AUTO_FALLBACK_ERRORS = (ArtifactError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError)


class StatisticsProvider:
    """Key statistics and projectors of one model's edited layers (see the module docstring)."""

    def __init__(self, engine: EditEngine, tokenizer: Any, source: ModelSource, editing_args: Any,
                 hparams: ResolvedHyperparameters) -> None:
        self.engine, self.tokenizer, self.source = engine, tokenizer, source
        self.editing_args, self.hparams = editing_args, hparams
        # {"repo_id", "revision", "files"} of the Hub artifact the statistics came from or were pushed to.
        self.projection_source: dict[str, Any] | None = None
        self._statistics: dict[int, KeyStatistics] = {}
        self._projectors: dict[tuple[int, ...], NullSpaceProjector] = {}
        self._artifact: LoadedArtifact | None = None
        self._artifact_resolved = False
        self._norm_anchors: dict[str, NormAnchor] = {}  # cache key -> anchor
        self._null_space_room_tracker: NullSpaceRoomTracker | None = None

    @property
    def spec(self) -> ModelSpec:
        return self.engine.spec

    def base_weight_fingerprints(self, layers: Sequence[int]) -> dict[int, list[float]]:
        """`fingerprint.weight_fingerprint` of each layer's rewrite-module weight before any edit."""
        return {layer: weight_fingerprint(self.engine.original_weight(self.spec.rewrite_module_name(layer)))
                for layer in layers}

    def key_statistics(self, layers: Sequence[int]) -> KeyStatistics:
        """Key statistics of `layers` of the base model: from the projection artifact, memory, the disk cache, or
        one collection pass for the missing ones."""
        artifact = self.artifact()
        if artifact is not None and set(layers) <= set(artifact.statistics.layers):
            return artifact.statistics.subset(layers)
        missing = [layer for layer in layers if layer not in self._statistics]
        if missing:
            with self.engine.without_edits():
                self._load_or_collect(missing)
        parts = [self._statistics[layer] for layer in layers]
        metadata = {**(parts[0].metadata if parts else {}),
                    **model_provenance(self.spec, self.source, layers, self.base_weight_fingerprints(layers))}
        return KeyStatistics({layer: s.sums[layer] for layer, s in zip(layers, parts, strict=True)},
                             {layer: s.counts[layer] for layer, s in zip(layers, parts, strict=True)}, metadata)

    def _load_or_collect(self, layers: list[int]) -> None:
        args = self.editing_args
        model = self.engine.model
        cache_dir = self.cache_dir()
        max_length = self.statistics_max_length()
        digests = weights_digests(model, self.spec, layers)
        corpus = corpus_fingerprint(args.statistics_corpus)
        paths = {}
        for layer in layers:
            key = statistics_cache_key(
                weights=digests[layer], module=self.spec.rewrite_module_name(layer), corpus=corpus,
                samples=args.statistics_samples, max_length=max_length,
                dtype=str(self.spec.weight(model, layer).dtype), transformers=transformers.__version__)
            paths[layer] = cache_dir / f"{self.spec.model_type}-layer{layer}-{key}.safetensors"
        parallel = data_parallel()
        # In a data-parallel run every rank collects the layers that any rank lacks (each rank's cache folder may
        # differ), so that all of them take part in the same collectives.
        to_collect = [layer for layer in layers if (not paths[layer].exists() if parallel is None else parallel.any(
            not paths[layer].exists(), f"checking the statistics cache of layer {layer}"))]
        for layer in layers:
            if layer not in to_collect:
                total, count, meta = load_layer_statistics(paths[layer])
                self._statistics[layer] = KeyStatistics({layer: total}, {layer: count}, meta)
        if not to_collect:
            return
        texts = load_corpus_texts(args.statistics_corpus, args.statistics_samples)
        was_training = model.training
        model.eval()
        try:
            budget = resolve_memory_budget(args.statistics_memory_budget, model.get_input_embeddings().weight.device,
                                           "statistics_memory_budget")
            collected = collect_key_statistics(model, self.tokenizer, self.spec, to_collect, texts,
                                               max_length=max_length, batch_tokens=args.statistics_batch_tokens,
                                               show_progress=not args.disable_tqdm, parallel=parallel,
                                               memory_budget=budget)
        finally:
            model.train(was_training)
        collected.metadata.update(corpus=args.statistics_corpus, package_version=__version__)
        for layer in to_collect:
            single = collected.subset([layer])
            if parallel is None or parallel.is_main:
                save_layer_statistics(paths[layer], single, layer)
            self._statistics[layer] = single

    def cache_dir(self) -> Path:
        """`editing_args.statistics_cache_dir`, else `$HF_ALPHAEDIT_CACHE/statistics` or
        `~/.cache/hf_alphaedit/statistics`."""
        return Path(self.editing_args.statistics_cache_dir or os.path.join(
            os.environ.get("HF_ALPHAEDIT_CACHE", os.path.expanduser("~/.cache/hf_alphaedit")), "statistics"))

    def norm_anchor_scaling(self) -> NormAnchorScaling:
        """`EditContext.rescale_targets` for NAS (`EditingArguments.norm_anchor`) with the base model's anchor."""
        return NormAnchorScaling(self.norm_anchor(), self.engine.model, self.tokenizer, self.spec, self.hparams)

    def norm_anchor(self) -> NormAnchor:
        """NAS's anchor norm of the z-layer (`methods.nas`) on the base model: from memory, the disk cache, or
        computed once from the first `editing_args.norm_anchor_samples` records of `norm_anchor_records` on the
        exact original weights (`engine.without_edits()`: the edited ones are back, bit for bit, afterwards), with
        the run's target-optimisation hyperparameters and context templates (generated now if no edit has yet).

        The cache is keyed on a digest of every weight of the base model (and so its dtype), the edited module,
        those hyperparameters and templates, the records' content and number, and the transformers version.
        """
        args, hp, model = self.editing_args, self.hparams, self.engine.model
        if not args.norm_anchor_records:
            raise ValueError("EditingArguments.norm_anchor_records is not set: give the CounterFact-style records "
                             "(a .json/.jsonl file or a Hub dataset name) whose targets set NAS's anchor norm.")
        records = load_edit_records(args.norm_anchor_records, limit=args.norm_anchor_samples)
        requests = as_edit_requests(records, batch_size=1)  # optimised independently: no conflicts between them
        with self.engine.editing_mode(), self.engine.without_edits():
            templates = ensure_context_templates(self.engine.state.context_templates, model, self.tokenizer, hp,
                                                 args.seed)
            module = self.spec.rewrite_module_name(hp.z_layer)
            key = statistics_cache_key(
                kind="norm_anchor", weights=weights_sha256(model), module=module, templates=list(templates),
                hyperparameters={name: getattr(hp, name) for name in _TARGET_HYPERPARAMETERS},
                records=records_sha256(records), samples=len(requests), transformers=transformers.__version__)
            if key in self._norm_anchors:
                return self._norm_anchors[key]
            path = self.cache_dir() / f"{self.spec.model_type}-norm-anchor-layer{hp.z_layer}-{key}.json"
            if path.exists():
                anchor = NormAnchor.from_dict(json.loads(path.read_text(encoding="utf-8")))
                logger.info("NAS: anchor norm %.6g of %s from the cache %s", anchor.value, module, path)
            else:
                anchor = self._compute_norm_anchor(requests, templates, path)
        self._norm_anchors[key] = anchor
        return anchor

    def _compute_norm_anchor(self, requests: Sequence[EditRequest], templates: Sequence[str],
                             path: Path) -> NormAnchor:
        args, model = self.editing_args, self.engine.model
        if len(requests) < args.norm_anchor_samples:
            logger.warning("NAS: norm_anchor_records holds %d records, fewer than norm_anchor_samples=%d; the "
                           "anchor is the mean over all of them", len(requests), args.norm_anchor_samples)
        check_request_lengths(self.tokenizer, model.config, requests, self.hparams.context_template_length)
        logger.info("NAS: optimising the targets of %d requests of %s on the unedited model for the anchor norm "
                    "(once per model)", len(requests), args.norm_anchor_records)
        start = time.perf_counter()
        anchor = compute_norm_anchor(model, self.tokenizer, self.spec, self.hparams, templates, requests,
                                     batch_tokens=args.target_batch_tokens, memory_budget=args.target_memory_budget,
                                     # A NAS method is built before its first edit would choose the mode.
                                     mode=self.prepare_target_optimisation(requests),
                                     show_progress=not args.disable_tqdm)
        parallel = data_parallel()
        if parallel is None or parallel.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps({**anchor.to_dict(), "records": args.norm_anchor_records}, indent=1) + "\n"
            atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        logger.warning("NAS: anchor norm of %s = %.6g, the mean ‖v*‖ of %d requests without the largest %d (untrimmed "
                       "mean %.6g; %.0f s); cached in %s", self.spec.rewrite_module_name(self.hparams.z_layer),
                       anchor.value, len(anchor.norms), anchor.dropped, anchor.raw_mean,
                       time.perf_counter() - start, path)
        return anchor

    def prepare_target_optimisation(self, probe: Sequence[EditRequest]) -> ForwardMode:
        """What target optimisation needs before it first runs on the model: the context templates (generated once
        per model into the edit state) and the engine's forward mode (chosen once, on `probe[:2]`), which it
        returns. Call it in the engine's editing mode."""
        model = self.engine.model
        templates = ensure_context_templates(self.engine.state.context_templates, model, self.tokenizer, self.hparams,
                                             self.editing_args.seed)
        if self.engine.forward_mode is None:
            self.engine.forward_mode = choose_forward_mode(model, self.tokenizer, self.spec, self.hparams, templates,
                                                           probe[:2])
        return self.engine.forward_mode

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
        artifact = self.artifact()
        stored = artifact.projector if artifact is not None else None
        if (stored is not None and set(layers) <= set(stored.layers)
                and (stored.threshold, stored.threshold_mode) == (hp.nullspace_threshold, hp.nullspace_threshold_mode)):
            projector = stored
        else:
            projector = NullSpaceProjector.from_statistics(self.key_statistics(layers), hp.nullspace_threshold,
                                                           hp.nullspace_threshold_mode)
        self._projectors[layers] = projector
        if artifact is None and self.editing_args.push_projection_to_hub:
            parallel = data_parallel()
            if parallel is None or parallel.is_main:  # one push per data-parallel run
                self.push_projection_to_hub()
        return projector

    def null_space_room_tracker(self) -> NullSpaceRoomTracker:
        """The running measure of the room the applied edits leave in the null space of the edited layers'
        projector (`telemetry.null_space_room`, and every batch's telemetry)."""
        if self._null_space_room_tracker is None:
            layers = self.hparams.layers
            projector = self.null_space_projector(layers)
            self._null_space_room_tracker = NullSpaceRoomTracker(
                {layer: projector.bases[layer] for layer in layers},
                {layer: self.spec.rewrite_module_name(layer) for layer in layers})
        return self._null_space_room_tracker

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

    def artifact(self) -> LoadedArtifact | None:
        """The artifact `editing_args.projection` names (fetched and checked once), or None to compute locally.

        With `"auto"`, a missing, unreachable or unusable artifact at the conventional repo means computing the
        statistics (said once, in one line); an artifact named explicitly must load.
        """
        if self._artifact_resolved:
            return self._artifact
        args, layers = self.editing_args, list(self.hparams.layers)
        choice = args.projection
        self._artifact_resolved = True
        if choice == "compute" or (choice == "auto" and self.source.origin == "local"):
            return None
        name = default_artifact_repo_id(self.source.name_or_path) if choice == "auto" else choice
        try:
            artifact = load_projection_artifact(name, revision=args.projection_revision, layers=layers,
                                                token=args.hub_token)
            check_artifact(artifact.config, self.spec, self.source, layers,
                           weight_fingerprints=self.base_weight_fingerprints(layers))
        except _AUTO_FALLBACK_ERRORS as err:
            if choice != "auto":
                self._artifact_resolved = False
                raise
            reason = hub_unreachable_reason(err) or f"{type(err).__name__}: {str(err).splitlines()[0]}"
            logger.info("projection='auto': no usable key-statistics artifact at %s (%s); computing them from %s",
                        name, reason, args.statistics_corpus)
            artifact = None
        parallel = data_parallel()
        if parallel is not None and parallel.any(artifact is None, "looking for the projection artifact"):
            if artifact is not None:
                logger.info("projection='auto': another rank could not use %s; all ranks compute the statistics",
                            name)
            return None
        if artifact is None:
            return None
        logger.info("using the key statistics%s of %s", " and projector" if artifact.projector else "", name)
        self._artifact = artifact
        self.projection_source = artifact.source
        return artifact

    def statistics_max_length(self) -> int:
        """`editing_args.statistics_max_length`, else the model's context length capped at 4096 tokens."""
        if self.editing_args.statistics_max_length is not None:
            return self.editing_args.statistics_max_length
        config = self.engine.model.config
        for name in ("n_positions", "max_position_embeddings", "max_sequence_length", "seq_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return min(value, MAX_STATISTICS_LENGTH)
        return MAX_STATISTICS_LENGTH
