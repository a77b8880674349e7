"""Key statistics: the uncentered second moment of the edited modules' inputs on generic text.

One streaming pass collects every edited layer at once: a pre-hook on each edited module accumulates
`Σ k kᵀ` over the non-padding tokens, and the forward stops at the deepest edited module's input. Samples are
sorted by length and packed under a token budget, so padding is a few percent instead of the reference's ~60%.
Sums are kept in float64 together with token counts, so statistics from shards, processes or corpora merge by
addition; under `torchrun` / `accelerate launch` the shards are spread over the processes (`distributed.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ._version import __version__
from .architectures import ModelSpec
from .artifacts import (
    PROVENANCE_KEYS,
    ArtifactError,
    CorruptArtifactError,
    artifact_folder,
    push_artifact_folder,
    read_artifact_config,
    read_artifact_tensors,
    statistics_path,
    write_artifact,
)
from .distributed import DataParallel
from .errors import check_finite
from .forward import right_pad, run_until
from .memory import SavedTensorBytes, format_bytes

logger = logging.getLogger(__name__)

# Batches are grouped into shards of at least this many tokens (fewer for a small corpus, so that it still makes
# `MIN_SHARDS` shards). A shard's keys are summed in float32 matrix products (fast) and added into the float64 total
# when it ends, which keeps the moment accurate to ~1e-7 relative even over 10^8 tokens. Shards are also the unit of
# data-parallel work and depend on the corpus and the batch size alone (every rank packs the same batches), so a
# shard's float32 sum does not depend on the number of processes: only the order in which the float64 shard sums are
# added does.
SHARD_TOKENS = 32768
MIN_SHARDS = 64
# The upper triangle of Σ k kᵀ is formed by row blocks: more blocks skip more of the lower triangle, smaller ones
# make slower matrix products.
_TRIANGLE_BLOCKS = 8
_MIN_TRIANGLE_BLOCK = 128


@dataclass
class KeyStatistics:
    """Per-layer `Σ k kᵀ` (`[d_k, d_k]`, float64) and token counts of the edited modules' inputs."""

    sums: dict[int, torch.Tensor]
    counts: dict[int, int]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.sums)

    def second_moment(self, layer: int) -> torch.Tensor:
        """Mean `E[k kᵀ]` `[d_k, d_k]` (float64) over all collected tokens of `layer`."""
        if layer not in self.sums:
            raise KeyError(f"no key statistics for layer {layer}; collected layers: {self.layers}")
        return self.sums[layer] / self.counts[layer]

    def merge(self, *others: KeyStatistics) -> KeyStatistics:
        """Statistics of the union of all samples (shards or corpora of the same model and layers).

        Sums, counts and sample/token tallies add; the corpora are listed together.
        """
        merged = self
        for other in others:
            if merged.layers != other.layers:
                raise ValueError(f"cannot merge statistics of layers {merged.layers} with layers {other.layers}")
            for key in ("model_type", "key_size", "modules"):
                if key in merged.metadata and key in other.metadata and merged.metadata[key] != other.metadata[key]:
                    raise ValueError(f"cannot merge statistics of different models: {key} "
                                     f"{merged.metadata[key]!r} vs {other.metadata[key]!r}")
            metadata = {**other.metadata, **merged.metadata}
            for key in ("samples", "tokens", "padded_tokens"):
                metadata[key] = (merged.metadata.get(key) or 0) + (other.metadata.get(key) or 0)
            corpora = [c for c in (merged.metadata.get("corpus"), other.metadata.get("corpus")) if c]
            metadata["corpus"] = " + ".join(dict.fromkeys(corpora)) or None
            merged = KeyStatistics(
                sums={layer: merged.sums[layer] + other.sums[layer].to(merged.sums[layer]) for layer in merged.layers},
                counts={layer: merged.counts[layer] + other.counts[layer] for layer in merged.layers},
                metadata=metadata,
            )
        return merged

    def subset(self, layers: Sequence[int]) -> KeyStatistics:
        return KeyStatistics({k: self.sums[k] for k in layers}, {k: self.counts[k] for k in layers},
                             dict(self.metadata))

    def artifact_files(self) -> dict[str, dict[str, torch.Tensor]]:
        """The artifact files of these statistics: per layer the packed upper triangle of `Σ k kᵀ` (float64
        `[d_k (d_k + 1) / 2]`) and the count."""
        return {statistics_path(layer): {"upper": _pack_upper(self.sums[layer]),
                                         "count": torch.tensor([self.counts[layer]], dtype=torch.int64)}
                for layer in self.layers}

    def artifact_config(self) -> dict[str, Any]:
        """The artifact config entries of these statistics (provenance, corpus, counts); refuses statistics without
        model provenance or with non-finite values."""
        meta = self.metadata
        missing = [key for key in ("model_type", "key_size", "modules") if key not in meta]
        if missing:
            raise ArtifactError(f"the statistics have no model provenance ({missing}); compute them with "
                                "AlphaEditModel.key_statistics or NullSpaceProjector.compute before saving.")
        for layer in self.layers:
            if not torch.isfinite(self.sums[layer]).all():
                raise ArtifactError(f"the key statistics of layer {layer} contain NaN or Inf; refusing to save them.")
        return {**{key: meta.get(key) for key in PROVENANCE_KEYS}, "layers": self.layers,
                "corpus": meta.get("corpus"), "corpus_revision": meta.get("corpus_revision"),
                "samples": meta.get("samples"), "tokens": {str(layer): self.counts[layer] for layer in self.layers},
                "max_length": meta.get("max_length"), "model_dtype": meta.get("model_dtype"),
                "statistics_dtype": "float64", "projector": None}

    @classmethod
    def from_artifact(cls, folder: str | os.PathLike, config: dict[str, Any],
                      layers: Sequence[int] | None = None) -> KeyStatistics:
        """The statistics of `layers` (default: all) of the artifact in `folder` whose config is `config`."""
        available = list(config["layers"])
        layers = available if layers is None else sorted(layers)
        absent = sorted(set(layers) - set(available))
        if absent:
            raise ArtifactError(f"the artifact in {folder} has no statistics for layer(s) {absent}; it covers "
                                f"layers {available}. Compute the missing layers (projection='compute') or choose "
                                "EditingArguments.layers among those.")
        d_k = config["key_size"]
        sums, counts = {}, {}
        for layer in layers:
            tensors = read_artifact_tensors(folder, statistics_path(layer), config)
            upper, count = tensors.get("upper"), tensors.get("count")
            if upper is None or count is None or upper.shape != (d_k * (d_k + 1) // 2,) or count.shape != (1,):
                raise CorruptArtifactError(f"{statistics_path(layer)}: expected tensors 'upper' "
                                           f"[{d_k * (d_k + 1) // 2}] and 'count' [1]; the file is not a "
                                           "key-statistics file of this artifact.")
            if not torch.isfinite(upper).all():
                raise CorruptArtifactError(f"{statistics_path(layer)}: the key statistics contain NaN or Inf values.")
            if int(count[0]) <= 0:
                raise CorruptArtifactError(f"{statistics_path(layer)}: the key count is {int(count[0])}; statistics "
                                           "need at least one key.")
            sums[layer], counts[layer] = _unpack_upper(upper.double(), d_k), int(count[0])
        metadata = {key: config.get(key) for key in (*PROVENANCE_KEYS, "corpus", "corpus_revision", "samples",
                                                     "max_length", "model_dtype", "package_version")}
        return cls(sums, counts, metadata)

    @classmethod
    def from_pretrained(cls, repo_id_or_path: str | os.PathLike, revision: str | None = None, *,
                        layers: Sequence[int] | None = None, token: str | bool | None = None) -> KeyStatistics:
        """Load the statistics of an artifact (local folder or Hub repo, fetched into the HF cache)."""
        patterns = None if layers is None else [statistics_path(layer) for layer in layers]
        folder, _, _ = artifact_folder(repo_id_or_path, revision=revision, patterns=patterns or ["statistics/*"],
                                       token=token)
        return cls.from_artifact(folder, read_artifact_config(folder), layers)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the statistics as an artifact folder (safetensors + JSON + model card)."""
        write_artifact(directory, self.artifact_files(), self.artifact_config())

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    commit_message: str | None = None) -> str:
        """Upload the statistics to `repo_id` (created if needed; files of an earlier artifact replaced, other files
        kept); returns the commit sha."""
        with tempfile.TemporaryDirectory(prefix="hf_alphaedit-artifact-") as folder:
            self.save_pretrained(folder)
            return push_artifact_folder(folder, repo_id, private=private, token=token, commit_message=(
                commit_message or f"Key statistics for layers {self.layers} (hf_alphaedit {__version__})"))


def collect_key_statistics(
    model: nn.Module,
    tokenizer: Any,
    spec: ModelSpec,
    layers: Sequence[int],
    texts: Sequence[str],
    *,
    max_length: int,
    batch_tokens: int = 8192,
    show_progress: bool = True,
    parallel: DataParallel | None = None,
    memory_budget: int | None = None,
) -> KeyStatistics:
    """One forward pass over `texts` collecting `Σ k kᵀ` for every layer in `layers`.

    Each text is tokenised on its own (with the tokenizer's special tokens) and truncated to `max_length`; the
    sequences are sorted by length, packed into batches of at most `batch_tokens` padded tokens and the batches
    grouped into shards of about `SHARD_TOKENS` tokens (or `MIN_SHARDS` shards). With `parallel` (a data-parallel
    run) each rank runs every `world_size`-th shard and one float64 all-reduce combines the sums, so every rank
    returns the statistics of all texts: equal to one process's up to the order in which the float64 shard sums
    are added. Works for any model dtype and any placement of the layers (each layer's sums live on its own
    device); products are formed in float32 and accumulated in float64.

    `memory_budget` (bytes) lowers `batch_tokens` to what fits in it (`statistics_bytes_per_token`), never below
    the longest sequence, which cannot be split; in a data-parallel run every rank takes the smallest of the
    ranks' sizes, so they pack the same batches.
    """
    layers = sorted(layers)
    encoded = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    sequences = sorted((ids for ids in encoded if ids), key=len, reverse=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_device = model.get_input_embeddings().weight.device
    if memory_budget is not None and sequences:
        batch_tokens = _tokens_within(memory_budget, batch_tokens, model, spec, layers,
                                      right_pad(sequences[:1], pad_id, input_device))
    if parallel is not None:
        batch_tokens = parallel.minimum(batch_tokens, "the statistics batch size")
    batches = pack_by_token_budget(sequences, batch_tokens)
    total_tokens = sum(len(s) for s in sequences)
    shards = group_into_shards(batches, max(1, min(SHARD_TOKENS, total_tokens // MIN_SHARDS)))
    if parallel is not None:
        parallel.agree(total_tokens, "the number of corpus tokens")
    mine = [shards[i] for i in (parallel.shard(len(shards)) if parallel is not None else range(len(shards)))]
    moments: dict[int, _UpperTriangleSum] = {}
    counts = dict.fromkeys(layers, 0)
    real_tokens: dict[torch.device, torch.Tensor] = {}  # flat indices of the batch's non-padding tokens, per device

    def make_hook(layer: int):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            hidden = args[0]
            index = real_tokens.get(hidden.device)
            if index is None:
                index = real_tokens[hidden.device] = next(iter(real_tokens.values())).to(hidden.device)
            keys = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)  # some models (OPT) flatten tokens
            if layer not in moments:
                moments[layer] = _UpperTriangleSum(keys.shape[1], keys.device)
            moments[layer].add(keys)

        return hook

    handles = [spec.rewrite_module(model, layer).register_forward_pre_hook(make_hook(layer)) for layer in layers]
    deepest = spec.rewrite_module(model, layers[-1])
    my_tokens = sum(len(s) for shard in mine for batch in shard for s in batch)
    try:
        with torch.inference_mode(), tqdm(total=my_tokens, unit="tok", desc="key statistics",
                                          disable=not show_progress) as bar:
            for shard in mine:
                for batch in shard:
                    input_ids, attention_mask = right_pad(batch, pad_id, input_device)
                    real_tokens.clear()
                    real_tokens[input_device] = attention_mask.reshape(-1).nonzero().squeeze(1)
                    # Nothing after the deepest edited module's input is needed.
                    run_until(model, deepest, inclusive=False, input_ids=input_ids, attention_mask=attention_mask)
                    n_tokens = sum(len(s) for s in batch)
                    for layer in layers:
                        counts[layer] += n_tokens
                    bar.update(n_tokens)
                for moment in moments.values():
                    moment.flush()
    finally:
        for handle in handles:
            handle.remove()
    sums = {}
    for layer in layers:
        moment = moments.get(layer)
        if moment is None:  # a rank without shards
            moment = _UpperTriangleSum(spec.key_size, spec.rewrite_module(model, layer).weight.device)
        sums[layer] = moment.upper()
    if parallel is not None:
        for layer in layers:
            sums[layer] = parallel.all_reduce_sum(sums[layer], f"combining the key statistics of layer {layer}")
            counts[layer] = int(parallel.all_reduce_sum(torch.tensor([counts[layer]]), "combining token counts"))
    for layer in layers:
        sums[layer] = _symmetric_from_upper(sums[layer])
        check_finite(sums[layer], f"the key statistics of {spec.rewrite_module_name(layer)}",
                     "the model produces non-finite activations below it (check its weights); nothing was cached")
    padded = sum(len(b) * len(b[0]) for b in batches)
    metadata = {"samples": len(sequences), "tokens": total_tokens, "padded_tokens": padded,
                "max_length": max_length, "model_dtype": str(next(model.parameters()).dtype)}
    return KeyStatistics({k: v.cpu() for k, v in sums.items()}, counts, metadata)


def statistics_bytes_per_token(model: nn.Module, spec: ModelSpec, layers: Sequence[int], input_ids: torch.Tensor,
                               attention_mask: torch.Tensor) -> int:
    """Bytes per token a statistics batch like `input_ids` `[B, L]` holds at its peak, measured, not modelled.

    An inference forward frees each block's intermediates before the next block runs, so its peak is what exists
    once per forward (embeddings, the attention mask, position embeddings) plus one block's intermediates. Both are
    read off what autograd would keep (`SavedTensorBytes`) for forwards through one and two blocks of the probe;
    a block's transient tensors that backward would not keep (e.g. attention scores before the softmax) are
    covered by counting its kept bytes twice. The float32 copy of the keys an edited layer's hook forms comes on
    top. The attention terms grow with `L`, so probing the longest sequence bounds the shorter ones.
    """
    embeddings = model.get_input_embeddings()(input_ids).detach().requires_grad_()

    def kept_through(blocks: int) -> int:
        with torch.enable_grad(), SavedTensorBytes(exclude=tuple(model.parameters())) as saved:
            run_until(model, model.get_submodule(spec.block_name(blocks - 1)), inputs_embeds=embeddings,
                      attention_mask=attention_mask)
        return saved.bytes

    one = kept_through(1)
    block = kept_through(2) - one if spec.num_layers > 1 else one
    once = max(0, one - block)
    key_copy = spec.key_size * (4 + spec.weight(model, max(layers)).element_size())
    return math.ceil((once + 2 * block) / input_ids.numel()) + key_copy


def _tokens_within(budget: int, batch_tokens: int, model: nn.Module, spec: ModelSpec, layers: Sequence[int],
                   probe: tuple[torch.Tensor, torch.Tensor]) -> int:
    per_token = statistics_bytes_per_token(model, spec, layers, *probe)
    longest = probe[0].shape[1]
    fitting = max(longest, budget // per_token)
    if longest * per_token > budget:
        logger.warning("statistics_memory_budget=%s: the longest sample (%d tokens, about %s) does not fit; batches "
                       "hold one sample at a time where needed (lower statistics_max_length to stay within it)",
                       format_bytes(budget), longest, format_bytes(longest * per_token))
    if fitting < batch_tokens:
        logger.info("key statistics: batches of at most %d tokens (%s per token) to stay within %s", fitting,
                    format_bytes(per_token), format_bytes(budget))
    return min(batch_tokens, fitting)


class _UpperTriangleSum:
    """`Σ k kᵀ` `[d_k, d_k]` of one layer, upper triangle only (the matrix is symmetric).

    Keys are added with one matrix product per row block of the triangle (about 56% of the products of the full
    matrix for 8 blocks) into a float32 partial sum, which `flush` adds into the float64 total.
    """

    def __init__(self, size: int, device: torch.device) -> None:
        count = max(1, min(_TRIANGLE_BLOCKS, size // _MIN_TRIANGLE_BLOCK))
        edges = [round(i * size / count) for i in range(count + 1)]
        self.row_blocks = list(zip(edges, edges[1:], strict=False))
        self.partial = torch.zeros(size, size, dtype=torch.float32, device=device)
        self.total = torch.zeros(size, size, dtype=torch.float64, device=device)

    def add(self, keys: torch.Tensor) -> None:
        """Add `Σ k kᵀ` of `keys` `[tokens, d_k]` (any float dtype) to the partial sum."""
        with _exact_tf32(keys):
            keys = keys.float()
            for start, stop in self.row_blocks:
                self.partial[start:stop, start:].addmm_(keys[:, start:stop].T, keys[:, start:])

    def flush(self) -> None:
        """Move the float32 partial sum into the float64 total."""
        for start, stop in self.row_blocks:
            self.total[start:stop, start:] += self.partial[start:stop, start:]
        self.partial.zero_()

    def upper(self) -> torch.Tensor:
        """The float64 total with its strict lower triangle zeroed, `[d_k, d_k]`."""
        return self.total.triu()


@contextlib.contextmanager
def _exact_tf32(keys: torch.Tensor) -> Iterator[None]:
    """Let CUDA float32 products of bf16/fp16 keys run on TF32 tensor cores: TF32 keeps 10 mantissa bits, at least
    as many as those formats, so the products are exactly those of float32 (accumulated in float32), several
    times faster. Float32 keys keep full float32 products."""
    if keys.device.type != "cuda" or keys.dtype not in (torch.bfloat16, torch.float16):
        yield
        return
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def _symmetric_from_upper(upper: torch.Tensor) -> torch.Tensor:
    return upper + upper.triu(1).T


def group_into_shards(batches: list[list[list[int]]], shard_tokens: int) -> list[list[list[list[int]]]]:
    """Consecutive batches grouped into shards of at least `shard_tokens` real tokens (the last may hold fewer)."""
    shards: list[list[list[list[int]]]] = []
    current: list[list[list[int]]] = []
    tokens = 0
    for batch in batches:
        current.append(batch)
        tokens += sum(len(s) for s in batch)
        if tokens >= shard_tokens:
            shards.append(current)
            current, tokens = [], 0
    if current:
        shards.append(current)
    return shards


def pack_by_token_budget(sequences: list[list[int]], batch_tokens: int) -> list[list[list[int]]]:
    """Greedy packing of length-sorted (longest first) sequences under a padded-size budget."""
    batches: list[list[list[int]]] = []
    current: list[list[int]] = []
    for ids in sequences:
        longest = len(current[0]) if current else len(ids)
        if current and longest * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(ids)
    if current:
        batches.append(current)
    return batches


def statistics_cache_key(**parts: Any) -> str:
    """Stable short hash of everything that determines a layer's statistics."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def save_layer_statistics(path: Path, stats: KeyStatistics, layer: int) -> None:
    """Write one layer's sum and count atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    metadata = {"count": str(stats.counts[layer]), "layer": str(layer),
                "metadata": json.dumps(stats.metadata, default=str)}
    save_file({"sum": stats.sums[layer].contiguous()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_layer_statistics(path: Path) -> tuple[torch.Tensor, int, dict[str, Any]]:
    """Read one layer's `(sum [d_k, d_k] float64, token count, metadata)` written by `save_layer_statistics`."""
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
    tensors = load_file(str(path))
    total = tensors["sum"]
    if not torch.isfinite(total).all():
        raise ValueError(f"key statistics file {path} contains NaN or Inf values; delete it to recompute.")
    return total, int(header["count"]), json.loads(header.get("metadata", "{}"))


def _pack_upper(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle (diagonal included) of a symmetric `[d, d]` matrix, row by row: `[d (d + 1) / 2]`."""
    rows, cols = torch.triu_indices(*matrix.shape)
    return matrix[rows, cols].double().contiguous()


def _unpack_upper(upper: torch.Tensor, size: int) -> torch.Tensor:
    rows, cols = torch.triu_indices(size, size)
    matrix = torch.zeros(size, size, dtype=upper.dtype)
    matrix[rows, cols] = upper
    matrix[cols, rows] = upper
    return matrix
