"""MEND: a trained hypernetwork turns the gradient of an edit's loss into low-rank weight updates (ALGORITHMS.md §8).

`MendEditor` is the editor (and its Hub artifact), `Mend` the editing method registered as `"mend"`
(`EditingArguments(method="mend", mend_editor=...)`); training lives in `training.py` (`MendTrainer`).
"""

from ...registry import register_method
from .config import MendConfig
from .editor import (
    EditorMismatchError,
    GradientFactors,
    InnerParameter,
    MendEditor,
    MendEditorConfig,
    default_inner_modules,
)
from .method import Mend

register_method("mend", MendConfig, Mend)

__all__ = ["EditorMismatchError", "GradientFactors", "InnerParameter", "Mend", "MendConfig", "MendEditor",
           "MendEditorConfig", "default_inner_modules"]
