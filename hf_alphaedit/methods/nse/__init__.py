"""NSE: sequential MEMIT with original-model targets, neuron selection and re-editing (ALGORITHMS.md §9.1)."""

from ...registry import register_method
from .config import NSEConfig
from .method import NSE

register_method("nse", NSEConfig, NSE)

__all__ = ["NSE", "NSEConfig"]
