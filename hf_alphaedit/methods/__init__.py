"""Editing methods, one folder each, registered by name; PRUNE is a restraint that composes with any of them."""

from .alphaedit import AlphaEdit, AlphaEditConfig, NullSpaceBooster  # registers "alphaedit"
from .base import (
    BatchUpdate,
    EditContext,
    EditMethod,
    LayerUpdate,
    MethodConfig,
    get_method_classes,
    list_methods,
    projection_support,
    register_method,
)
from .ft import FineTune, FTConfig  # registers "ft"
from .locate_then_edit import LocateThenEditMethod
from .memit import Memit, MemitConfig  # registers "memit"
from .mend import Mend, MendConfig, MendEditor  # registers "mend"
from .nse import NSE, NSEConfig  # registers "nse"
from .prune import PruneRestraint
from .rome import Rome, RomeConfig  # registers "rome"

__all__ = ["NSE", "AlphaEdit", "AlphaEditConfig", "BatchUpdate", "EditContext", "EditMethod", "FTConfig", "FineTune",
           "LayerUpdate", "LocateThenEditMethod", "Memit", "MemitConfig", "Mend", "MendConfig", "MendEditor",
           "MethodConfig", "NSEConfig", "NullSpaceBooster", "PruneRestraint", "Rome", "RomeConfig", "get_method_classes", "list_methods",
           "projection_support", "register_method"]
