"""MEMIT: multi-layer closed-form updates with a soft preserved-key term (ALGORITHMS.md §5.2)."""

from ..base import register_method
from .method import Memit

register_method("memit", None, Memit)

__all__ = ["Memit"]
