"""The protocol card of an evaluation: what was measured, on which weights, data and edit history, and how.

Every result of `evaluate_edits` (and so of `AlphaEditModel.evaluate`, the command line and the sequential
benchmark) and of `evaluate_general` carries one under `"protocol"`, and the model card's `model-index` repeats
it, so that two numbers can only be compared when their cards agree. The fields:

* `model`: `id`, `revision`, `origin`, `weights_sha256` (SHA-256 over every parameter's name, dtype, shape and
  bytes: equal digests, equal weights);
* `dataset`: `source` (file name, Hub dataset or "in-memory records"), `file_sha256` (files), `split`, `records`
  (`[start, stop)` in the source's order), `records_sha256` (of the evaluated records themselves);
* `editing`: `method`, `num_edits` (applied so far), `num_batches`, `batch_sizes`, `edit_order` and
  `edit_order_sha256` (of the applied requests in order), `weights` (what the evaluated weights are);
* `schedule`: when the evaluation happened (`after_batch` of `num_batches`, or before editing), and which
  records it covered;
* `metric_families`: each reported metric under its family (`teacher_forced`, `live_greedy`, `live_sampled`,
  `sampled_generation` for fluency), with `live_decoding` settings when live metrics were computed;
* `package_version`, `evaluated_at` (UTC, ISO 8601).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .._version import __version__
from ..fingerprint import file_sha256, records_sha256, weights_sha256
from ..hub import ModelSource
from ..state import EditState


def dataset_card(source: Any, *, split: str | None, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The `dataset` part: where `records` (the first `len(records)` of `source`) came from, and their hashes.

    Local files are named by file name only (cards get published; the hash identifies the file).
    """
    if isinstance(source, str | os.PathLike) and Path(source).is_file():
        card: dict[str, Any] = {"source": Path(source).name, "file_sha256": file_sha256(source)}
    elif isinstance(source, str | os.PathLike):
        card = {"source": str(source), "split": split or "train"}
    else:
        card = {"source": "in-memory records"}
    return {**card, "records": [0, len(records)], "records_sha256": records_sha256(records)}


def model_card(model: nn.Module) -> dict[str, Any]:
    """The `model` part for a plain transformers model (its config's `name_or_path`; revision unknown)."""
    config = getattr(model, "config", None)
    return {"id": getattr(config, "name_or_path", None) or type(model).__name__, "revision": None,
            "weights_sha256": weights_sha256(model)}


def editor_protocol(source: ModelSource, state: EditState, *, unedited: bool = False,
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The `model` id / revision, `editing` and `schedule` parts for a model loaded from `source` with the edits
    of `state` applied, and `extra` merged over them. `unedited=True` describes an evaluation of the exact original
    weights swapped in for it (`EditEngine.without_edits`)."""
    model = {"id": source.name_or_path, "revision": source.commit_sha or source.revision, "origin": source.origin}
    if unedited or not state.batches:
        weights = (f"unedited: the exact original weights, with the {state.num_edits} applied edits set aside"
                   if state.batches else "unedited (no edits applied)")
        editing: dict[str, Any] = {"num_edits": 0, "num_batches": 0, "weights": weights}
        schedule = {"after_batch": 0, "timing": "before editing (unedited weights)"}
    else:
        requests = [request.to_dict() for batch in state.batches for request in batch.requests]
        editing = {
            "method": state.method, "num_edits": state.num_edits, "num_batches": len(state.batches),
            "batch_sizes": [len(batch.requests) for batch in state.batches],
            "edit_order": "sequential: batches in the order applied, requests in the order given",
            "edit_order_sha256": records_sha256(requests), "weights": "edited"}
        schedule = {"after_batch": len(state.batches), "timing": "after every batch applied so far"}
    return merge_protocol({"model": model, "editing": editing, "schedule": schedule}, extra)


def merge_protocol(base: Mapping[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """`base` with `extra` merged in, one level deep for dict-valued parts (so a caller can add `schedule`
    fields without repeating the others)."""
    merged = {key: dict(value) if isinstance(value, Mapping) else value for key, value in base.items()}
    for key, value in (extra or {}).items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    return merged


def protocol_card(model: nn.Module, *, dataset: Mapping[str, Any], metric_families: Mapping[str, Sequence[str]],
                  live_decoding: Mapping[str, Any] | None = None,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The whole card of one evaluation of `model` (see the module docstring); `extra` (the caller's `model` id,
    `editing`, `schedule`, ...) is merged over the defaults."""
    card: dict[str, Any] = {
        "model": model_card(model), "dataset": dict(dataset), "editing": None, "schedule": None,
        "metric_families": {family: list(names) for family, names in metric_families.items() if names},
        "package_version": __version__,
        "evaluated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if live_decoding is not None:
        card["live_decoding"] = dict(live_decoding)
    return merge_protocol(card, extra)
