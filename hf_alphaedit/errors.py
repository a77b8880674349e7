"""Errors shared across the package."""

from __future__ import annotations

import torch


class NonFiniteError(ValueError):
    """A value that would reach the weights, a cache or a file is NaN or infinite; nothing was changed."""


class CollapseGuardError(RuntimeError):
    """A batch would have grown an edited matrix's norm past `EditingArguments.collapse_guard`; it was not applied."""


def check_finite(tensor: torch.Tensor, what: str, hint: str = "") -> None:
    """Raise `NonFiniteError` naming `what` (and how many entries are NaN / infinite) unless `tensor` is finite."""
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    nan = int(torch.isnan(tensor).sum())
    infinite = int((~finite).sum()) - nan
    raise NonFiniteError(f"{what} is not finite ({nan} NaN, {infinite} infinite of {tensor.numel()} values)"
                         + (f"; {hint}" if hint else "") + ".")
