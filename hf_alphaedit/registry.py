"""The method registry and `MethodConfig`, the base of every method's settings.

A method is registered by name with its config dataclass and its class (`register_method`); `EditingArguments`
checks a method name and its projection support against this registry when it is built. The registry lives
below `arguments` and imports no method: the built-in methods register themselves when `hf_alphaedit.methods`
is imported (which `import hf_alphaedit` does).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .fields import validate_fields

logger = logging.getLogger(__name__)

ProjectionSupport = Literal["inherent", "optional", "unsupported"]
PROJECTION_SUPPORT: tuple[str, ...] = ("inherent", "optional", "unsupported")


@dataclass
class MethodConfig:
    """Base of every method's config dataclass: saved with a run, parsed by `HfArgumentParser`.

    Subclasses add plain dataclass fields (scalars, `Literal` choices, lists); each becomes a CLI flag when the
    class is given to `HfArgumentParser((EditingArguments, TheConfig))`, so field names must not repeat
    `EditingArguments` fields. `to_dict()` adds the registered method name under `"method"` (the discriminator,
    like PEFT's `peft_type`); `MethodConfig.from_dict` uses it to pick the registered class.
    """

    def __post_init__(self) -> None:
        validate_fields(self)

    @property
    def method(self) -> str:
        """The name this config class is registered under."""
        try:
            return _CONFIG_NAMES[type(self)]
        except KeyError:
            raise ValueError(f"{type(self).__name__} is not registered; call hf_alphaedit.register_method(name, "
                             f"{type(self).__name__}, MethodClass) first.") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready `{"method": name, field: value, ...}`."""
        return {"method": self.method, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MethodConfig:
        """Build the config from `to_dict()` output.

        On `MethodConfig` itself the `"method"` key picks the registered class; on a subclass it must match (or
        be absent). Keys this version does not know are dropped with a warning, so newer files still load.
        """
        values = dict(values)
        name = values.pop("method", None)
        config_cls: type[MethodConfig] = cls
        if cls is MethodConfig:
            if name is None:
                raise ValueError("MethodConfig.from_dict: the dict has no 'method' key; give the registered "
                                 f"method name (one of {list_methods()}).")
            registered, _ = get_method_classes(name)
            if registered is None:
                raise ValueError(f"MethodConfig.from_dict: method {name!r} takes no config.")
            config_cls = registered
        elif name is not None and get_method_classes(name)[0] is not cls:
            raise ValueError(f"{cls.__name__}.from_dict: the dict is for method {name!r}, not "
                             f"{_CONFIG_NAMES.get(cls, cls.__name__)!r}.")
        known = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            logger.warning("%s: ignoring unknown field(s) %s (written by a newer version?)", config_cls.__name__,
                           unknown)
        return config_cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_json_string(cls, text: str) -> MethodConfig:
        return cls.from_dict(json.loads(text))


_REGISTRY: dict[str, tuple[type[MethodConfig] | None, type]] = {}
_CONFIG_NAMES: dict[type, str] = {}
_METHOD_NAME = re.compile(r"[a-z][a-z0-9_]*")


def register_method(name: str, config_cls: type[MethodConfig] | None, method_cls: type, *,
                    replace: bool = False) -> None:
    """Register an editing method under `name` so that `EditingArguments(method=name)` selects it.

    `config_cls` is the method's `MethodConfig` subclass (None when it has no settings); `method_cls` is built
    as `method_cls(context, config)` and follows the `EditMethod` protocol. Registering a different pair under
    a taken name needs `replace=True`.
    """
    key = name.lower()
    if not _METHOD_NAME.fullmatch(key):
        raise ValueError(f"register_method: name {name!r} must start with a letter and contain only letters, "
                         "digits and '_' (it becomes a CLI choice and a file name).")
    if config_cls is not None and not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig)
                                       and dataclasses.is_dataclass(config_cls)):
        raise TypeError(f"register_method({name!r}): config_cls must be a @dataclass deriving from "
                        f"hf_alphaedit.methods.MethodConfig (or None), got {config_cls!r}.")
    for hook in ("edit_batch", "commit"):
        if not callable(getattr(method_cls, hook, None)):
            raise TypeError(f"register_method({name!r}): {method_cls!r} has no {hook}() (see EditMethod).")
    projection_support(method_cls)
    if config_cls is not None and _CONFIG_NAMES.get(config_cls, key) != key:
        raise ValueError(f"register_method({name!r}): {config_cls.__name__} is already the config of method "
                         f"{_CONFIG_NAMES[config_cls]!r}; give each method its own config class.")
    if _REGISTRY.get(key, (config_cls, method_cls)) != (config_cls, method_cls):
        if not replace:
            raise ValueError(f"register_method: a different method is already registered as {key!r}; choose "
                             "another name or pass replace=True.")
        previous_config, _ = _REGISTRY[key]
        _CONFIG_NAMES.pop(previous_config, None)
    _REGISTRY[key] = (config_cls, method_cls)
    if config_cls is not None:
        _CONFIG_NAMES[config_cls] = key


def get_method_classes(name: str) -> tuple[type[MethodConfig] | None, type]:
    """`(config class or None, method class)` registered under `name`."""
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"EditingArguments.method={name!r}: unknown method; registered methods are "
                         f"{list_methods()} (add one with hf_alphaedit.register_method).") from None


def list_methods() -> list[str]:
    """Names of the registered editing methods."""
    return sorted(_REGISTRY)


def projection_support(method_cls: type) -> ProjectionSupport:
    """How the null-space projection applies to `method_cls` (its `projection` attribute; see `EditMethod`)."""
    support = getattr(method_cls, "projection", "optional")
    if support not in PROJECTION_SUPPORT:
        raise ValueError(f"{method_cls.__name__}.projection={support!r}: choose one of {list(PROJECTION_SUPPORT)}.")
    return support


def supports_target_rescaling(method_cls: type) -> bool:
    """Whether `method_cls` optimises its targets through `LocateThenEditMethod.optimize_targets`, which applies
    `EditContext.rescale_targets` (NAS, `EditingArguments.norm_anchor`): its `target_rescaling` attribute."""
    return bool(getattr(method_cls, "target_rescaling", False))


def method_config_for(method: str, config: Any) -> Any:
    """`config` checked against the config class registered for `method`, or that class's defaults."""
    config_cls, _ = get_method_classes(method)
    if config is None:
        return config_cls() if config_cls is not None else None
    if config_cls is None or not isinstance(config, config_cls):
        expected = config_cls.__name__ if config_cls is not None else "None (the method takes no config)"
        raise TypeError(f"method_config: method {method!r} expects {expected}, got {type(config).__name__}.")
    return config
