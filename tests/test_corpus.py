"""Corpus loading for key statistics: local files and folders, Hub names, seeded sampling, errors."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import datasets
import huggingface_hub
import pytest

from hf_alphaedit.corpus import corpus_fingerprint, load_corpus_texts


def _non_empty_lines(*paths: Path) -> list[str]:
    return [
        line.strip()
        for path in paths
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


def _reference_sample(texts: list[str], num_samples: int, seed: int = 1) -> list[str]:
    """The reference sampler: shuffle all indices with random.Random(seed), keep the first num_samples."""
    indices = list(range(len(texts)))
    random.Random(seed).shuffle(indices)
    return [texts[i] for i in indices[:num_samples] if texts[i]]


@pytest.fixture
def wikitext(shared_data: Path) -> Path:
    return shared_data / "wikitext-2"


@pytest.fixture
def mixed_corpus(tmp_path: Path) -> Path:
    """A folder with .txt, .json and .jsonl files, plus files that must be ignored."""
    root = tmp_path / "corpus"
    (root / "sub" / ".hidden").mkdir(parents=True)
    (root / "a.txt").write_text("  first line  \n\n = = Heading = = \n   \nsecond line\n", encoding="utf-8")
    (root / "b.json").write_text(json.dumps(["json string", "", {"text": "json object"}]), encoding="utf-8")
    (root / "sub" / "c.jsonl").write_text(
        json.dumps({"text": "jsonl object", "id": 1}) + "\n\n" + json.dumps("jsonl string") + "\n",
        encoding="utf-8",
    )
    (root / "sub" / ".hidden" / "x.txt").write_text("hidden\n", encoding="utf-8")
    (root / "README").write_text("not a corpus file\n", encoding="utf-8")
    (root / "notes.md").write_text("not a corpus file either\n", encoding="utf-8")
    return root


# --- real data --------------------------------------------------------------------------------------------


def test_wikitext_folder_matches_reference_sampling(wikitext: Path) -> None:
    # Files are read sorted by name (test.txt before valid.txt); the README is not a corpus file.
    lines = _non_empty_lines(wikitext / "test.txt", wikitext / "valid.txt")
    texts = load_corpus_texts(str(wikitext), 200)
    assert texts == _reference_sample(lines, 200)
    assert len(texts) == 200
    assert all(text and text == text.strip() for text in texts)


def test_sampling_is_deterministic_and_seeded(wikitext: Path) -> None:
    corpus = str(wikitext / "valid.txt")
    first = load_corpus_texts(corpus, 50)
    assert load_corpus_texts(corpus, 50) == first
    assert load_corpus_texts(corpus, 50, seed=1) == first
    assert load_corpus_texts(corpus, 50, seed=2) != first
    # A longer sample starts with the shorter one: both are prefixes of the same permutation.
    assert load_corpus_texts(corpus, 80)[:50] == first


def test_num_samples_larger_than_corpus_returns_everything(wikitext: Path) -> None:
    lines = _non_empty_lines(wikitext / "valid.txt")
    texts = load_corpus_texts(str(wikitext / "valid.txt"), 10 * len(lines))
    assert len(texts) == len(lines)
    assert sorted(texts) == sorted(lines)


# --- local formats -----------------------------------------------------------------------------------------


def test_mixed_folder_reads_all_supported_files_in_name_order(mixed_corpus: Path) -> None:
    in_file_order = [
        "first line",
        "= = Heading = =",
        "second line",
        "json string",
        "",
        "json object",
        "jsonl object",
        "jsonl string",
    ]
    texts = load_corpus_texts(str(mixed_corpus), 100)
    # The empty JSON string takes a place in the permutation and is dropped afterwards.
    assert texts == _reference_sample(in_file_order, 100)
    assert sorted(texts) == sorted(text for text in in_file_order if text)
    assert load_corpus_texts(str(mixed_corpus), 3) == _reference_sample(in_file_order, 3)


def test_single_json_and_jsonl_files_with_custom_text_field(tmp_path: Path) -> None:
    records = [{"sentence": f"sentence {i}", "label": i % 2} for i in range(10)]
    json_file = tmp_path / "data.json"
    json_file.write_text(json.dumps(records), encoding="utf-8")
    jsonl_file = tmp_path / "data.jsonl"
    jsonl_file.write_text("\n".join(json.dumps(record) for record in records), encoding="utf-8")
    expected = _reference_sample([record["sentence"] for record in records], 4)
    assert load_corpus_texts(str(json_file), 4, text_field="sentence") == expected
    assert load_corpus_texts(str(jsonl_file), 4, text_field="sentence") == expected


def test_json_texts_are_kept_verbatim(tmp_path: Path) -> None:
    json_file = tmp_path / "data.json"
    json_file.write_text(json.dumps([" leading space", {"text": None}]), encoding="utf-8")
    assert load_corpus_texts(str(json_file), 10) == [" leading space"]


# --- Hub datasets -------------------------------------------------------------------------------------------


def test_hub_dataset_name_and_config_are_sampled_like_local_files(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [f"row {i}" if i % 7 else "" for i in range(50)]
    calls = []

    def fake_load_dataset(name: str, config: str | None, *, split: str) -> datasets.Dataset:
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": rows, "id": list(range(50))})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_corpus_texts("wikimedia/wikipedia:20231101.en", 20) == _reference_sample(rows, 20)
    assert load_corpus_texts("wikitext", 5) == _reference_sample(rows, 5)
    assert calls == [("wikimedia/wikipedia", "20231101.en", "train"), ("wikitext", None, "train")]
    with pytest.raises(ValueError, match=r"no field 'body'.*text_field"):
        load_corpus_texts("wikitext", 5, text_field="body")


def test_hub_dataset_offline_says_to_pass_a_local_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # Both libraries read HF_HUB_OFFLINE at import time; patch the values they consult.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        FileNotFoundError, match=r"statistics_corpus.*'Salesforce/wikitext:wikitext-103-raw-v1'.*local path"
    ):
        load_corpus_texts("Salesforce/wikitext:wikitext-103-raw-v1", 10)


# --- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("corpus", ["/no/such/corpus.txt", "./missing-folder/", "missing.jsonl", "a/b/c"])
def test_missing_path_raises_file_not_found(corpus: str) -> None:
    with pytest.raises(FileNotFoundError, match="statistics_corpus") as info:
        load_corpus_texts(corpus, 10)
    assert repr(corpus) in str(info.value)
    with pytest.raises(FileNotFoundError, match="statistics_corpus"):
        corpus_fingerprint(corpus)


def test_folder_without_supported_files_raises(tmp_path: Path) -> None:
    (tmp_path / "README").write_text("text\n", encoding="utf-8")
    (tmp_path / "data.csv").write_text("text\nrow\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"statistics_corpus.*no \.txt, \.json, \.jsonl files"):
        load_corpus_texts(str(tmp_path), 10)


def test_unsupported_extension_raises(tmp_path: Path) -> None:
    csv = tmp_path / "data.csv"
    csv.write_text("text\nrow\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.csv.*unsupported extension '\.csv'"):
        load_corpus_texts(str(csv), 10)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "objects.json",
            json.dumps([{"sentence": "x"}]),
            r"record 0 of .*objects\.json has no text field 'text'",
        ),
        (
            "objects.jsonl",
            json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}),
            r"record 1 of .*'text'",
        ),
        (
            "numbers.json",
            json.dumps([1, 2]),
            r"record 0 of .*numbers\.json has no text field 'text' \(a int\)",
        ),
        ("mapping.json", json.dumps({"text": ["x"]}), r"mapping\.json must hold a JSON list"),
        ("broken.json", "[1,", r"broken\.json is not valid JSON"),
        ("broken.jsonl", '{"text": "ok"}\n{oops\n', r"broken\.jsonl, line 2, is not valid JSON"),
    ],
)
def test_bad_json_raises_value_error_naming_file_and_field(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_corpus_texts(str(tmp_path / name), 10)


@pytest.mark.parametrize("num_samples", [0, -5])
def test_num_samples_below_one_raises(wikitext: Path, num_samples: int) -> None:
    with pytest.raises(ValueError, match="statistics_samples"):
        load_corpus_texts(str(wikitext), num_samples)


# --- fingerprint --------------------------------------------------------------------------------------------


def test_fingerprint_of_local_corpus_tracks_its_contents(mixed_corpus: Path, tmp_path: Path) -> None:
    before = corpus_fingerprint(str(mixed_corpus))
    assert before == corpus_fingerprint(str(mixed_corpus))
    assert before.startswith("sha256:")

    # A copy elsewhere, with new modification times (a fresh checkout or a re-synced data folder), is the same
    # corpus: its cached statistics stay valid.
    copy = shutil.copytree(mixed_corpus, tmp_path / "elsewhere", copy_function=shutil.copyfile)
    assert corpus_fingerprint(str(copy)) == before
    text_file = mixed_corpus / "a.txt"
    stat = text_file.stat()
    os.utime(text_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert corpus_fingerprint(str(mixed_corpus)) == before

    # Same size, one byte changed.
    original = text_file.read_bytes()
    text_file.write_bytes(original[:-2] + bytes([original[-2] ^ 1]) + original[-1:])
    edited = corpus_fingerprint(str(mixed_corpus))
    assert edited != before

    # The same bytes under another name are another corpus layout.
    text_file.write_bytes(original)
    assert corpus_fingerprint(str(mixed_corpus)) == before
    text_file.rename(mixed_corpus / "a2.txt")
    renamed = corpus_fingerprint(str(mixed_corpus))
    assert renamed != before

    (mixed_corpus / "sub" / "d.txt").write_text("new file\n", encoding="utf-8")
    added = corpus_fingerprint(str(mixed_corpus))
    assert added != renamed

    (mixed_corpus / "notes.md").write_text("ignored files do not count\n", encoding="utf-8")
    assert corpus_fingerprint(str(mixed_corpus)) == added


def test_fingerprint_of_single_file_and_hub_name(wikitext: Path) -> None:
    fingerprint = corpus_fingerprint(str(wikitext / "valid.txt"))
    assert fingerprint.startswith("sha256:")
    assert corpus_fingerprint(str(wikitext)) != fingerprint
    assert corpus_fingerprint("wikimedia/wikipedia:20231101.en") == "wikimedia/wikipedia:20231101.en"
    assert corpus_fingerprint("wikitext") == "wikitext"
