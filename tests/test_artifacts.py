"""Key statistics and projectors as artifacts: format, checks, caching, and the Hub through the real client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from hf_alphaedit import AlphaEditModel, EditingArguments, KeyStatistics, NullSpaceProjector
from hf_alphaedit.artifacts import (
    ARTIFACT_CONFIG,
    ArtifactError,
    CorruptArtifactError,
    default_artifact_repo_id,
    statistics_path,
)
from hf_alphaedit.fingerprint import file_sha256
from hf_alphaedit.hub import ModelSource
from hf_alphaedit.statistics import collect_key_statistics
from tests.tiny_models import tiny_causal_lm, tiny_tokenizer

LAYERS = [1, 2]
REQUESTS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle", "target_new": "English language"},
]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _args(tmp_path: Path, corpus: Path | str, **overrides) -> EditingArguments:
    values = {"statistics_corpus": str(corpus), "statistics_samples": 60, "layers": LAYERS,
              "statistics_cache_dir": str(tmp_path / "stats"), "disable_tqdm": True, "v_num_grad_steps": 6,
              "v_lr": 0.5, "nullspace_threshold": 0.5, "nullspace_threshold_mode": "energy", "projection": "compute"}
    values.update(overrides)
    return EditingArguments(**values)


def _editor(tmp_path: Path, corpus: Path | str, family: str = "llama", name: str = "tester/tiny-llama",
            **overrides) -> AlphaEditModel:
    """A tiny model posing as the Hub model `name` at commit `COMMIT` (the same weights for every call)."""
    source = ModelSource(name, None, COMMIT, "hub")
    return AlphaEditModel(tiny_causal_lm(family), tiny_tokenizer(), _args(tmp_path, corpus, **overrides), source)


@pytest.fixture(scope="module")
def projector(tmp_path_factory, corpus_file) -> NullSpaceProjector:
    return _editor(tmp_path_factory.mktemp("p"), corpus_file).null_space_projector(LAYERS)


def test_local_round_trip_is_exact_and_documented(tmp_path, projector):
    projector.save_pretrained(tmp_path / "artifact")
    loaded = NullSpaceProjector.from_pretrained(tmp_path / "artifact")
    assert loaded.layers == LAYERS and loaded.threshold == 0.5 and loaded.threshold_mode == "energy"
    for layer in LAYERS:
        assert torch.equal(loaded.statistics.sums[layer], projector.statistics.sums[layer])
        assert loaded.statistics.counts[layer] == projector.statistics.counts[layer]
        assert torch.equal(loaded.eigenvalues[layer], projector.eigenvalues[layer])
        assert torch.allclose(loaded.dense(layer), projector.dense(layer), atol=1e-12)
    config = json.loads((tmp_path / "artifact" / ARTIFACT_CONFIG).read_text())
    assert config["base_model"] == "tester/tiny-llama" and config["base_model_commit"] == COMMIT
    assert config["model_type"] == "llama" and config["key_size"] == 128 and config["hidden_size"] == 64
    assert config["modules"] == {"1": "model.layers.1.mlp.down_proj", "2": "model.layers.2.mlp.down_proj"}
    assert config["samples"] == 60 and config["tokens"]["1"] == projector.statistics.counts[1]
    assert config["projector"]["null_space_dims"] == {str(k): projector.null_space_dim(k) for k in LAYERS}
    assert not list((tmp_path / "artifact").rglob("*.pt")) and not list((tmp_path / "artifact").rglob(".artifact-*"))
    card = ModelCard.load(tmp_path / "artifact" / "README.md")
    assert card.data.base_model == "tester/tiny-llama" and "key-statistics" in card.data.tags
    assert "model.layers.2.mlp.down_proj" in card.text and "NullSpaceProjector.from_pretrained" in card.text


def test_the_smaller_basis_is_stored_and_either_gives_the_same_projector(tmp_path, projector):
    """A null space wider than half the key space is stored as its complement: same projector, fewer bytes."""
    wide = NullSpaceProjector.from_statistics(projector.statistics, 0.99, "energy")
    narrow = NullSpaceProjector.from_statistics(projector.statistics, 0.01, "energy")
    for name, built in (("wide", wide), ("narrow", narrow)):
        built.save_pretrained(tmp_path / name)
        loaded = NullSpaceProjector.from_pretrained(tmp_path / name)
        for layer in LAYERS:
            assert loaded.null_space_dim(layer) == built.null_space_dim(layer)
            assert torch.allclose(loaded.dense(layer), built.dense(layer), atol=1e-12)
    representation = json.loads((tmp_path / "wide" / ARTIFACT_CONFIG).read_text())["projector"]["representation"]
    assert set(representation.values()) == {"complement"}
    stored = load_file(str(tmp_path / "wide" / "projector" / "layer_001.safetensors"))["basis"]
    assert stored.shape == (128, 128 - wide.null_space_dim(1))


def test_another_threshold_is_computed_from_the_stored_statistics(tmp_path, projector):
    projector.save_pretrained(tmp_path / "artifact")
    loaded = NullSpaceProjector.from_pretrained(tmp_path / "artifact", threshold=0.2)
    expected = NullSpaceProjector.from_statistics(projector.statistics, 0.2, "energy")
    assert loaded.threshold == 0.2
    for layer in LAYERS:
        assert torch.equal(loaded.bases[layer], expected.bases[layer])


def test_statistics_only_artifact(tmp_path, projector):
    projector.statistics.save_pretrained(tmp_path / "stats")
    statistics = KeyStatistics.from_pretrained(tmp_path / "stats", layers=[2])
    assert statistics.layers == [2] and torch.equal(statistics.sums[2], projector.statistics.sums[2])
    with pytest.raises(ArtifactError, match="no projector; pass threshold="):
        NullSpaceProjector.from_pretrained(tmp_path / "stats")
    built = NullSpaceProjector.from_pretrained(tmp_path / "stats", threshold=0.5, threshold_mode="energy")
    assert torch.equal(built.bases[1], projector.bases[1])


def test_merged_shards_equal_one_pass_over_the_union(tmp_path, corpus_file):
    editor = _editor(tmp_path, corpus_file)
    texts = corpus_file.read_text().splitlines()
    kwargs = {"max_length": 128, "batch_tokens": 512, "show_progress": False}
    model, tokenizer, spec = editor.model, editor.tokenizer, editor.spec
    union = collect_key_statistics(model, tokenizer, spec, LAYERS, texts, **kwargs)
    first = collect_key_statistics(model, tokenizer, spec, LAYERS, texts[:25], **kwargs)
    second = collect_key_statistics(model, tokenizer, spec, LAYERS, texts[25:], **kwargs)
    merged = first.merge(second)
    for layer in LAYERS:
        assert merged.counts[layer] == union.counts[layer]
        assert torch.allclose(merged.sums[layer], union.sums[layer], rtol=1e-6, atol=1e-6)
    assert merged.metadata["samples"] == union.metadata["samples"] == 60
    assert merged.metadata["tokens"] == union.metadata["tokens"]


def test_mismatched_model_is_refused_naming_both_sides(tmp_path, projector, corpus_file):
    projector.save_pretrained(tmp_path / "artifact")
    gpt2 = _editor(tmp_path, corpus_file, family="gpt2", name="tester/tiny-gpt2")
    with pytest.raises(ArtifactError, match=r"model_type: artifact 'llama', model 'gpt2'"):
        NullSpaceProjector.from_pretrained(tmp_path / "artifact", model=gpt2)
    with pytest.raises(ArtifactError, match=r"no statistics for layer\(s\) \[3\]; it covers layers \[1, 2\]"):
        NullSpaceProjector.from_pretrained(tmp_path / "artifact", layers=[2, 3])
    other = _editor(tmp_path, corpus_file, projection=str(tmp_path / "artifact"), layers=[2, 3])
    with pytest.raises(ArtifactError, match="layer"):
        other.edit(REQUESTS)


def test_revision_mismatch_warns_or_fails_when_strict(tmp_path, projector, corpus_file):
    projector.save_pretrained(tmp_path / "artifact")
    editor = _editor(tmp_path, corpus_file)
    editor.source = ModelSource("tester/tiny-llama", None, "f" * 40, "hub")
    with pytest.warns(UserWarning, match="revision: artifact '0123"):
        NullSpaceProjector.from_pretrained(tmp_path / "artifact", model=editor)
    with pytest.raises(ArtifactError, match="strict=False"):
        NullSpaceProjector.from_pretrained(tmp_path / "artifact", model=editor, strict=True)
    editor.source = ModelSource("tester/tiny-llama", None, COMMIT, "hub")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NullSpaceProjector.from_pretrained(tmp_path / "artifact", model=editor)


def test_corrupt_truncated_nan_or_missing_files_are_refused(tmp_path, projector):
    projector.save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / statistics_path(1)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptArtifactError, match="layer_001.safetensors is corrupt or truncated"):
        NullSpaceProjector.from_pretrained(tmp_path / "a")
    # A producer that wrote NaN statistics with a matching checksum is still caught.
    projector.save_pretrained(tmp_path / "b")
    path = tmp_path / "b" / statistics_path(2)
    tensors = load_file(str(path))
    tensors["upper"][3] = float("nan")
    save_file(tensors, str(path))
    config = json.loads((tmp_path / "b" / ARTIFACT_CONFIG).read_text())
    config["files"][statistics_path(2)] = {"sha256": file_sha256(path), "size": path.stat().st_size}
    (tmp_path / "b" / ARTIFACT_CONFIG).write_text(json.dumps(config))
    with pytest.raises(CorruptArtifactError, match="NaN or Inf"):
        NullSpaceProjector.from_pretrained(tmp_path / "b")
    projector.save_pretrained(tmp_path / "c")
    (tmp_path / "c" / statistics_path(2)).unlink()
    with pytest.raises(ArtifactError, match="layer_002.safetensors is missing"):
        NullSpaceProjector.from_pretrained(tmp_path / "c")
    nan_stats = KeyStatistics({1: torch.full((128, 128), float("nan"), dtype=torch.float64)}, {1: 5},
                              dict(projector.statistics.metadata))
    with pytest.raises(ArtifactError, match="NaN or Inf; refusing"):
        nan_stats.save_pretrained(tmp_path / "d")
    assert not (tmp_path / "d" / ARTIFACT_CONFIG).exists()


# -- through the Hub (local emulator, real huggingface_hub client) -------------------------------------------


def test_push_then_fetch_from_an_empty_cache_is_bit_identical(tmp_path, projector, hub_server, unique_repo_id,
                                                              fresh_hf_cache):
    repo_id = unique_repo_id("tiny-llama-key-statistics")
    commit = projector.push_to_hub(repo_id)
    assert commit == hub_server.head_sha(repo_id)
    fetched = NullSpaceProjector.from_pretrained(repo_id)
    assert fetched.source["repo_id"] == repo_id and fetched.source["revision"] == commit
    for layer in LAYERS:
        assert torch.equal(fetched.statistics.sums[layer], projector.statistics.sums[layer])
        assert torch.equal(fetched.bases[layer], projector.bases[layer])
    assert list(fresh_hf_cache.rglob(ARTIFACT_CONFIG))
    card = ModelCard.load(repo_id)
    assert card.data.base_model == "tester/tiny-llama" and card.data.library_name == "hf_alphaedit"
    # A fresh process with its own empty cache reads the same bytes (LAPACK's QR, which rebuilds a stored
    # complement, is deterministic for a given number of threads: the other process uses as many as this one).
    script = ("import hashlib, sys, torch\nfrom hf_alphaedit import NullSpaceProjector\n"
              f"torch.set_num_threads({torch.get_num_threads()})\n"
              "p = NullSpaceProjector.from_pretrained(sys.argv[1])\n"
              "print(hashlib.sha256(p.bases[2].numpy().tobytes()).hexdigest())")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "other-cache")}
    fetched = subprocess.run([sys.executable, "-c", script, repo_id], env=env, capture_output=True, text=True,
                             cwd=Path(__file__).parents[1])
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    import hashlib

    assert fetched.stdout.split()[-1] == hashlib.sha256(projector.bases[2].numpy().tobytes()).hexdigest()


def test_edit_with_a_fetched_projector_never_collects_statistics(tmp_path, corpus_file, hub_server,
                                                                 unique_repo_id, fresh_hf_cache):
    repo_id = unique_repo_id("tiny-llama-key-statistics")
    computed = _editor(tmp_path / "a", corpus_file, push_projection_to_hub=True, projection_hub_repo_id=repo_id)
    computed.edit(REQUESTS)
    assert computed.projection_source["repo_id"] == repo_id
    fetched = _editor(tmp_path / "b", tmp_path / "does-not-exist.txt", projection=repo_id)
    fetched.edit(REQUESTS)
    assert fetched.projection_source["revision"] == hub_server.head_sha(repo_id)
    for layer in LAYERS:
        assert torch.equal(fetched.spec.weight(fetched.model, layer), computed.spec.weight(computed.model, layer))
    assert not (tmp_path / "b" / "stats").exists()
    # Another threshold reuses the fetched statistics; still no corpus needed.
    rethresholded = _editor(tmp_path / "c", tmp_path / "does-not-exist.txt", projection=repo_id,
                            nullspace_threshold=0.3)
    assert rethresholded.projector.threshold == 0.3


def test_auto_uses_the_conventional_repo_and_falls_back_to_computing(tmp_path, projector, corpus_file,
                                                                     hub_server, unique_repo_id, monkeypatch):
    name = unique_repo_id("tiny-llama")
    monkeypatch.setenv("HF_ALPHAEDIT_NAMESPACE", "tester")
    repo_id = default_artifact_repo_id(name)
    assert repo_id == f"tester/{name.split('/')[1]}-key-statistics"
    missing = _editor(tmp_path / "a", corpus_file, name=name, projection="auto")
    assert missing.projector.layers == LAYERS and missing.projection_source is None
    projector.push_to_hub(repo_id)
    found = _editor(tmp_path / "b", tmp_path / "does-not-exist.txt", name=name, projection="auto")
    found.edit(REQUESTS[:1])
    assert found.projection_source["repo_id"] == repo_id
    gpt2 = _editor(tmp_path / "c", corpus_file, family="gpt2", name=name, projection="auto")
    assert gpt2.projector.layers == LAYERS and gpt2.projection_source is None  # wrong model: computed instead
    explicit = _editor(tmp_path / "d", corpus_file, family="gpt2", name=name, projection=repo_id)
    with pytest.raises(ArtifactError, match="model_type"):
        explicit.edit(REQUESTS[:1])


def test_corrupt_hub_artifact_is_refused_and_not_cached(projector, hub_server, unique_repo_id, fresh_hf_cache):
    repo_id = unique_repo_id("tiny-llama-key-statistics")
    projector.push_to_hub(repo_id)
    good = hub_server.file_bytes(repo_id, statistics_path(1))
    hub_server.corrupt_file(repo_id, statistics_path(1), good[: len(good) // 2])
    with pytest.raises(CorruptArtifactError, match="removed from the cache"):
        NullSpaceProjector.from_pretrained(repo_id)
    assert not [p for p in fresh_hf_cache.rglob("*.safetensors") if p.exists()]
    hub_server.corrupt_file(repo_id, statistics_path(1), good)
    assert NullSpaceProjector.from_pretrained(repo_id).layers == LAYERS


def test_a_fetched_artifact_loads_offline_without_any_request(projector, hub_server, unique_repo_id,
                                                              fresh_hf_cache, monkeypatch):
    repo_id = unique_repo_id("tiny-llama-key-statistics")
    projector.push_to_hub(repo_id)
    NullSpaceProjector.from_pretrained(repo_id)
    hub_server.clear_requests()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    offline = NullSpaceProjector.from_pretrained(repo_id)
    assert hub_server.requests == []
    assert torch.equal(offline.bases[1], projector.bases[1])
