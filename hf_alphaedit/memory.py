"""Memory budgets: a budget setting in bytes, the memory a device has free, and the bytes autograd keeps.

Target optimisation keeps, for every token of a micro-batch, the activations of every re-run block until the
backward pass; that is what bounds its memory (14.6 GB peak RSS for a 100-edit batch of SmolLM2 without a budget).
`SavedTensorBytes` measures those bytes on a real probe step, so a budget turns into a micro-batch size without
any per-architecture formula; the statistics pass sizes its batches from the same measurement of one block.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Share of the free memory of the edited model's device that the `auto` budget lets one micro-batch use.
AUTO_BUDGET_FRACTION = 0.5
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNIT = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_memory_budget(field: str, value: str | int | float | None) -> str | int | None:
    """`value` as a budget: None (no budget), 'auto', or a positive number of bytes.

    Sizes may carry a unit: '1.5GiB', '800MB', '2G' (powers of 1024 for `KiB`/`MiB`/`GiB`/`TiB`, of 1000
    otherwise); 'none' is None. Raises `ValueError` naming `field` for anything else.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, bool):
        raise ValueError(f"{field}={value!r}: give a size such as '2GiB' or '800MB', 'auto' or 'none'.")
    if isinstance(value, (int, float)):
        size = float(value)
    else:
        match = _SIZE.match(str(value))
        if match is None:
            raise ValueError(f"{field}={value!r}: give a size such as '2GiB' or '800MB', 'auto' or 'none'.")
        unit = (match.group(2) or "").lower()
        scale = 1024 ** (" kmgt".index(unit[0])) if "i" in unit else _UNIT[unit[:1]]
        size = float(match.group(1)) * scale
    if not size >= 1 or size == float("inf"):
        raise ValueError(f"{field}={value!r}: a memory budget must be at least one byte.")
    return int(size)


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device` (CUDA: free device memory; CPU: the kernel's
    `MemAvailable`), or None where this is not known."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        meminfo = Path("/proc/meminfo")
        if meminfo.is_file():
            for line in meminfo.read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def resolve_memory_budget(setting: str | int | None, device: torch.device,
                          field: str = "target_memory_budget") -> int | None:
    """Bytes for the memory budget setting `field` (`target_memory_budget`, `statistics_memory_budget`) on
    `device`: a size as given; 'auto' as `AUTO_BUDGET_FRACTION` of the memory available now (None, with a warning,
    where that is unknown)."""
    budget = parse_memory_budget(field, setting)
    if budget != "auto":
        return budget
    free = available_memory(device)
    if free is None:
        logger.warning("%s='auto': the free memory of device %s is unknown, so the batches it bounds are sized by "
                       "their token setting alone; set a size to bound them", field, device)
        return None
    return int(free * AUTO_BUDGET_FRACTION)


class SavedTensorBytes:
    """Within the context, the bytes of the distinct storages that autograd saves for the backward pass.

    Storages of `exclude` (the model's parameters: they exist anyway) are not counted.
    """

    def __init__(self, exclude: list[torch.Tensor] | tuple[torch.Tensor, ...] = ()) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._storages: dict[tuple[torch.device, int], int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved)

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self._excluded and tensor.device.type != "meta":
            self._storages[(tensor.device, pointer)] = storage.nbytes()
        return tensor

    def __enter__(self) -> SavedTensorBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def format_bytes(size: float) -> str:
    """`size` bytes for people: '512 B', '12.3 MiB', '1.50 GiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{size:.0f} B"


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the distinct storages of `tensors` (None entries are skipped)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())
