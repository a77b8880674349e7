"""Fingerprints of a model's weights, files and records: which model statistics, artifacts, published edits and
evaluation results belong to.

For weights, three kinds, for three jobs:
- `weights_digests`: an exact SHA-256 over the bytes of every weight that the keys of the edited layers depend on
  (embeddings and the blocks up to the deepest edited one), with dtype and shape. It keys the local statistics
  cache, where reusing statistics of other weights would silently give a wrong projector.
- `weight_fingerprint`: a short numeric signature (`W @ probe`, float64) of one matrix, robust to dtype and to
  float round-off, compared with a tolerance. It travels in artifacts and published edits, where the same model in
  another dtype must still match and a different model (of the same architecture) must not.
- `weights_sha256`: an exact SHA-256 over every parameter of the model. Evaluation protocol cards name the
  evaluated weights by it, so two results can be compared only when they were measured on the same weights.

`file_sha256` and `records_sha256` identify the files and records that artifacts, runs and evaluations read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from accelerate.utils import align_module_device
from torch import nn

from .architectures import ModelSpec

FINGERPRINT_SIZE = 16
FINGERPRINT_RTOL = 1e-2
# Bytes hashed per step when a weight is copied to the CPU for the digest (bounds the host memory it takes).
_DIGEST_CHUNK_ELEMENTS = 1 << 24


def weight_fingerprint(weight: torch.Tensor) -> list[float]:
    """The first `FINGERPRINT_SIZE` entries of `W @ probe` (`W`: `[rows, cols]`) for a fixed random probe `[cols]`,
    in float64: robust to the weight's dtype and to float32 round-off; any other change of the weights moves it."""
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(weight.shape[1], generator=generator, dtype=torch.float64) / math.sqrt(weight.shape[1])
    rows = weight.detach()[:FINGERPRINT_SIZE].to("cpu", torch.float64)
    return (rows @ probe).tolist()


def fingerprints_match(expected: Sequence[float], actual: Sequence[float], rtol: float = FINGERPRINT_RTOL) -> bool:
    """Whether two `weight_fingerprint`s agree to `rtol` of the larger of 1 and the expected entries' magnitude."""
    if len(expected) != len(actual):
        return False
    scale = max(1.0, max((abs(x) for x in expected), default=0.0))
    return max((abs(a - e) for a, e in zip(actual, expected, strict=True)), default=0.0) <= rtol * scale


def weights_digests(model: nn.Module, spec: ModelSpec, layers: Sequence[int]) -> dict[int, str]:
    """`{layer: SHA-256 (hex)}` of every parameter the inputs of blocks `0..layer` depend on, for each of `layers`:
    the parameters outside the blocks (except the final norm and an untied LM head), then those of blocks
    `0..layer` in block order. Names, dtypes, shapes and bytes enter the hash; one pass serves every layer."""
    blocks = {f"{spec.block_name(layer)}.": layer for layer in range(spec.num_layers)}
    excluded = _head_parameters(model, spec)
    outside, per_block = [], {}
    for name, parameter in model.named_parameters():
        block = next((layer for prefix, layer in blocks.items() if name.startswith(prefix)), None)
        if block is None:
            if id(parameter) not in excluded:
                outside.append(name)
        else:
            per_block.setdefault(block, []).append(name)
    digest = hashlib.sha256()
    for name in outside:
        _hash_parameter(digest, name, model)
    digests = {}
    for block in range(max(layers, default=-1) + 1):
        for name in per_block.get(block, []):
            _hash_parameter(digest, name, model)
        if block in layers:
            digests[block] = digest.copy().hexdigest()
    return digests


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 (hex) over every parameter of `model` (name, dtype, shape and bytes, in `named_parameters` order;
    tied weights once): equal digests, bitwise equal weights."""
    digest = hashlib.sha256()
    for name, _ in model.named_parameters():
        _hash_parameter(digest, name, model)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def records_sha256(records: Sequence[Mapping[str, Any]]) -> str:
    """SHA-256 (hex) of JSON-like records as canonical JSON (sorted keys, UTF-8), whatever they were loaded from."""
    text = json.dumps(list(records), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _hash_parameter(digest: Any, name: str, model: nn.Module) -> None:
    """Hash the parameter `name` of `model`, read from accelerate's offload (disk or CPU) when `device_map`
    offloaded its module: then the parameter itself is a placeholder on the meta device."""
    module_name, _, parameter_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    with align_module_device(module):
        parameter = getattr(module, parameter_name)
        digest.update(f"{name}:{parameter.dtype}:{tuple(parameter.shape)}\n".encode())
        flat = parameter.detach().reshape(-1)
        for start in range(0, flat.numel(), _DIGEST_CHUNK_ELEMENTS):
            chunk = flat[start:start + _DIGEST_CHUNK_ELEMENTS].to("cpu").contiguous()
            digest.update(chunk.view(torch.uint8).numpy().tobytes())


def _head_parameters(model: nn.Module, spec: ModelSpec) -> set[int]:
    """Ids of the parameters that only act after the last block (final norm, output projection, untied LM head)."""
    found: set[int] = set()
    norm = spec.final_norm_module(model)
    if norm is not None:
        found.update(id(p) for p in norm.parameters())
    if spec.output_projection is not None:
        found.update(id(p) for p in model.get_submodule(spec.output_projection).parameters())
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None:
        tied = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
        found.update(id(p) for p in head.parameters() if id(p) not in tied)
    return found
