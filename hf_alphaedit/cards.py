"""Jinja model-card templates of `model_cards/` (shipped inside the wheel as `hf_alphaedit/model_cards/`)."""

from __future__ import annotations

from pathlib import Path

_LOCATIONS = (
    Path(__file__).resolve().parent / "model_cards",  # installed wheel
    Path(__file__).resolve().parent.parent / "model_cards",  # source checkout / editable install
)


def card_template(name: str) -> str:
    """The text of template `name` (e.g. `"projection.md"`)."""
    for folder in _LOCATIONS:
        path = folder / name
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise FileNotFoundError(f"model card template {name!r} not found in {[str(p) for p in _LOCATIONS]}; "
                            "reinstall hf_alphaedit.")
