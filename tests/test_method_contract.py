"""The guarantees every registered method gets from the engine (PEFT's common-tester pattern): a failing batch
changes nothing, revert rebuilds the earlier state, checkpoints and published edits round-trip, LoRA export is
exact, and a resumed run ends where an uninterrupted one does. A new built-in method is covered by registering it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from hf_alphaedit import AlphaEditModel, EditingArguments, MendEditor, list_methods
from hf_alphaedit.architectures import resolve_model_spec
from hf_alphaedit.checkpointing import load_checkpoint, restore_checkpoint, save_checkpoint
from hf_alphaedit.engine import copy_method_state
from hf_alphaedit.methods import get_method_classes
from tests.tiny_models import tiny_causal_lm_with_large_activations, tiny_tokenizer

BUILT_IN_METHODS = [name for name in list_methods()
                    if get_method_classes(name)[1].__module__.startswith("hf_alphaedit.methods.")]
REQUESTS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle", "target_new": "English language"},
    {"prompt": "{}, who plays the", "subject": "Miles Davis", "target_new": "piano"},
]
PROBE = "The Eiffel Tower is located in the city of Rome. Miles Davis plays the trumpet"


def _args(method: str, corpus_file: Path) -> EditingArguments:
    return EditingArguments(method=method, statistics_corpus=str(corpus_file), statistics_samples=60,
                            statistics_cache_dir=str(corpus_file.parent / "stats"), disable_tqdm=True, v_num_grad_steps=6,
                            v_lr=0.5, projection="compute", **_method_settings(method, corpus_file.parent))


def _method_settings(method: str, folder: Path) -> dict[str, str]:
    """What a method needs besides the common settings: MEND a trained editor for the tiny model (here an
    untrained one without input normalisation, which is one step of gradient descent)."""
    if method != "mend":
        return {}
    editor = folder / "mend-editor"
    if not editor.is_dir():
        model = tiny_causal_lm_with_large_activations()
        MendEditor.for_model(model, resolve_model_spec(model), normalize=False, rank=4,
                             initial_step_size=0.01).save_pretrained(editor)
    return {"mend_editor": str(editor)}


def _editor(method: str, corpus_file: Path) -> AlphaEditModel:
    return AlphaEditModel(tiny_causal_lm_with_large_activations(), tiny_tokenizer(), _args(method, corpus_file))


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny_tokenizer()(PROBE, return_tensors="pt")["input_ids"]).logits


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("method", BUILT_IN_METHODS)
def test_a_failing_batch_changes_nothing(method, corpus_file, monkeypatch):
    editor = _editor(method, corpus_file)
    editor.edit(REQUESTS[:1])
    weights, state = _weights(editor.model), copy_method_state(editor.method)

    def failing_commit(update):
        raise RuntimeError("injected failure after the batch's updates were applied")

    monkeypatch.setattr(editor.method, "commit", failing_commit)
    with pytest.raises(RuntimeError, match="injected failure"):
        editor.edit(REQUESTS[1:2])
    assert _max_difference(weights, _weights(editor.model)) == 0.0
    assert editor.state.num_edits == 1
    after = copy_method_state(editor.method)
    assert all(torch.equal(state[name][key], after[name][key]) for name in state for key in state[name])


@pytest.mark.parametrize("method", BUILT_IN_METHODS)
def test_revert_rebuilds_the_state_before_the_reverted_batch(method, corpus_file):
    editor = _editor(method, corpus_file)
    original = _weights(editor.model)
    editor.edit(REQUESTS[:1])
    after_one, state_one = _weights(editor.model), copy_method_state(editor.method)
    editor.edit(REQUESTS[1:])
    editor.revert(1)
    assert _max_difference(after_one, _weights(editor.model)) <= 1e-6
    state = copy_method_state(editor.method)
    assert all(torch.allclose(state_one[n][k], state[n][k], rtol=1e-9, atol=1e-9) for n in state for k in state[n])
    editor.reset()
    assert _max_difference(original, _weights(editor.model)) == 0.0


@pytest.mark.parametrize("method", BUILT_IN_METHODS)
def test_checkpoint_lora_and_published_edits_round_trip(method, corpus_file, tmp_path):
    editor = _editor(method, corpus_file)
    editor.edit(REQUESTS[:2], batch_size=1)
    expected = _logits(editor.model)
    checkpoint = editor.save_pretrained(tmp_path / "checkpoint")
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    assert float((_logits(reloaded) - expected).abs().max()) <= 1e-5
    adapter = editor.save_edits(tmp_path / "lora", format="lora")
    merged = PeftModel.from_pretrained(tiny_causal_lm_with_large_activations(), adapter).merge_and_unload().eval()
    assert float((_logits(merged) - expected).abs().max()) <= 1e-4
    base = tmp_path / "base"
    tiny_causal_lm_with_large_activations().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    loaded = AlphaEditModel.from_pretrained(str(base), _args(method, corpus_file), edits=checkpoint,
                                            attn_implementation="eager")
    assert loaded.state.num_edits == 2 and float((_logits(loaded.model) - expected).abs().max()) <= 1e-5
    loaded.edit(REQUESTS[2:])  # editing continues from published edits
    assert loaded.state.num_edits == 3


@pytest.mark.parametrize("method", BUILT_IN_METHODS)
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(method, corpus_file, tmp_path):
    uninterrupted = _editor(method, corpus_file)
    uninterrupted.edit(REQUESTS[:1])
    saved = save_checkpoint(uninterrupted, tmp_path, {"method": method})
    uninterrupted.edit(REQUESTS[1:])
    resumed = _editor(method, corpus_file)
    restore_checkpoint(resumed, load_checkpoint(saved))
    resumed.edit(REQUESTS[1:])
    assert _max_difference(_weights(uninterrupted.model), _weights(resumed.model)) == 0.0
