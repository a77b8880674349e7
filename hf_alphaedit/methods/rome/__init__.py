"""ROME: one rank-one update per request, fitted to the raw prompt's key (ALGORITHMS.md §6.1)."""

from ...registry import register_method
from .config import RomeConfig
from .method import Rome

register_method("rome", RomeConfig, Rome)

__all__ = ["Rome", "RomeConfig"]
