"""UltraEdit: lifelong editing with a running normaliser of keys and gradients and a ridge solve per batch."""

from ...registry import register_method
from .config import UltraEditConfig
from .method import UltraEdit

register_method("ultraedit", UltraEditConfig, UltraEdit)

__all__ = ["UltraEdit", "UltraEditConfig"]
