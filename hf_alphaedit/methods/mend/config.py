"""`MendConfig`: MEND's editing settings (ALGORITHMS.md §8.4, §11.5).

The trained editor itself is named by `EditingArguments.mend_editor` (a Hub repo or folder written by
`MendEditor.save_pretrained` / `hf-alphaedit train-mend`); everything it was trained with travels inside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...fields import setting
from ...registry import MethodConfig


@dataclass
class MendConfig(MethodConfig):
    """Settings of editing with a trained MEND editor."""

    mend_editor_revision: str | None = setting(
        "Revision (branch, tag or commit) of a Hub editor named by EditingArguments.mend_editor.", default=None)
    lr_scale: float = setting("Multiplies every learned step size at edit time (the reference's lr_scale).",
                              default=1.0, low=0, low_open=True)
    strict_base: bool = setting(
        "Refuse an editor trained on other base weights (same name, other revision or a converted copy); false "
        "only warns. Model type, module types and shapes must always match.", default=True)
