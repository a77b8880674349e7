"""hf_alphaedit: sequential knowledge editing for Hugging Face causal LMs, built around AlphaEdit."""

from ._version import __version__
from .arguments import EditingArguments
from .engine import BatchReport, EditResult
from .methods import (
    AlphaEditConfig,
    BetaEditConfig,
    EditContext,
    EditMethod,
    FTConfig,
    LayerUpdate,
    MemitConfig,
    MendConfig,
    MendEditor,
    MethodConfig,
    NSEConfig,
    RomeConfig,
    UltraEditConfig,
    list_methods,
    register_method,
)
from .modeling import AlphaEditModel
from .projection import NullSpaceProjector
from .requests import EditRequest, EditRequestError
from .state import EditState
from .statistics import KeyStatistics

__all__ = [
    "AlphaEditConfig",
    "AlphaEditModel",
    "BatchReport",
    "BetaEditConfig",
    "EditContext",
    "EditMethod",
    "EditRequest",
    "EditRequestError",
    "EditResult",
    "EditState",
    "EditingArguments",
    "FTConfig",
    "KeyStatistics",
    "LayerUpdate",
    "MemitConfig",
    "MendConfig",
    "MendEditor",
    "MethodConfig",
    "NSEConfig",
    "NullSpaceProjector",
    "RomeConfig",
    "UltraEditConfig",
    "__version__",
    "list_methods",
    "register_method",
]
