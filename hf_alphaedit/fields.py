"""Dataclass fields for settings: help text and numeric bounds in one place, type coercion and validation.

`HfArgumentParser.parse_dict`, JSON and YAML do no type conversion ('1e-4' stays a string, `.inf` and `null` arrive
as they are), so every settings dataclass (`EditingArguments`, each method's `MethodConfig`) calls
`validate_fields(self)` in `__post_init__`: scalar values are converted to the declared type, and every number is
checked to be finite and inside the bounds declared with `setting(...)`. Errors name the field as
`ClassName.field` and say what to give instead.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import field
from typing import Any

# Declared ranges by field object (HfArgumentParser passes a field's whole `metadata` to argparse, so they cannot
# live there).
_RANGES: dict[dataclasses.Field, tuple[float | None, float | None, bool]] = {}


def setting(help: str, *, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING,
            low: float | None = None, high: float | None = None, low_open: bool = False) -> Any:
    """A dataclass field with `help` (shown by `HfArgumentParser`) and, for numbers, the accepted range.

    `low`/`high` are inclusive bounds (`low_open=True` makes `low` exclusive, for "must be positive"); None is no
    bound. Numbers must always be finite.
    """
    kwargs = {"default": default} if default_factory is dataclasses.MISSING else {"default_factory": default_factory}
    created = field(metadata={"help": help}, **kwargs)
    if low is not None or high is not None:
        _RANGES[created] = (low, high, low_open)
    return created


def validate_fields(instance: Any) -> None:
    """Coerce the scalar fields of the dataclass `instance` to their declared types and check their values.

    Raises `ValueError` naming `ClassName.field` for a value of the wrong type, a missing value of a field that
    is not optional, a non-finite number, or a number outside the field's declared range.
    """
    owner = type(instance).__name__
    for spec in scalar_fields(type(instance)):
        name = f"{owner}.{spec.name}"
        value = getattr(instance, spec.name)
        if value is None:
            if not spec.optional:
                raise ValueError(f"{name}: a value is required (got null/None).")
            continue
        value = _coerce_bool(name, value) if spec.kind is bool else coerce_number(name, value, spec.kind)
        if spec.bounds is not None:
            _check_bounds(name, value, spec.bounds)
        setattr(instance, spec.name, value)


@dataclasses.dataclass(frozen=True)
class _ScalarField:
    name: str
    kind: type  # float | int | bool
    optional: bool
    bounds: tuple[float | None, float | None, bool] | None


@functools.cache
def scalar_fields(cls: type) -> tuple[_ScalarField, ...]:
    """The `float` / `int` / `bool` fields of dataclass `cls` (optional or not), with their declared bounds."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        options = set(typing.get_args(hint)) if is_union else {hint}
        optional = type(None) in options
        options.discard(type(None))
        if len(options) == 1 and (kind := options.pop()) in (float, int, bool):
            found.append(_ScalarField(f.name, kind, optional, _RANGES.get(f)))
    return tuple(found)


def coerce_number(name: str, value: Any, kind: type) -> int | float:
    """`value` as a finite `kind` (`int` or `float`); `name` is used in the error message."""
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: expected a {kind.__name__}, not a boolean.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: expected a {kind.__name__}.") from None
    if not math.isfinite(number):
        raise ValueError(f"{name}={value!r}: must be a finite number.")
    if kind is float:
        return value if isinstance(value, float) else number
    if isinstance(value, int):
        return value
    if number != int(number):
        raise ValueError(f"{name}={value!r}: expected an integer.")
    return int(number)


def _coerce_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"{name}={value!r}: expected true or false.")


def _check_bounds(name: str, value: float, bounds: tuple[float | None, float | None, bool]) -> None:
    low, high, low_open = bounds
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        if low is not None and high is not None:
            wanted = f"between {low:g} and {high:g}" if not low_open else f"above {low:g} and at most {high:g}"
        elif low is not None:
            wanted = f"above {low:g}" if low_open else f"at least {low:g}"
        else:
            wanted = f"at most {high:g}"
        raise ValueError(f"{name}={value!r}: must be {wanted}.")
