"""BetaEdit: AlphaEdit with a penalty on the knowledge leakage of the approximate null space and a projector refreshed
from the edit keys every τ edits (Liu et al., IJCAI 2026)."""

from ...registry import register_method
from .config import BetaEditConfig
from .method import BetaEdit

register_method("betaedit", BetaEditConfig, BetaEdit)

__all__ = ["BetaEdit", "BetaEditConfig"]
