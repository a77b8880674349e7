"""Editing methods, one folder each, registered by name; PRUNE is a restraint that composes with any of them, NAS a
rescaling of the targets of every locate-then-edit method."""

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
from .betaedit import BetaEdit, BetaEditConfig  # registers "betaedit"
from .ft import FineTune, FTConfig  # registers "ft"
from .locate_then_edit import LocateThenEditMethod
from .memit import Memit, MemitConfig  # registers "memit"
from .mend import Mend, MendConfig, MendEditor  # registers "mend"
from .nas import NormAnchor, NormAnchorScaling
from .nse import NSE, NSEConfig  # registers "nse"
from .prune import PruneRestraint
from .rome import Rome, RomeConfig  # registers "rome"
from .ultraedit import UltraEdit, UltraEditConfig  # registers "ultraedit"

__all__ = ["NSE", "AlphaEdit", "AlphaEditConfig", "BatchUpdate", "BetaEdit", "BetaEditConfig", "EditContext",
           "EditMethod", "FTConfig", "FineTune", "LayerUpdate", "LocateThenEditMethod", "Memit", "MemitConfig",
           "Mend", "MendConfig", "MendEditor", "MethodConfig", "NSEConfig", "NormAnchor", "NormAnchorScaling",
           "NullSpaceBooster", "PruneRestraint", "Rome", "RomeConfig", "UltraEdit", "UltraEditConfig",
           "get_method_classes", "list_methods", "projection_support", "register_method"]
