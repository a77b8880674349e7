"""Shared fixtures: the shared data folder and the real SmolLM2 model (loaded once per session)."""

from __future__ import annotations

import os

# Set before any Hugging Face library is imported: several of these are read only at import time.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data sets (``../shared/data`` next to the project root)."""
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cache root for the converted SmolLM2: ``$HF_ALPHAEDIT_CACHE`` if set (kept between runs), else a temp dir."""
    existing = os.environ.get("HF_ALPHAEDIT_CACHE")
    return Path(existing) if existing else tmp_path_factory.mktemp("hf_alphaedit_cache")


@pytest.fixture(scope="session")
def smollm2(smollm2_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """``(model, tokenizer)`` of the embedded SmolLM2-135M-Instruct (dequantized Q4_1), loaded once per session.

    Loaded offline with an empty Hub cache, so every machine tests the same weights. The model is
    shared by all tests: restore any weight you change.
    """
    from hf_alphaedit.hub import DEFAULT_MODEL, load_model_and_tokenizer

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_ALPHAEDIT_CACHE", str(smollm2_cache))
        model, tokenizer, _ = load_model_and_tokenizer(
            DEFAULT_MODEL, cache_dir=str(tmp_path_factory.mktemp("empty_hub_cache"))
        )
    return model, tokenizer
