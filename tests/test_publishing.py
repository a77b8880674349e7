"""Publishing edits (checkpoint, PEFT LoRA, delta files, model cards) and undoing them (revert / reset)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_alphaedit import AlphaEditModel, EditingArguments, publishing
from hf_alphaedit.hub import ModelSource
from hf_alphaedit.methods import LayerUpdate
from hf_alphaedit.state import BatchRecord
from tests.tiny_models import tiny_causal_lm_with_large_activations, tiny_tokenizer

REQUESTS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome",
     "target_true": "Paris", "case_id": 7},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle", "target_new": "English language"},
    {"prompt": "{}, who plays the", "subject": "Miles Davis", "target_new": "piano", "target_true": "trumpet"},
    {"prompt": "{} works in the field of", "subject": "Marie Curie", "target_new": "economics"},
]
PROBE = "The Eiffel Tower is located in the city of Rome. Miles Davis plays the trumpet"
EVALUATION = {"efficacy": 100.0, "generalization": 62.5, "specificity": 91.0, "efficacy_std": 0.0,
              "num_records": 4, "seconds": 1.5, "pre": {"efficacy": 25.0, "generalization": 12.5}}


def _args(corpus_file: Path, **overrides) -> EditingArguments:
    values = {"statistics_corpus": str(corpus_file), "statistics_samples": 60, "layers": [1, 2],
              "statistics_cache_dir": str(corpus_file.parent / "stats"), "disable_tqdm": True, "v_num_grad_steps": 8,
              "v_lr": 0.5, "output_dir": str(corpus_file.parent / "out")}
    values.update(overrides)
    return EditingArguments(**values)


def _editor(corpus_file: Path, family: str = "llama", source: ModelSource | None = None,
            **overrides) -> AlphaEditModel:
    return AlphaEditModel(tiny_causal_lm_with_large_activations(family), tiny_tokenizer(), _args(corpus_file, **overrides),
                          source)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = tiny_tokenizer()(PROBE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


def _save_base(directory: Path, family: str = "llama", seed: int = 0) -> Path:
    tiny_causal_lm_with_large_activations(family, seed).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def _assert_nothing_private(files: dict[str, bytes], *private: str) -> None:
    for name, data in files.items():
        for text in private:
            assert text.encode() not in data, f"{text!r} appears in {name}"


# -- full checkpoint -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_checkpoint_loads_with_plain_transformers(corpus_file, tmp_path, family):
    editor = _editor(corpus_file, family)
    before = _logits(editor.model)
    editor.edit(REQUESTS[:2])
    edited = _logits(editor.model)
    assert _max_diff(before, edited) > 1e-3, "the edit must change the logits for this test to mean anything"

    folder = editor.save_pretrained(tmp_path / "edited")
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert _max_diff(_logits(loaded), edited) <= 1e-5
    assert AutoTokenizer.from_pretrained(folder)(PROBE)["input_ids"] == tiny_tokenizer()(PROBE)["input_ids"]

    config = json.loads((folder / publishing.EDITING_CONFIG).read_text())
    args = EditingArguments.from_dict(config["editing_args"])
    assert args.layers == [1, 2] and args.statistics_corpus == "<local>/corpus.txt" and args.output_dir is None
    log = [json.loads(line) for line in (folder / publishing.EDIT_LOG).read_text().splitlines()]
    assert [(line["event"], line["subject"], line["batch"]) for line in log] == [
        ("edit", "The Eiffel Tower", 0), ("edit", "Danielle", 0)]
    assert log[0]["target_true"] == "Paris" and log[0]["method"] == "alphaedit" and log[0]["case_id"] == 7
    assert set(log[0]["update_norms"]) == {"1", "2"} and all(v > 0 for v in log[0]["update_norms"].values())
    _assert_nothing_private({p.name: p.read_bytes() for p in folder.iterdir()}, str(tmp_path), str(corpus_file.parent))


def test_saving_over_a_foreign_folder_is_refused_and_a_resave_replaces_stale_files(corpus_file, tmp_path):
    editor = _editor(corpus_file)
    editor.edit(REQUESTS[:1])
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="was not written by hf_alphaedit"):
        editor.save_pretrained(foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    folder = editor.save_pretrained(tmp_path / "edited")
    recorded = json.loads((folder / publishing.EDITING_CONFIG).read_text())
    recorded["files"].append("model-00002-of-00002.safetensors")  # as an earlier, sharded save of ours wrote
    (folder / publishing.EDITING_CONFIG).write_text(json.dumps(recorded))
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"stale shard of ours")
    editor.save_pretrained(folder)
    assert not (folder / "model-00002-of-00002.safetensors").exists()
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"someone else's shard")
    with pytest.raises(FileExistsError, match="weight files this package did not write"):
        editor.save_pretrained(folder)
    assert (folder / "model-00001-of-00002.safetensors").read_bytes() == b"someone else's shard"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".edited")], "no staging folder left behind"


# -- edit adapters -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_adapter_reproduces_the_edited_model_through_peft(corpus_file, tmp_path, family):
    editor = _editor(corpus_file, family)
    editor.edit(REQUESTS[:3], batch_size=2)  # two batches: the adapter holds their factors side by side
    edited = _logits(editor.model)
    folder = editor.save_edits(tmp_path / "lora", format="lora")

    config = json.loads((folder / publishing.ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (3, 3, False)
    assert config["fan_in_fan_out"] is (family == "gpt2") and config["rank_pattern"] == {}
    assert sorted(config["target_modules"]) == [editor.spec.rewrite_module_name(i) for i in (1, 2)]

    peft_model = PeftModel.from_pretrained(tiny_causal_lm_with_large_activations(family), folder).eval()
    assert _max_diff(_logits(peft_model), edited) <= 1e-4
    merged = peft_model.merge_and_unload()
    assert _max_diff(_logits(merged), edited) <= 1e-4
    for layer in (1, 2):
        assert _max_diff(editor.spec.weight(merged, layer), editor.spec.weight(editor.model, layer)) <= 1e-6


def test_lora_rank_pattern_when_layers_have_different_ranks(corpus_file, tmp_path):
    editor = _editor(corpus_file, layers=[1, 2, 3])
    editor.edit(REQUESTS[:2])
    # A batch that changed only layer 3 (as a method editing a subset of layers would record it).
    d, d_k = editor.spec.hidden_size, editor.spec.key_size
    extra = LayerUpdate(3, torch.randn(d, 1) * 0.1, torch.randn(1, d_k) * 0.1, torch.randn(1, d_k))
    editor.engine.apply_batches([BatchRecord(1, [editor.state.batches[0].requests[0]], [extra], [], [], [], {},
                                             editor.state.batches[0].created_at + 1)])
    folder = editor.save_edits(tmp_path / "lora", format="lora")
    config = json.loads((folder / publishing.ADAPTER_CONFIG).read_text())
    name = editor.spec.rewrite_module_name(3)
    assert (config["r"], config["lora_alpha"]) == (2, 2)
    assert list(config["rank_pattern"].values()) == [3] and list(config["alpha_pattern"].values()) == [3]
    peft_model = PeftModel.from_pretrained(tiny_causal_lm_with_large_activations(), folder).eval()
    assert peft_model.get_submodule(f"base_model.model.{name}").r["default"] == 3
    assert _max_diff(_logits(peft_model), _logits(editor.model)) <= 1e-4


def test_delta_edits_load_onto_the_base_and_editing_continues(corpus_file, tmp_path):
    editor = _editor(corpus_file)
    editor.edit(REQUESTS[:3], batch_size=2)
    folder = editor.save_edits(tmp_path / "delta", format="delta")
    base = _save_base(tmp_path / "base")

    loaded = AlphaEditModel.from_pretrained(str(base), edits=folder, editing_args=_args(corpus_file),
                                            attn_implementation="eager")  # as the tiny models: same statistics
    for layer in (1, 2):  # the same deltas added in the same order
        assert torch.equal(loaded.spec.weight(loaded.model, layer), editor.spec.weight(editor.model, layer))
    assert torch.equal(_logits(loaded.model), _logits(editor.model))
    assert loaded.state.num_edits == 3 and loaded.state.context_templates == editor.state.context_templates
    for layer in (1, 2):  # the loaded batches' keys are in the previous-edit cache
        gram = editor.method.previous_gram[layer]
        assert gram.abs().max() > 0  # (statistics recollected on the base: equal up to round-off)
        torch.testing.assert_close(loaded.method.previous_gram[layer], gram, rtol=0, atol=1e-6 * gram.abs().max())
    editor.edit(REQUESTS[3:])
    loaded.edit(REQUESTS[3:])
    for layer in (1, 2):
        assert _max_diff(editor.spec.weight(editor.model, layer), loaded.spec.weight(loaded.model, layer)) <= 1e-6

    defaults = AlphaEditModel.from_pretrained(str(base), edits=folder)  # editing args from editing_config.json
    assert defaults.editing_args.layers == [1, 2] and defaults.editing_args.v_num_grad_steps == 8


def test_edits_refuse_the_wrongtiny_causal_lm_with_large_activations(corpus_file, tmp_path):
    editor = _editor(corpus_file)
    editor.edit(REQUESTS[:1])
    delta = editor.save_edits(tmp_path / "delta", format="delta")
    with pytest.raises(ValueError, match="differ from that model's"):
        AlphaEditModel.from_pretrained(str(_save_base(tmp_path / "other-seed", seed=1)), edits=delta)
    with pytest.raises(ValueError, match="architecture differs"):
        AlphaEditModel.from_pretrained(str(_save_base(tmp_path / "gpt2", "gpt2")), edits=delta,
                                       editing_args=_args(corpus_file))
    lora = editor.save_edits(tmp_path / "lora", format="lora")
    with pytest.raises(ValueError, match="PeftModel.from_pretrained"):
        AlphaEditModel.from_pretrained(str(_save_base(tmp_path / "base")), edits=lora)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        AlphaEditModel.from_pretrained(str(tmp_path / "base"), edits=tmp_path / "missing")
    with pytest.raises(ValueError, match="format='zip'"):
        editor.save_edits(tmp_path / "zip", format="zip")


# -- undo ----------------------------------------------------------------------------------------------------


def test_revert_and_reset_restore_the_logits_and_are_logged(corpus_file, tmp_path):
    editor = _editor(corpus_file)
    pristine = _logits(editor.model)
    editor.edit(REQUESTS[:1])
    after_first = _logits(editor.model)
    editor.edit(REQUESTS[1:3])
    assert _max_diff(_logits(editor.model), after_first) > 1e-3

    editor.revert()
    assert _max_diff(_logits(editor.model), after_first) <= 1e-5
    assert editor.state.num_edits == 1
    editor.reset()
    assert _max_diff(_logits(editor.model), pristine) <= 1e-5
    assert editor.state.batches == []
    with pytest.raises(ValueError, match="num_batches=1"):
        editor.revert()

    editor.edit(REQUESTS[3:])
    folder = editor.save_pretrained(tmp_path / "edited")
    log = [json.loads(line) for line in (folder / publishing.EDIT_LOG).read_text().splitlines()]
    assert [(line["event"], line["batch"]) for line in log] == [("revert", 1), ("revert", 0), ("edit", 0)]
    assert [r["subject"] for r in log[0]["requests"]] == ["Danielle", "Miles Davis"]
    card = ModelCard.load(folder / publishing.MODEL_CARD)
    assert card.data.hf_alphaedit["num_reverted_batches"] == 2 and "Reverted batches (2)" in card.text


def test_a_failing_revert_changes_nothing(corpus_file, monkeypatch):
    editor = _editor(corpus_file)
    editor.edit(REQUESTS[:1])
    editor.edit(REQUESTS[1:3])
    weights = {k: v.clone() for k, v in editor.model.state_dict().items()}
    gram = {k: v.clone() for k, v in editor.method.previous_gram.items()}
    calls = []
    original_apply = editor.engine.apply

    def failing_apply(update, **kwargs):
        calls.append(update.layer)
        if len(calls) == 2:  # the originals are back and the first kept update re-applied
            raise RuntimeError("injected failure")
        original_apply(update, **kwargs)

    monkeypatch.setattr(editor.engine, "apply", failing_apply)
    with pytest.raises(RuntimeError, match="injected failure"):
        editor.revert(1)  # originals back, then batch 1 re-applied: the failure comes after its first layer
    assert all(torch.equal(v, weights[k]) for k, v in editor.model.state_dict().items())
    assert all(torch.equal(v, gram[k]) for k, v in editor.method.previous_gram.items())
    assert editor.state.num_edits == 3 and editor.revert_log == []


def test_revert_then_edit_equals_never_having_made_the_reverted_batch(corpus_file):
    editor = _editor(corpus_file)
    editor.edit(REQUESTS[:1])
    gram_after_first = {k: v.clone() for k, v in editor.method.previous_gram.items()}
    editor.edit(REQUESTS[1:3])
    assert not torch.equal(editor.method.previous_gram[2], gram_after_first[2])
    editor.revert()
    for layer, gram in gram_after_first.items():
        assert torch.equal(editor.method.previous_gram[layer], gram)
    editor.edit(REQUESTS[3:])

    never = _editor(corpus_file)
    never.edit(REQUESTS[:1])
    never.edit(REQUESTS[3:])
    for layer in (1, 2):
        assert _max_diff(editor.spec.weight(editor.model, layer), never.spec.weight(never.model, layer)) <= 1e-5
        gram = never.method.previous_gram[layer]  # keys of the last edit differ by round-off only
        torch.testing.assert_close(editor.method.previous_gram[layer], gram, rtol=0, atol=1e-5 * gram.abs().max())
    assert [r.subject for b in editor.state.batches for r in b.requests] == ["The Eiffel Tower", "Marie Curie"]


# -- model cards ---------------------------------------------------------------------------------------------


def test_card_front_matter_edit_log_and_metrics(corpus_file, tmp_path, monkeypatch):
    source = ModelSource("tester/tiny-llama-base", None, "a" * 40, "hub")
    editor = _editor(corpus_file, source=source)
    editor.edit(REQUESTS[:3])
    editor.last_evaluation = EVALUATION  # what `evaluate` stores
    editor.provider.projection_source = {"repo_id": "tester/tiny-llama-base-key-statistics", "revision": "b" * 40}
    monkeypatch.setattr(publishing, "CARD_LOG_ROWS", 2)
    folder = editor.save_pretrained(tmp_path / "edited")

    card = ModelCard.load(folder / publishing.MODEL_CARD)
    data = card.data
    ModelCardData(**data.to_dict())  # the YAML is a valid card data block
    assert data.base_model == "tester/tiny-llama-base" and data.base_model_relation == "finetune"
    assert data.library_name == "transformers" and data.model_name == "edited"
    assert {"knowledge-editing", "alphaedit", "base_model:finetune:tester/tiny-llama-base"} <= set(data.tags)
    assert data.hf_alphaedit["base_model_revision"] == "a" * 40 and data.hf_alphaedit["num_edits"] == 3
    assert {(r.metric_type, r.metric_value) for r in data.eval_results} == {
        ("efficacy", 100.0), ("generalization", 62.5), ("specificity", 91.0)}
    assert "| efficacy | 25.0 | 100.0 |" in card.text
    assert "The Eiffel Tower" in card.text and "Danielle" in card.text and "Miles Davis" not in card.text
    assert "… and 1 more edit (see `edit_log.jsonl`)" in card.text
    assert "| v_num_grad_steps | 8 |" in card.text
    assert data.hf_alphaedit["projection_repo"] == "tester/tiny-llama-base-key-statistics"
    assert data.hf_alphaedit["projection_revision"] == "b" * 40 and "b" * 40 in card.text


ALPHAEDIT_PAPER = ('Fang et al., "AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models", ICLR 2025, '
                   '[arXiv:2410.02355](https://arxiv.org/abs/2410.02355)')
MEMIT_PAPER = ('Meng et al., "Mass-Editing Memory in a Transformer", ICLR 2023, '
               '[arXiv:2210.07229](https://arxiv.org/abs/2210.07229)')


@pytest.mark.parametrize(("overrides", "title", "papers", "projector"), [
    ({}, "AlphaEdit", [ALPHAEDIT_PAPER], "computed locally"),
    ({"method": "betaedit"}, "BetaEdit",
     ['Liu, Liu and Li, "BetaEdit: Null-Space Constrained Sequential Model Editing", IJCAI 2026, '
      '[arXiv:2605.09285](https://arxiv.org/abs/2605.09285)'], "computed locally"),
    ({"method": "memit"}, "MEMIT", [MEMIT_PAPER], "MEMIT uses no null-space projector."),
    ({"method": "memit", "use_projection": True, "prune": True, "norm_anchor": True, "norm_anchor_records": "x.json"},
     "MEMIT", [MEMIT_PAPER, ALPHAEDIT_PAPER,
               'Liu et al., "Norm Anchors Make Model Edits Last", 2026, '
               '[arXiv:2602.02543](https://arxiv.org/abs/2602.02543)',
               'Ma et al., "Perturbation-Restrained Sequential Model Editing", ICLR 2025, '
               '[arXiv:2405.16821](https://arxiv.org/abs/2405.16821)'], "computed locally"),
])
def test_cards_cite_the_papers_behind_the_edits_and_say_whether_a_projector_was_used(corpus_file, overrides, title,
                                                                                      papers, projector):
    """The card names the method, cites its paper and every technique applied on top of it, and says where the
    null-space projector came from whenever one constrained the updates (BetaEdit and MEMIT with the booster too)."""
    card = publishing.render_card(_editor(corpus_file, **overrides), "checkpoint", "edited")
    assert card.data.hf_alphaedit["method"] == title and f"Method: **{title}**" in card.text
    assert [line[2:] for line in card.text.split("## Reproducibility")[1].splitlines() if line.startswith("- ")] == papers
    provenance = card.text.split("## Projection artifact provenance")[1].split("##")[0]
    assert projector in provenance


def test_adapter_cards_say_what_they_are(corpus_file, tmp_path):
    editor = _editor(corpus_file, source=ModelSource("tester/tiny-llama-base", "main", None, "hub"))
    editor.edit(REQUESTS[:1])
    lora = ModelCard.load(editor.save_edits(tmp_path / "lora", format="lora") / publishing.MODEL_CARD)
    delta = ModelCard.load(editor.save_edits(tmp_path / "delta", format="delta") / publishing.MODEL_CARD)
    assert (lora.data.library_name, lora.data.base_model_relation) == ("peft", "adapter")
    assert {"lora", "base_model:adapter:tester/tiny-llama-base"} <= set(lora.data.tags)
    assert "PeftModel.from_pretrained" in lora.text and "No evaluation was run" in lora.text
    assert delta.data.library_name == "hf_alphaedit" and 'edits="delta"' in delta.text


# -- through the Hub (local emulator) ------------------------------------------------------------------------


def _push_base(hub_api, repo_id: str, folder: Path) -> None:
    _save_base(folder)
    hub_api.create_repo(repo_id)
    hub_api.upload_folder(repo_id=repo_id, folder_path=folder)


def _repo_files(hub_server, hub_api, repo_id: str) -> dict[str, bytes]:
    return {name: hub_server.file_bytes(repo_id, name) for name in hub_api.list_repo_files(repo_id)}


def test_push_to_hub_checkpoint_round_trip(corpus_file, tmp_path, hub_server, hub_api, unique_repo_id, fresh_hf_cache):
    base_repo, repo = unique_repo_id("tiny-llama-base"), unique_repo_id("tiny-llama-edited")
    _push_base(hub_api, base_repo, tmp_path / "base")
    editor = AlphaEditModel.from_pretrained(base_repo, editing_args=_args(corpus_file))
    assert editor.source.origin == "hub" and editor.source.commit_sha == hub_server.head_sha(base_repo)
    editor.edit(REQUESTS[:2])
    editor.last_evaluation = EVALUATION
    editor.push_edits_to_hub(repo, format="lora")  # an earlier push of ours, with files the next one lacks
    hub_api.upload_file(path_or_fileobj=b"user notes", path_in_repo="notes.md", repo_id=repo)

    editor.push_to_hub(repo)
    files = _repo_files(hub_server, hub_api, repo)
    assert {"model.safetensors", "config.json", "README.md", "editing_config.json", "edit_log.jsonl",
            "edit_state.safetensors", "edit_state.json", "notes.md"} <= set(files)
    assert not {"adapter_config.json", "adapter_model.safetensors"} & set(files)
    _assert_nothing_private(files, str(tmp_path), str(corpus_file.parent), os.environ["HF_TOKEN"], "/tmp/")

    loaded = AutoModelForCausalLM.from_pretrained(repo, dtype=torch.float32).eval()
    assert _max_diff(_logits(loaded), _logits(editor.model)) <= 1e-5
    card = ModelCard.load(repo)
    card.validate()
    assert card.data.base_model == base_repo and card.data.model_name == repo
    assert card.data.hf_alphaedit["base_model_revision"] == hub_server.head_sha(base_repo)
    assert {r.metric_type for r in card.data.eval_results} == {"efficacy", "generalization", "specificity"}
    assert "Danielle" in card.text

    resumed = AlphaEditModel.from_pretrained(base_repo, edits=repo, editing_args=_args(corpus_file))
    assert _max_diff(_logits(resumed.model), _logits(editor.model)) <= 1e-6


def test_push_edits_to_hub_lora_and_delta(corpus_file, tmp_path, hub_server, hub_api, unique_repo_id, fresh_hf_cache):
    base_repo, lora_repo, delta_repo = (unique_repo_id(n) for n in ("tiny-base", "tiny-lora", "tiny-delta"))
    _push_base(hub_api, base_repo, tmp_path / "base")
    editor = AlphaEditModel.from_pretrained(base_repo, editing_args=_args(corpus_file))
    editor.edit(REQUESTS[:2])
    edited = _logits(editor.model)

    editor.push_edits_to_hub(lora_repo, format="lora")
    files = _repo_files(hub_server, hub_api, lora_repo)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "edit_log.jsonl"} <= set(files)
    _assert_nothing_private(files, str(tmp_path), str(corpus_file.parent), os.environ["HF_TOKEN"], "/tmp/")
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == base_repo
    base = AutoModelForCausalLM.from_pretrained(base_repo, dtype=torch.float32)
    assert _max_diff(_logits(PeftModel.from_pretrained(base, lora_repo).eval()), edited) <= 1e-4
    assert ModelCard.load(lora_repo).data.base_model == base_repo

    editor.push_edits_to_hub(delta_repo, format="delta")
    loaded = AlphaEditModel.from_pretrained(base_repo, edits=delta_repo, editing_args=_args(corpus_file))
    assert _max_diff(_logits(loaded.model), edited) <= 1e-5


# -- the real SmolLM2 ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_lora_export_after_real_edits(smollm2_editor, tmp_path):
    editor = smollm2_editor(v_num_grad_steps=15)
    model, tokenizer = editor.model, editor.tokenizer
    ids = tokenizer(PROBE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        pristine = model(ids).logits
    editor.edit(REQUESTS[:2])
    with torch.no_grad():
        edited = model(ids).logits
    assert _max_diff(edited, pristine) > 1e-2
    folder = editor.save_edits(tmp_path / "lora", format="lora")
    editor.reset()
    with torch.no_grad():
        assert _max_diff(model(ids).logits, pristine) <= 1e-4
    peft_model = PeftModel.from_pretrained(model, folder).eval()
    try:
        with torch.no_grad():
            assert _max_diff(peft_model(ids).logits, edited) <= 1e-4
    finally:
        peft_model.unload()
