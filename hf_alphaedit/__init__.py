"""hf_alphaedit: sequential knowledge editing for Hugging Face causal LMs, built around AlphaEdit."""

__version__ = "0.1.0"

from .arguments import EditingArguments  # noqa: E402
from .methods import list_methods, register_method  # noqa: E402
from .modeling import AlphaEditModel, BatchReport, EditResult  # noqa: E402
from .projection import NullSpaceProjector  # noqa: E402
from .requests import EditRequest, EditRequestError  # noqa: E402
from .state import EditState  # noqa: E402
from .statistics import KeyStatistics  # noqa: E402

__all__ = [
    "AlphaEditModel",
    "BatchReport",
    "EditRequest",
    "EditRequestError",
    "EditResult",
    "EditState",
    "EditingArguments",
    "KeyStatistics",
    "NullSpaceProjector",
    "__version__",
    "list_methods",
    "register_method",
]
