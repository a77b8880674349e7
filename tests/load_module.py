"""A Python file that is not in a package (a script of `scripts/`, a Space's `app.py`) as a module, for its tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType


def load_module(path: str | Path, name: str) -> ModuleType:
    """Execute the file at `path` as a new module called `name` (not added to `sys.modules`)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
