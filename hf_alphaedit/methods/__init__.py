"""Editing methods, one folder each, registered by name."""

from . import alphaedit, memit  # noqa: E402,F401  (registers the built-in methods)
from .base import (
    BatchUpdate,
    EditContext,
    EditMethod,
    LayerUpdate,
    LocateThenEditMethod,
    get_method_classes,
    list_methods,
    register_method,
)

__all__ = ["BatchUpdate", "EditContext", "EditMethod", "LayerUpdate", "LocateThenEditMethod",
           "get_method_classes", "list_methods", "register_method"]
