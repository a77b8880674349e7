"""FT: fine-tuning of the edited MLP projections inside an L∞ box (ALGORITHMS.md §6.2)."""

from ...registry import register_method
from .config import FTConfig
from .method import FineTune

register_method("ft", FTConfig, FineTune)

__all__ = ["FTConfig", "FineTune"]
