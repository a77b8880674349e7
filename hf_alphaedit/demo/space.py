"""The Space folder (`spaces/alphaedit-demo`, shipped in the wheel as `hf_alphaedit/spaces/`) and its publishing."""

from __future__ import annotations

import re
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import SpaceCard, SpaceHardware

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

SPACE_FOLDER = Path(__file__).resolve().parent.parent / "spaces" / "alphaedit-demo"
# What a published Space holds; anything else in the folder (caches, editor files) stays behind.
SPACE_FILES = ("README.md", "app.py", "demo.yaml", "requirements.txt")
PACKAGE_REQUIREMENT = "hf-alphaedit[lora]"
_SHORT_DESCRIPTION_LIMIT = 60  # characters the Hub accepts in `short_description`
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def check_space_card(folder: str | Path = SPACE_FOLDER) -> list[str]:
    """Problems with the Space card (`README.md` front matter) in `folder`, one message each; empty when it is good.

    Checks what the Hub needs to build and list the Space: a Gradio `sdk` with an exact `sdk_version`, the
    `app_file` present, `models` and `datasets` as Hub ids (they link the Space from those pages), a
    `suggested_hardware` the Hub offers, and a `short_description` within the Hub's length limit.
    """
    folder = Path(folder)
    try:
        data = SpaceCard.load(folder / "README.md", ignore_metadata_errors=False).data
    except (OSError, ValueError) as error:
        return [f"README.md: {error}"]
    problems = []
    if data.sdk != "gradio":
        problems.append(f"sdk: {data.sdk!r}; this Space is a Gradio app, write 'sdk: gradio'.")
    if not _VERSION.match(str(data.sdk_version or "")):
        problems.append(f"sdk_version: {data.sdk_version!r}; pin the Gradio version the app is tested with "
                        "(e.g. 6.31.0).")
    if not data.app_file or not (folder / data.app_file).is_file():
        problems.append(f"app_file: {data.app_file!r} is not a file in {folder}.")
    for key in ("models", "datasets"):
        ids = getattr(data, key) or []
        if not ids or not all(isinstance(i, str) and _REPO_ID.match(i) for i in ids):
            problems.append(f"{key}: {ids!r}; list the Hub ids ('namespace/name') the Space uses.")
    hardware = data.get("suggested_hardware")
    offered = [item.value for item in SpaceHardware]
    if hardware not in offered:
        problems.append(f"suggested_hardware: {hardware!r}; choose one of {offered}.")
    description = data.get("short_description") or ""
    if not description or len(description) > _SHORT_DESCRIPTION_LIMIT:
        problems.append(f"short_description: {len(description)} characters; write one of 1 to "
                        f"{_SHORT_DESCRIPTION_LIMIT}.")
    return problems


def push_space(repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
               commit_message: str | None = None) -> CommitInfo:
    """Publish the Space folder to the Space repo `repo_id` (created with the Gradio SDK if needed).

    The card is checked first (`check_space_card`); `requirements.txt` is pinned to the installed hf-alphaedit, so
    the Space runs the demo code it was published with. Files of earlier pushes the folder no longer has are
    removed.
    """
    from ..hub import upload_folder_replacing

    problems = check_space_card(SPACE_FOLDER)
    if problems:
        raise ValueError(f"{SPACE_FOLDER / 'README.md'}: " + " ".join(problems))
    with tempfile.TemporaryDirectory() as staging:
        for name in SPACE_FILES:
            shutil.copy2(SPACE_FOLDER / name, Path(staging) / name)
        requirements = (SPACE_FOLDER / "requirements.txt").read_text(encoding="utf-8").splitlines()
        pinned = [f"{PACKAGE_REQUIREMENT}=={version('hf-alphaedit')}" if line.strip() == PACKAGE_REQUIREMENT
                  else line for line in requirements]
        (Path(staging) / "requirements.txt").write_text("\n".join(pinned) + "\n", encoding="utf-8")
        return upload_folder_replacing(staging, repo_id, private=private, token=token, repo_type="space",
                                       space_sdk="gradio", commit_message=commit_message
                                       or f"AlphaEdit demo Space (hf-alphaedit {version('hf-alphaedit')})")
