"""Editing methods, one folder each, registered by name; PRUNE is a restraint that composes with any of them."""

from . import ft, nse, rome  # noqa: F401  (registers "ft", "nse", "rome")
from .alphaedit import AlphaEdit, AlphaEditConfig, NullSpaceBooster  # registers "alphaedit"
from .base import (
    BatchUpdate,
    EditContext,
    EditMethod,
    LayerUpdate,
    LocateThenEditMethod,
    MethodConfig,
    get_method_classes,
    list_methods,
    projection_support,
    register_method,
)
from .memit import Memit, MemitConfig  # registers "memit"
from .prune import PruneRestraint

__all__ = ["AlphaEdit", "AlphaEditConfig", "BatchUpdate", "EditContext", "EditMethod", "LayerUpdate",
           "LocateThenEditMethod", "Memit", "MemitConfig", "MethodConfig", "NullSpaceBooster", "PruneRestraint",
           "get_method_classes", "list_methods", "projection_support", "register_method"]
