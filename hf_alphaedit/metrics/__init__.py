"""`evaluate` modules for knowledge editing, shipped with the package (one folder per metric, file name == folder
name, so each folder loads offline with `evaluate.load(path)` and can be pushed as a metric Space as is).

They take scores (per-token NLLs, teacher-forced token flags, generated texts), never models; the runner in
`hf_alphaedit.evaluation` computes the scores.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES: tuple[str, ...] = (
    "efficacy", "generalization", "specificity", "fluency", "zsre_accuracy", "knowledge_editing"
)


def metric_path(name: str) -> str:
    """Folder of the shipped metric `name`, for `evaluate.load(metric_path(name))`."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; shipped metrics: {', '.join(METRIC_NAMES)}")
    return str(METRICS_DIR / name)


@functools.cache
def load_metric(name: str) -> Any:
    """`evaluate.load` of a shipped metric (loaded once per process; no network access)."""
    import evaluate

    return evaluate.load(metric_path(name))
