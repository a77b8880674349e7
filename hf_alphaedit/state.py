"""`EditState`: every applied batch in factored form, the context templates and the edit log.

Each batch's per-layer update is kept as its low-rank factors `ΔW = left @ right` (`left: [d, n]`,
`right: [n, d_k]`) together with the batch's keys `[n, d_k]`, so later features can undo a batch exactly, export
the accumulated update as a LoRA adapter, or rebuild the previous-edit key cache. Saved as safetensors + JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .requests import EditRequest, from_record
from .updates import LayerUpdate

STATE_TENSORS = "edit_state.safetensors"
STATE_JSON = "edit_state.json"


@dataclass
class BatchRecord:
    """One applied batch: its requests, per-layer factors and how the target optimisation went."""

    index: int
    requests: list[EditRequest]
    layers: list[LayerUpdate]
    target_losses: list[float]
    target_steps: list[int]
    target_probabilities: list[float]
    timings: dict[str, float]
    created_at: float
    telemetry: dict[str, Any] = field(default_factory=dict)  # telemetry.BatchTelemetry.to_dict(); {} in older saves
    method_state: dict[str, torch.Tensor] = field(default_factory=dict)  # BatchUpdate.method_state

    @property
    def update_norms(self) -> dict[int, float]:
        """Frobenius norm of each layer's `ΔW`."""
        return {update.layer: update.norm for update in self.layers}


@dataclass
class EditState:
    """Everything applied to a model so far, in order."""

    method: str
    layers: list[int]
    context_templates: list[str] = field(default_factory=list)
    batches: list[BatchRecord] = field(default_factory=list)

    @property
    def num_edits(self) -> int:
        return sum(len(b.requests) for b in self.batches)

    def accumulated_delta(self, layer: int) -> torch.Tensor:
        """Sum of all batches' `ΔW` at `layer`, `[d, d_k]` float32."""
        updates = [u for b in self.batches for u in b.layers if u.layer == layer]
        if not updates:
            raise ValueError(f"no edits were applied at layer {layer}")
        return sum((u.delta for u in updates[1:]), updates[0].delta)

    def save(self, directory: str | os.PathLike) -> None:
        """Write `edit_state.safetensors` + `edit_state.json` into `directory`, each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        batches = []
        for record in self.batches:
            for position, update in enumerate(record.layers):
                prefix = f"batch{record.index}.update{position}"
                tensors[f"{prefix}.left"] = update.left.detach().cpu().contiguous()
                tensors[f"{prefix}.right"] = update.right.detach().cpu().contiguous()
                tensors[f"{prefix}.keys"] = update.keys.detach().cpu().contiguous()
            for name, value in record.method_state.items():
                tensors[f"batch{record.index}.state.{name}"] = value.detach().cpu().contiguous()
            batches.append({
                "index": record.index, "requests": [r.to_dict() for r in record.requests],
                "updates": [{"layer": u.layer, "module": u.module, "restraint_rank": u.restraint_rank}
                            for u in record.layers],
                "target_losses": record.target_losses, "target_steps": record.target_steps,
                "target_probabilities": record.target_probabilities, "timings": record.timings,
                "created_at": record.created_at, "telemetry": record.telemetry,
                "method_state": sorted(record.method_state)})
        meta = {"method": self.method, "layers": self.layers, "context_templates": self.context_templates,
                "batches": batches}
        atomic_write(directory / STATE_TENSORS, lambda path: save_file(tensors, path))
        atomic_write(directory / STATE_JSON, lambda path: Path(path).write_text(json.dumps(meta, indent=2)))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> EditState:
        directory = Path(directory)
        meta: dict[str, Any] = json.loads((directory / STATE_JSON).read_text())
        tensors = load_file(str(directory / STATE_TENSORS)) if meta["batches"] else {}
        batches = []
        for item in meta["batches"]:
            updates = [LayerUpdate(entry["layer"], tensors[f"{prefix}.left"], tensors[f"{prefix}.right"],
                                   tensors[f"{prefix}.keys"], entry["restraint_rank"], entry["module"])
                       for entry, prefix in _update_entries(item)]
            method_state = {name: tensors[f"batch{item['index']}.state.{name}"] for name in item.get("method_state", [])}
            batches.append(BatchRecord(item["index"], [from_record(r) for r in item["requests"]], updates,
                                       item["target_losses"], item["target_steps"], item["target_probabilities"],
                                       item["timings"], item["created_at"], item.get("telemetry", {}), method_state))
        return cls(meta["method"], meta["layers"], meta["context_templates"], batches)


def iso_time(timestamp: float) -> str:
    """A UNIX timestamp as an ISO 8601 UTC time (seconds)."""
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="seconds")


def request_summary(request: Any) -> dict[str, Any]:
    """The fields of a request that the edit log shows."""
    return {"case_id": request.case_id, "prompt": request.prompt, "subject": request.subject,
            "target_new": request.target_new, "target_true": request.target_true}


def record_norms(record: BatchRecord) -> dict[str, float]:
    """`{layer: Frobenius norm of ΔW}` of a batch, with string keys (JSON)."""
    return {str(layer): norm for layer, norm in record.update_norms.items()}


def revert_event(record: BatchRecord, method: str, timestamp: float) -> dict[str, Any]:
    """The edit-log line of one reverted batch: when and what was reverted (its requests and update norms)."""
    return {"event": "revert", "batch": record.index, "method": method, "time": iso_time(timestamp),
            "timestamp": timestamp, "edited_at": iso_time(record.created_at), "num_edits": len(record.requests),
            "requests": [request_summary(r) for r in record.requests], "update_norms": record_norms(record)}


def _update_entries(item: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """`(entry, tensor-name prefix)` of each update of a saved batch; files of version 0.1.0 keyed updates by layer
    (one rewrite module per layer) and listed `layers` / `restraint_ranks` instead of `updates`."""
    if "updates" in item:
        return [(entry, f"batch{item['index']}.update{position}") for position, entry in enumerate(item["updates"])]
    ranks = item.get("restraint_ranks", [0] * len(item["layers"]))
    return [({"layer": layer, "module": None, "restraint_rank": rank}, f"batch{item['index']}.layer{layer}")
            for layer, rank in zip(item["layers"], ranks, strict=True)]


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Write `path` through `write(temporary path)` in its folder, then rename it into place: readers see the old
    file or the whole new one, and a failure leaves no temporary file behind."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
