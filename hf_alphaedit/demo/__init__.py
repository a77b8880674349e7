"""The AlphaEdit Space demo (`spaces/alphaedit-demo`, `hf-alphaedit demo`).

`session` holds what the Space does with the model (no Gradio import, so the command line loads fast),
`space` publishes the Space folder, and `ui` (which imports Gradio) builds and serves the page.
"""

from .session import DemoInputError, DemoLimits, EditingSession, EditOutcome
from .space import SPACE_FOLDER, check_space_card, push_space

__all__ = ["SPACE_FOLDER", "DemoInputError", "DemoLimits", "EditOutcome", "EditingSession", "check_space_card",
           "push_space"]
