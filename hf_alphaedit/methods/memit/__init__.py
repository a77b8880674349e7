"""MEMIT: multi-layer closed-form updates with a soft preserved-key term (ALGORITHMS.md §5.2–5.3)."""

from ...registry import register_method
from .config import MemitConfig
from .method import Memit

register_method("memit", MemitConfig, Memit)

__all__ = ["Memit", "MemitConfig"]
