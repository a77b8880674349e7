"""The installed dependencies are inside the ranges pyproject.toml pins (the ranges the suite is known to pass on),
so a CI run on a newer, untested release cannot pass without someone widening a range on purpose."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
_PROJECT = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
PINNED = [Requirement(spec) for spec in [*_PROJECT["dependencies"], *_PROJECT["optional-dependencies"]["dev"]]]


@pytest.mark.parametrize("requirement", PINNED, ids=lambda r: r.name)
def test_installed_version_is_in_the_pinned_range(requirement):
    installed = importlib.metadata.version(requirement.name)
    assert requirement.specifier.contains(installed, prereleases=True), (
        f"{requirement.name} {installed} is outside the tested range {requirement.specifier} in pyproject.toml")
