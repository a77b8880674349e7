"""Hostile and careless use (issue 13): each test reproduces a way the package used to go wrong, on tiny models, the
local Hub emulator and real files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from hf_alphaedit import (
    AlphaEditModel,
    EditingArguments,
    EditRequestError,
    NullSpaceProjector,
    publishing,
)
from hf_alphaedit.artifacts import ARTIFACT_CONFIG, CorruptArtifactError, projector_path, statistics_path
from hf_alphaedit.checkpointing import (
    CheckpointError,
    checkpoint_folders,
    edit_sequentially,
    latest_checkpoint,
    load_checkpoint,
    restore_checkpoint,
    run_identity,
    save_checkpoint,
)
from hf_alphaedit.errors import NonFiniteError
from hf_alphaedit.hub import ModelSource
from hf_alphaedit.methods import AlphaEdit
from hf_alphaedit.requests import as_edit_requests, load_records
from tests.tiny_models import tiny_causal_lm_with_large_activations, tiny_tokenizer

REQUESTS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle", "target_new": "English language"},
    {"prompt": "{}, who plays the", "subject": "Miles Davis", "target_new": "piano"},
]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _model(seed: int = 0) -> torch.nn.Module:
    return tiny_causal_lm_with_large_activations("llama", seed)


def _args(corpus: Path, cache: Path, **overrides) -> EditingArguments:
    values = {"statistics_corpus": str(corpus), "statistics_samples": 60, "layers": [1, 2],
              "statistics_cache_dir": str(cache), "disable_tqdm": True, "v_num_grad_steps": 6, "v_lr": 0.5,
              "projection": "compute"}
    return EditingArguments(**{**values, **overrides})


def _editor(corpus: Path, cache: Path, model: torch.nn.Module | None = None, source: ModelSource | None = None,
            **overrides) -> AlphaEditModel:
    return AlphaEditModel(model if model is not None else _model(), tiny_tokenizer(), _args(corpus, cache, **overrides),
                          source)


def _parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bitwise equality of two parameter sets, NaN included."""
    return a.keys() == b.keys() and all(
        torch.equal(torch.nan_to_num(a[k], nan=1234.5), torch.nan_to_num(b[k], nan=1234.5))
        and torch.equal(torch.isnan(a[k]), torch.isnan(b[k])) for k in a)


# -- 1. published edits carry no side effects; pushes delete only their own files ---------------------------------


def test_published_settings_with_side_effects_never_reach_the_loader(tmp_path, corpus_file, caplog):
    editor = _editor(corpus_file, tmp_path / "stats")
    editor.edit(REQUESTS[:1])
    folder = editor.save_pretrained(tmp_path / "published")
    config = json.loads((folder / publishing.EDITING_CONFIG).read_text())
    hostile = {"push_projection_to_hub": True, "projection_hub_repo_id": "victim/model", "hub_token": "hf_stolen",
               "hub_private_repo": False, "output_dir": str(tmp_path / "evil"), "save_steps": 1, "save_total_limit": None,
               "statistics_cache_dir": str(tmp_path / "evil-cache"), "resume_from_checkpoint": str(tmp_path),
               "overwrite_output_dir": True, "statistics_corpus": "/etc/hostname", "projection": str(tmp_path)}
    config["editing_args"].update(hostile)
    config["hyperparameters"].update(hostile)  # unset settings take the published resolved values, but never these
    (folder / publishing.EDITING_CONFIG).write_text(json.dumps(config))
    base = tmp_path / "base"
    _model().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    with caplog.at_level(logging.WARNING, logger="hf_alphaedit"):
        loaded = AlphaEditModel.from_pretrained(str(base), edits=folder)
    defaults = EditingArguments()
    for name in hostile:
        assert getattr(loaded.editing_args, name) == getattr(defaults, name), name
    assert loaded.editing_args.layers == [1, 2] and loaded.editing_args.v_lr == 0.5  # what shapes the edits stays
    assert "ignoring their settings" in caplog.text and "push_projection_to_hub" in caplog.text
    assert loaded.state.num_edits == 1
    # Hub names are not local paths: they are kept.
    kept = EditingArguments.from_published({"statistics_corpus": "Salesforce/wikitext:wikitext-103-raw-v1",
                                            "projection": "someone/tiny-key-statistics"})
    assert (kept.statistics_corpus, kept.projection) == ("Salesforce/wikitext:wikitext-103-raw-v1",
                                                         "someone/tiny-key-statistics")


def test_published_config_records_no_local_path_or_push_setting(tmp_path, corpus_file):
    editor = _editor(corpus_file, tmp_path / "stats", projection_hub_repo_id="me/stats", hub_token="hf_secret")
    editor.edit(REQUESTS[:1])
    editor.editing_args.push_projection_to_hub = True
    editor.editing_args.projection = str(tmp_path)  # as if the statistics had come from this local artifact
    saved = publishing.editing_config(editor, "delta")["editing_args"]
    assert saved["push_projection_to_hub"] is False and saved["projection_hub_repo_id"] is None
    assert saved["hub_token"] is None and saved["statistics_cache_dir"] is None
    assert saved["statistics_corpus"] == "<local>/corpus.txt" and saved["projection"] == f"<local>/{tmp_path.name}"


def test_a_projection_push_keeps_the_files_it_did_not_write(tmp_path, corpus_file, hub_api, unique_repo_id):
    repo_id = unique_repo_id("victim")
    hub_api.create_repo(repo_id)
    hub_api.upload_file(path_or_fileobj=b'{"model_type": "llama"}', path_in_repo="config.json", repo_id=repo_id)
    hub_api.upload_file(path_or_fileobj=b"my notes", path_in_repo="notes.md", repo_id=repo_id)
    projector = _editor(corpus_file, tmp_path / "stats").null_space_projector([1, 2])
    projector.push_to_hub(repo_id)
    projector.statistics.subset([1]).push_to_hub(repo_id)  # a second push that has fewer files
    files = set(hub_api.list_repo_files(repo_id))
    assert {"config.json", "notes.md", ARTIFACT_CONFIG, statistics_path(1)} <= files
    assert statistics_path(2) not in files and projector_path(1) not in files  # the earlier artifact's own files


def test_an_edit_push_replaces_its_own_files_and_keeps_others(tmp_path, corpus_file, hub_api, unique_repo_id):
    repo_id = unique_repo_id("edits")
    editor = _editor(corpus_file, tmp_path / "stats")
    editor.edit(REQUESTS[:1])
    editor.push_to_hub(repo_id)
    hub_api.upload_file(path_or_fileobj=b"my notes", path_in_repo="notes.md", repo_id=repo_id)
    with pytest.raises(FileExistsError, match="holds a full edited checkpoint"):
        editor.push_edits_to_hub(repo_id, format="delta")
    editor.push_edits_to_hub(repo_id, format="delta", overwrite=True)
    files = set(hub_api.list_repo_files(repo_id))
    assert "notes.md" in files and "model.safetensors" not in files and "config.json" not in files
    foreign = unique_repo_id("foreign-weights")
    hub_api.create_repo(foreign)
    hub_api.upload_file(path_or_fileobj=b"not ours", path_in_repo="pytorch_model.bin", repo_id=foreign)
    with pytest.raises(FileExistsError, match="weight files this package did not write"):
        editor.push_to_hub(foreign)


# -- 2. the statistics cache is keyed on the weights -----------------------------------------------------------


def test_statistics_of_different_weights_are_never_shared(tmp_path, corpus_file):
    cache = tmp_path / "stats"
    first = _editor(corpus_file, cache, _model(seed=0)).key_statistics([1])
    second = _editor(corpus_file, cache, _model(seed=1)).key_statistics([1])
    assert not torch.allclose(first.sums[1], second.sums[1])
    again = _editor(corpus_file, cache, _model(seed=0)).key_statistics([1])
    assert torch.equal(first.sums[1], again.sums[1]) and len(list(cache.glob("*.safetensors"))) == 2
    # Another model saved into the same folder is another model.
    folder = tmp_path / "model"
    tiny_tokenizer().save_pretrained(folder)
    for seed, expected in ((0, first), (1, second)):
        _model(seed).save_pretrained(folder)
        loaded = _editor(corpus_file, cache, AlphaEditModel.from_pretrained(str(folder)).model)
        assert torch.equal(loaded.key_statistics([1]).sums[1], expected.sums[1])


def test_statistics_of_a_copied_corpus_are_read_from_the_cache(tmp_path, corpus_file):
    """A data folder synced again (new modification times) or moved is the same corpus: its statistics, hours of
    forward passes on a real model, are not collected again."""
    cache = tmp_path / "stats"
    first = _editor(corpus_file, cache).key_statistics([1])
    copy = tmp_path / "synced" / corpus_file.name
    copy.parent.mkdir()
    copy.write_bytes(corpus_file.read_bytes())
    again = _editor(copy, cache).key_statistics([1])
    assert torch.equal(first.sums[1], again.sums[1]) and len(list(cache.glob("*.safetensors"))) == 1
    copy.write_text(copy.read_text(encoding="utf-8") + "\nOne more line of text.", encoding="utf-8")
    changed = _editor(copy, cache).key_statistics([1])
    assert not torch.equal(changed.sums[1], first.sums[1]) and len(list(cache.glob("*.safetensors"))) == 2


# -- 3. non-finite values never reach the weights or the cache ------------------------------------------------


def test_a_nan_in_the_model_is_refused_atomically_and_never_cached(tmp_path, corpus_file):
    model = _model()
    with torch.no_grad():
        model.model.layers[3].self_attn.o_proj.weight[0, 0] = float("nan")  # above the edited layers
    editor = _editor(corpus_file, tmp_path / "stats", model)
    before = _parameters(editor.model)
    with pytest.raises(NonFiniteError, match="not finite"):
        editor.edit(REQUESTS[:2])
    assert _same(before, _parameters(editor.model)) and editor.state.num_edits == 0
    low = _model()
    with torch.no_grad():
        low.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")  # below them: the statistics
    with pytest.raises(NonFiniteError, match="key statistics of model.layers.1.mlp.down_proj"):
        _editor(corpus_file, tmp_path / "stats2", low).key_statistics([1, 2])
    assert not list((tmp_path / "stats2").glob("*.safetensors"))


def test_non_finite_targets_are_named_by_request(tmp_path):
    from hf_alphaedit.architectures import resolve_model_spec
    from hf_alphaedit.methods.prompts import generate_context_templates
    from hf_alphaedit.methods.targets import TargetOptimizer
    from hf_alphaedit.requests import as_edit_requests

    model = _model().requires_grad_(False)
    templates = generate_context_templates(model, tiny_tokenizer(), 6, 2, seed=0)
    with torch.no_grad():
        model.model.layers[3].self_attn.o_proj.weight[0, 0] = float("nan")
    spec = resolve_model_spec(model)
    optimizer = TargetOptimizer(model, tiny_tokenizer(), spec, EditingArguments(layers=[1, 2]).resolve(spec), templates)
    with pytest.raises(NonFiniteError, match="target values of request.*'The Eiffel Tower'"):
        optimizer.optimize(as_edit_requests(REQUESTS[:1]))


def test_a_non_finite_update_is_refused_before_anything_is_applied(tmp_path, corpus_file, monkeypatch):
    editor = _editor(corpus_file, tmp_path / "stats")
    editor.edit(REQUESTS[:1])
    before = _parameters(editor.model)
    solve = type(editor.method).solve
    monkeypatch.setattr(type(editor.method), "solve",
                        lambda self, layer, keys, residuals: solve(self, layer, keys, residuals) * float("nan"))
    with pytest.raises(NonFiniteError, match="the update of model.layers.1.mlp.down_proj"):
        editor.edit(REQUESTS[1:2])
    assert _same(before, _parameters(editor.model)) and editor.state.num_edits == 1


# -- 5. every setting is checked when it is given -----------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("v_num_grad_steps", 0), ("v_num_grad_steps", -3), ("v_weight_decay", float("nan")),
    ("v_early_stop_loss", float("nan")), ("statistics_max_length", 0), ("statistics_max_length", -1),
    ("context_template_length", 10**6), ("batch_size", float("inf")), ("batch_size", None), ("l2", 0.0),
    ("kl_factor", -1.0), ("clamp_norm_factor", float("inf")), ("target_batch_tokens", 0)])
def test_bad_numbers_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"EditingArguments\.{field}"):
        EditingArguments(**{field: value})


def test_yaml_values_are_refused_naming_the_field():
    for text in ("batch_size: .inf", "batch_size: null", "statistics_max_length: -1", "v_lr: .nan"):
        with pytest.raises(ValueError, match=r"EditingArguments\.(batch_size|statistics_max_length|v_lr)"):
            EditingArguments(**yaml.safe_load(text))


def test_edit_refuses_no_requests_and_bad_batch_sizes(tmp_path, corpus_file):
    editor = _editor(corpus_file, tmp_path / "stats")
    with pytest.raises(ValueError, match="no edit requests"):
        editor.edit([])
    for size in (-1, 0, 1.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            editor.edit(REQUESTS, batch_size=size)
    assert editor.state.num_edits == 0


# -- 6. inputs that would exhaust memory or fail obscurely ------------------------------------------------------


def test_a_prompt_longer_than_the_context_is_refused_up_front(tmp_path, corpus_file):
    editor = _editor(corpus_file, tmp_path / "stats")
    long_prompt = "word " * 400 + "{} is in"
    with pytest.raises(ValueError, match="do not fit the model's context of 128 positions"):
        editor.edit([{"prompt": long_prompt, "subject": "Paris", "target_new": "Rome"}])
    assert not (tmp_path / "stats").exists()  # refused before any statistics pass


def test_empty_and_binary_inputs_name_the_file(tmp_path, corpus_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="holds no non-empty text"):
        _editor(empty, tmp_path / "stats").edit(REQUESTS[:1])
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=f"{binary} is not UTF-8 text"):
        _editor(binary, tmp_path / "stats").edit(REQUESTS[:1])
    requests = tmp_path / "requests.json"
    requests.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(EditRequestError, match="requests.json.*not UTF-8"):
        load_records(requests)


def test_a_malformed_artifact_at_the_auto_repo_falls_back_to_computing(tmp_path, corpus_file, hub_api,
                                                                      unique_repo_id, monkeypatch):
    namespace = unique_repo_id("ns").split("/")[1]
    monkeypatch.setenv("HF_ALPHAEDIT_NAMESPACE", namespace)
    repo_id = f"{namespace}/tiny-llama-key-statistics"
    hub_api.create_repo(repo_id)
    hub_api.upload_file(path_or_fileobj=b'{"format": "hf_alphaedit/key-statistics", "format_version": 1, '
                                        b'"layers": "all"}', path_in_repo=ARTIFACT_CONFIG, repo_id=repo_id)
    editor = _editor(corpus_file, tmp_path / "stats", source=ModelSource("tester/tiny-llama", None, COMMIT, "hub"),
                     projection="auto")
    assert editor.null_space_projector([1, 2]).layers == [1, 2]
    assert editor.projection_source is None  # computed, not taken from the malformed artifact


def _projector(tmp_path: Path, corpus: Path) -> NullSpaceProjector:
    source = ModelSource("tester/tiny-llama", None, COMMIT, "hub")
    return _editor(corpus, tmp_path / "stats", source=source).null_space_projector([1, 2])


def _rewrite(folder: Path, relative: str, tensors: dict[str, torch.Tensor] | None = None,
             raw: bytes | None = None) -> None:
    """Replace one artifact file and record its new checksum, as a hostile producer would."""
    path = folder / relative
    if raw is not None:
        path.write_bytes(raw)
    else:
        save_file(tensors, str(path))
    config = json.loads((folder / ARTIFACT_CONFIG).read_text())
    config["files"][relative] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "size": path.stat().st_size}
    (folder / ARTIFACT_CONFIG).write_text(json.dumps(config))


def test_hostile_artifact_files_are_refused_and_evicted(tmp_path, corpus_file, hub_api, unique_repo_id,
                                                        fresh_hf_cache):
    import pickle

    projector = _projector(tmp_path, corpus_file)
    cases = {
        "pickle": lambda folder: _rewrite(folder, statistics_path(1), raw=pickle.dumps({"upper": [1.0]})),
        "nan basis": lambda folder: _rewrite(folder, projector_path(2), {
            **load_file(str(folder / projector_path(2))),
            "basis": torch.full_like(load_file(str(folder / projector_path(2)))["basis"], float("nan"))}),
        "negative count": lambda folder: _rewrite(folder, statistics_path(2), {
            **load_file(str(folder / statistics_path(2))), "count": torch.tensor([-5])}),
    }
    messages = {"pickle": "not a safetensors file", "nan basis": "NaN or Inf", "negative count": "key count is -5"}
    for name, corrupt in cases.items():
        folder = tmp_path / name.replace(" ", "-")
        projector.save_pretrained(folder)
        corrupt(folder)
        with pytest.raises(CorruptArtifactError, match=messages[name]):
            NullSpaceProjector.from_pretrained(folder)
        repo_id = unique_repo_id(name.replace(" ", "-"))
        hub_api.create_repo(repo_id)
        hub_api.upload_folder(folder_path=str(folder), repo_id=repo_id)
        with pytest.raises(CorruptArtifactError, match="removed from the cache"):
            NullSpaceProjector.from_pretrained(repo_id)
        assert not [p for p in fresh_hf_cache.rglob("*") if p.is_file() and name.split()[0] in p.name]
        assert not list(fresh_hf_cache.rglob("*.safetensors"))


def test_an_artifact_of_another_model_of_the_same_architecture_warns(tmp_path, corpus_file):
    projector = _projector(tmp_path, corpus_file)
    projector.save_pretrained(tmp_path / "artifact")
    other = _editor(corpus_file, tmp_path / "stats-other", _model(seed=1),
                    source=ModelSource("tester/tiny-llama", None, COMMIT, "hub"), projection=str(tmp_path / "artifact"))
    with pytest.warns(UserWarning, match="weights of model.layers.1.mlp.down_proj differ"):
        other.null_space_projector([1, 2])
    same = _editor(corpus_file, tmp_path / "stats-same", _model(seed=0),
                   source=ModelSource("tester/tiny-llama", None, COMMIT, "hub"), projection=str(tmp_path / "artifact"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.null_space_projector([1, 2])


# -- 7. saving never deletes what it did not write ----------------------------------------------------------------


def test_saving_again_keeps_the_users_files_and_refuses_to_replace_a_checkpoint(tmp_path, corpus_file):
    editor = _editor(corpus_file, tmp_path / "stats")
    editor.edit(REQUESTS[:1])
    folder = editor.save_pretrained(tmp_path / "saved")
    (folder / "my_notes.txt").write_text("keep me")
    (folder / "eval").mkdir()
    (folder / "eval" / "eval_results.json").write_text("{}")
    editor.edit(REQUESTS[1:2])
    editor.save_pretrained(folder)
    assert (folder / "my_notes.txt").read_text() == "keep me" and (folder / "eval" / "eval_results.json").exists()
    recorded = json.loads((folder / publishing.EDITING_CONFIG).read_text())["files"]
    assert "model.safetensors" in recorded and "my_notes.txt" not in recorded
    with pytest.raises(FileExistsError, match="holds a full edited checkpoint"):
        editor.save_edits(folder, format="lora")
    assert (folder / "model.safetensors").exists()
    editor.save_edits(folder, format="lora", overwrite=True)
    assert not (folder / "model.safetensors").exists() and (folder / publishing.ADAPTER_WEIGHTS).exists()
    assert (folder / "my_notes.txt").read_text() == "keep me"


def test_a_checkpoint_made_under_other_defaults_is_refused_and_an_older_one_resumes_with_a_warning(
        tmp_path, corpus_file, monkeypatch, caplog):
    """Unset arguments resolve to the version's defaults: equal arguments under a changed default (here AlphaEdit's
    clamp) would otherwise continue a run with other settings than its first batches."""
    editor = _editor(corpus_file, tmp_path / "stats")
    requests = as_edit_requests(REQUESTS[:2], batch_size=1)
    editor.edit(REQUESTS[:1])
    (tmp_path / "run").mkdir()
    saved = load_checkpoint(save_checkpoint(editor, tmp_path / "run", run_identity(editor, requests)))
    monkeypatch.setattr(AlphaEdit, "auto_hyperparameters", staticmethod(lambda spec: {"clamp_norm_factor": 0.3}))
    newer = _editor(corpus_file, tmp_path / "stats")
    assert newer.editing_args.to_dict() == editor.editing_args.to_dict()
    with pytest.raises(CheckpointError, match=r"different run \(hyperparameters\.clamp_norm_factor: 0\.5 -> 0\.3\)"):
        restore_checkpoint(newer, saved, run_identity(newer, requests))
    assert not newer.state.batches and torch.equal(newer.model.model.layers[2].mlp.down_proj.weight,
                                                   _model().model.layers[2].mlp.down_proj.weight)
    older = dataclasses.replace(saved, run={k: v for k, v in saved.run.items() if k != "hyperparameters"})
    with caplog.at_level(logging.WARNING, logger="hf_alphaedit.checkpointing"):
        restore_checkpoint(newer, older, run_identity(newer, requests))
    assert "before checkpoints recorded the resolved hyperparameters" in caplog.text and newer.state.num_edits == 1


@pytest.mark.parametrize(("limit", "kept"), [(1, [3]), (2, [2, 3]), (None, [1, 2, 3])])
def test_save_total_limit_keeps_the_newest_checkpoints_and_a_kept_older_one_resumes_to_the_same_weights(
        tmp_path, corpus_file, limit, kept):
    run = tmp_path / "run"
    settings = {"batch_size": 1, "save_steps": 1, "save_total_limit": limit, "output_dir": str(run)}
    editor = _editor(corpus_file, tmp_path / "stats", **settings)
    edit_sequentially(editor, REQUESTS)
    assert [entry.name for entry in checkpoint_folders(run)] == [f"checkpoint-{n:06d}" for n in kept]
    assert latest_checkpoint(run).name == "checkpoint-000003"
    resumed = _editor(corpus_file, tmp_path / "stats", **settings, resume_from_checkpoint=str(run / "checkpoint-"
                                                                                              f"{kept[0]:06d}"))
    outcome = edit_sequentially(resumed, REQUESTS)
    assert outcome.resumed_batches == kept[0] and resumed.state.num_edits == len(REQUESTS)
    final, again = editor.engine.edited_tensors()[0], resumed.engine.edited_tensors()[0]
    assert final.keys() == again.keys() and all(torch.equal(final[name], again[name]) for name in final)


def test_a_shorter_runs_checkpoint_extends_to_the_longer_run_and_no_other(tmp_path, corpus_file):
    """Lifelong editing goes on: a run of 2 edits continued with a third ends bitwise where the uninterrupted run of
    3 does; a checkpoint whose batches are not this run's first, or more than it has, is refused before any edit."""
    stats = tmp_path / "stats"
    uninterrupted = _editor(corpus_file, stats, batch_size=1)
    edit_sequentially(uninterrupted, REQUESTS)
    edit_sequentially(_editor(corpus_file, stats, batch_size=1, save_steps=1, output_dir=str(tmp_path / "short")),
                      REQUESTS[:2])
    checkpoint = str(tmp_path / "short" / "checkpoint-000002")
    extended = _editor(corpus_file, stats, batch_size=1, output_dir=str(tmp_path / "long"),
                       resume_from_checkpoint=checkpoint)
    assert edit_sequentially(extended, REQUESTS).resumed_batches == 2 and extended.state.num_edits == 3
    final, again = uninterrupted.engine.edited_tensors()[0], extended.engine.edited_tensors()[0]
    assert final.keys() == again.keys() and all(torch.equal(final[name], again[name]) for name in final)

    for name, requests, message in [("reordered", [REQUESTS[1], REQUESTS[0], REQUESTS[2]], "its batch 0 edited other"),
                                    ("shorter", REQUESTS[:1], "holds 2 batches, more than this run's 1 requests")]:
        other = _editor(corpus_file, stats, batch_size=1, output_dir=str(tmp_path / name),
                        resume_from_checkpoint=checkpoint)
        with pytest.raises(CheckpointError, match=message):
            edit_sequentially(other, requests)
        assert not other.state.batches and torch.equal(other.model.model.layers[2].mlp.down_proj.weight,
                                                       _model().model.layers[2].mlp.down_proj.weight)
    other = _editor(corpus_file, stats, batch_size=1, output_dir=str(tmp_path / "other_settings"),
                    resume_from_checkpoint=checkpoint, v_num_grad_steps=3)
    with pytest.raises(CheckpointError, match="v_num_grad_steps: 6 -> 3"):  # the settings must still match
        edit_sequentially(other, REQUESTS)


def test_published_edits_continue_under_the_settings_they_were_made_with_not_todays_defaults(
        tmp_path, corpus_file, monkeypatch):
    """A setting the publisher left unset resolved to their version's default; loading their edits without
    editing_args must not continue them under another one (AlphaEdit's clamp default changed once)."""
    monkeypatch.setattr(AlphaEdit, "auto_hyperparameters", staticmethod(lambda spec: {"clamp_norm_factor": 0.3}))
    editor = _editor(corpus_file, tmp_path / "stats")
    editor.edit(REQUESTS[:1])
    assert editor.editing_args.clamp_norm_factor is None and editor.hparams.clamp_norm_factor == 0.3
    folder = editor.save_edits(tmp_path / "published", format="delta")
    base = tmp_path / "base"
    _model().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    monkeypatch.undo()  # today's default: 0.5
    loaded = AlphaEditModel.from_pretrained(str(base), edits=folder)
    assert loaded.editing_args.clamp_norm_factor == 0.3 and loaded.hparams.clamp_norm_factor == 0.3
    assert loaded.hparams.to_dict() == editor.hparams.to_dict()
    chosen = AlphaEditModel.from_pretrained(str(base), edits=folder, editing_args=_args(corpus_file, tmp_path / "s"))
    assert chosen.hparams.clamp_norm_factor == 0.5  # the loader's own arguments still decide when given
    config = json.loads((folder / publishing.EDITING_CONFIG).read_text())
    config["hyperparameters"]["clamp_norm_factor"] = "wide"  # a hostile or corrupt value fails loudly, by name
    (folder / publishing.EDITING_CONFIG).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"EditingArguments\.clamp_norm_factor='wide': expected a float"):
        AlphaEditModel.from_pretrained(str(base), edits=folder)


# -- 8, 9. threads and autograd contexts ---------------------------------------------------------------------------


def test_concurrent_edits_and_reverts_serialise(tmp_path, corpus_file):
    editor = _editor(corpus_file, tmp_path / "stats")
    editor.model.requires_grad_(True)
    errors: list[BaseException] = []

    def run(action) -> None:
        try:
            action()
        except BaseException as error:  # noqa: BLE001 — reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(lambda r=r: editor.edit([r]),)) for r in REQUESTS[:2]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and editor.state.num_edits == 2
    assert all(p.requires_grad for p in editor.model.parameters())
    first_two = [r.subject for b in editor.state.batches for r in b.requests]
    after_two = _parameters(editor.model)
    edit = threading.Thread(target=run, args=(lambda: editor.edit([REQUESTS[2]]),))
    revert = threading.Thread(target=run, args=(lambda: editor.revert(1),))
    edit.start()
    revert.start()
    edit.join()
    revert.join()
    assert not errors and editor.state.num_edits == 2
    subjects = [r.subject for b in editor.state.batches for r in b.requests]
    if subjects == first_two:  # edit, then revert
        assert _same(after_two, _parameters(editor.model))
    else:  # revert, then edit
        assert subjects == [first_two[0], "Miles Davis"]


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_edit_works_inside_a_no_grad_context(tmp_path, corpus_file, context):
    editor = _editor(corpus_file, tmp_path / "stats")
    before = editor.spec.weight(editor.model, 2).detach().clone()
    with context():
        editor.edit(REQUESTS[:1])
    assert not torch.equal(before, editor.spec.weight(editor.model, 2).detach())


# -- 11. reset is exact; revert rebuilds from the originals ---------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reset_restores_the_original_weights_bit_for_bit(tmp_path, corpus_file, dtype):
    editor = _editor(corpus_file, tmp_path / "stats", _model().to(dtype))
    original = _parameters(editor.model)
    editor.edit(REQUESTS[:2], batch_size=1)
    editor.edit(REQUESTS[2:])
    assert not _same(original, _parameters(editor.model))
    editor.reset()
    assert _same(original, _parameters(editor.model))
    assert editor.engine.edited_tensors()[1] == {}  # no float32 master left behind


def test_revert_equals_the_state_before_the_reverted_batches(tmp_path, corpus_file):
    editor = _editor(corpus_file, tmp_path / "stats")
    editor.edit(REQUESTS[:1])
    after_one = _parameters(editor.model)
    gram = {k: v.clone() for k, v in editor.method.previous_gram.items()}
    editor.edit(REQUESTS[1:])
    editor.revert(1)
    assert _same(after_one, _parameters(editor.model))  # one product per layer and batch: bit for bit
    assert all(torch.equal(gram[k], v) for k, v in editor.method.previous_gram.items())


def test_without_edits_swaps_in_the_exact_original_weights(tmp_path, corpus_file):
    editor = _editor(corpus_file, tmp_path / "stats")
    original = _parameters(editor.model)
    editor.edit(REQUESTS)
    edited = _parameters(editor.model)
    with editor.engine.without_edits():
        assert _same(original, _parameters(editor.model))
    assert _same(edited, _parameters(editor.model))


# -- 12. the first minute: an unreachable Hub is said once, every message once -----------------------------------


def test_an_unreachable_hub_is_detected_at_once(monkeypatch):
    from huggingface_hub import constants

    from hf_alphaedit import hub

    monkeypatch.setattr(constants, "ENDPOINT", "http://hub.invalid")
    assert hub.hub_unreachable_now() == "cannot resolve hub.invalid"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.hub_unreachable_now() == "offline mode is on"


def test_the_command_line_prints_every_library_message_once():
    import subprocess
    import sys

    script = ("import logging\nfrom hf_alphaedit.cli import CommonArguments, configure_logging\n"
              "configure_logging(CommonArguments())\n"
              "for name in ('huggingface_hub', 'datasets', 'transformers', 'hf_alphaedit'):\n"
              "    logging.getLogger(name).warning('probe message from %s', name)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    for name in ("huggingface_hub", "datasets", "transformers", "hf_alphaedit"):
        assert done.stderr.count(f"probe message from {name}") == 1, done.stderr
