"""AlphaEdit: closed-form updates projected onto the null space of preserved keys (ALGORITHMS.md §5.4)."""

from ...registry import register_method
from .booster import NullSpaceBooster
from .config import AlphaEditConfig
from .method import AlphaEdit

register_method("alphaedit", AlphaEditConfig, AlphaEdit)

__all__ = ["AlphaEdit", "AlphaEditConfig", "NullSpaceBooster"]
