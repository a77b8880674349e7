"""Texts for key statistics: a local corpus (files or a folder) or a Hub dataset.

Sampling follows the reference (``ALGORITHMS.md`` §2.2): every index of the corpus is shuffled with
``random.Random(seed)`` and the first ``num_samples`` of that permutation are kept, in that order;
empty texts are then dropped.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

from .fingerprint import file_sha256

SUPPORTED_SUFFIXES = (".txt", ".json", ".jsonl")

# 'name' or 'namespace/name', optionally ':config' (e.g. 'wikimedia/wikipedia:20231101.en').
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(:[\w.-]+)?")


def load_corpus_texts(corpus: str, num_samples: int, *, seed: int = 1, text_field: str = "text") -> list[str]:
    """Sample texts from a corpus, deterministically.

    Args:
        corpus: a local ``.txt`` file (one sample per non-empty line), ``.json`` file (a list of
            strings or of objects with ``text_field``), ``.jsonl`` file (one string or object per
            line), or a folder of such files (all of them, recursively, sorted by path); or a Hub
            dataset name, optionally with a config as ``name:config``, whose ``train`` split is read.
        num_samples: how many samples to draw (all of them if the corpus is smaller).
        seed: seed of the shuffle (the reference uses 1).
        text_field: the field holding the text in JSON objects and Hub datasets.

    Returns:
        The sampled non-empty texts, in the order of the seeded permutation.
    """
    if num_samples < 1:
        raise ValueError(f"statistics_samples must be at least 1, got {num_samples}.")
    source = _resolve(corpus)
    if isinstance(source, list):
        texts = [text for path in source for text in _read_file(path, text_field)]
        sampled = [texts[i] for i in _sample_indices(len(texts), num_samples, seed) if texts[i]]
    else:
        name, config = source
        dataset = _load_hub_dataset(name, config)
        if text_field not in dataset.column_names:
            raise ValueError(
                f"statistics_corpus: Hub dataset {corpus!r} has no field {text_field!r} (fields: "
                f"{', '.join(dataset.column_names)}); pass the right text_field."
            )
        sampled = [text for text in dataset.select(_sample_indices(len(dataset), num_samples, seed))[text_field]
                   if text]
    if not sampled:
        raise ValueError(f"statistics_corpus: {corpus!r} holds no non-empty text; key statistics need text to read "
                         "(one sample per non-empty line of a .txt, or JSON records with a text field).")
    return sampled


def corpus_fingerprint(corpus: str) -> str:
    """A stable id of a corpus, for cache keys.

    For a local corpus: a hash of the relative path and the bytes of every file read from it, so that editing,
    adding or removing a file changes the id, while a copy of the same files elsewhere, or the same files with new
    modification times (a fresh checkout, a re-synced data folder), keeps it and reuses cached statistics. For a Hub
    dataset: its name (with the config).
    """
    source = _resolve(corpus)
    if not isinstance(source, list):
        name, config = source
        return f"{name}:{config}" if config else name
    root = Path(corpus).expanduser().resolve()
    digest = hashlib.sha256()
    for path in source:
        relative = path.relative_to(root).as_posix() if root.is_dir() else path.name
        digest.update(f"{relative}\0{file_sha256(path)}\n".encode())
    return f"sha256:{digest.hexdigest()[:16]}"


def _resolve(corpus: str) -> list[Path] | tuple[str, str | None]:
    """The files of a local corpus, or ``(name, config)`` of a Hub dataset."""
    path = Path(corpus).expanduser()
    if path.is_dir():
        root = path.resolve()
        files = sorted(
            (
                file
                for file in root.rglob("*")
                if file.is_file()
                and file.suffix.lower() in SUPPORTED_SUFFIXES
                and not any(part.startswith(".") for part in file.relative_to(root).parts)
            ),
            key=lambda file: file.as_posix(),
        )
        if not files:
            raise ValueError(
                f"statistics_corpus: folder {str(path)!r} has no {', '.join(SUPPORTED_SUFFIXES)} files; "
                "put the corpus files there or pass a file or a Hub dataset name."
            )
        return files
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise ValueError(
                f"statistics_corpus: {str(path)!r} has unsupported extension {path.suffix!r}; "
                f"use one of {', '.join(SUPPORTED_SUFFIXES)} or a folder of such files."
            )
        return [path.resolve()]
    if _HUB_NAME.fullmatch(corpus) and not corpus.lower().endswith(SUPPORTED_SUFFIXES):
        name, _, config = corpus.partition(":")
        return name, config or None
    raise FileNotFoundError(
        f"statistics_corpus: {corpus!r} is neither an existing file or folder nor a Hub dataset name "
        "('name' or 'namespace/name', optionally ':config'). Pass a .txt/.json/.jsonl file or a folder of "
        "them (e.g. the wikitext-2 folder)."
    )


def _read_file(path: Path, text_field: str) -> list[str]:
    """All texts of one corpus file: stripped non-empty lines of a ``.txt``, JSON records as they are."""
    try:
        return _read_records(path, text_field)
    except UnicodeDecodeError as err:
        raise ValueError(f"statistics_corpus: {path} is not UTF-8 text ({err.reason} at byte {err.start}); give "
                         "text files (.txt, .json, .jsonl).") from None


def _read_records(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8") as handle:
        if suffix == ".txt":
            return [line.strip() for line in handle if line.strip()]
        if suffix == ".jsonl":
            records = []
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(
                            f"statistics_corpus: {path}, line {number}, is not valid JSON: {err}"
                        ) from err
        else:
            try:
                records = json.load(handle)
            except json.JSONDecodeError as err:
                raise ValueError(f"statistics_corpus: {path} is not valid JSON: {err}") from err
            if not isinstance(records, list):
                raise ValueError(
                    f"statistics_corpus: {path} must hold a JSON list of strings or of objects with "
                    f"{text_field!r}, not a {type(records).__name__}."
                )
    return [_record_text(record, path, index, text_field) for index, record in enumerate(records)]


def _record_text(record: Any, path: Path, index: int, text_field: str) -> str:
    """The text of one JSON record: the record itself if a string, else its ``text_field``."""
    if isinstance(record, dict) and text_field in record:
        record = record[text_field]
        if record is None:
            return ""
    if isinstance(record, str):
        return record
    found = f"fields {sorted(record)}" if isinstance(record, dict) else f"a {type(record).__name__}"
    raise ValueError(
        f"statistics_corpus: record {index} of {path} has no text field {text_field!r} ({found}); "
        "records must be strings or objects with that field: pass the right text_field."
    )


def _sample_indices(size: int, num_samples: int, seed: int) -> list[int]:
    """The first ``num_samples`` indices of a ``random.Random(seed)`` permutation of ``range(size)``."""
    indices = list(range(size))
    random.Random(seed).shuffle(indices)
    return indices[:num_samples]


def _load_hub_dataset(name: str, config: str | None) -> Any:
    """The ``train`` split of a Hub dataset, with an actionable error when it cannot be loaded."""
    import datasets  # slow to import, and only needed for Hub corpora

    try:
        return datasets.load_dataset(name, config, split="train")
    except (ConnectionError, FileNotFoundError) as err:
        label = f"{name}:{config}" if config else name
        raise FileNotFoundError(
            f"statistics_corpus: could not load the Hub dataset {label!r} ({err}). Without internet, pass a "
            "local path instead: a .txt/.json/.jsonl file or a folder of them (e.g. the wikitext-2 folder)."
        ) from err
