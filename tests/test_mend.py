"""MEND: the editor network, the gradient factors, editing through AlphaEditModel, the Hub artifact and training."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from hf_alphaedit import AlphaEditModel, EditingArguments
from hf_alphaedit.architectures import resolve_model_spec
from hf_alphaedit.methods.mend import EditorMismatchError, MendConfig, MendEditor, default_inner_modules
from hf_alphaedit.methods.mend.artifact import EDITOR_CONFIG, EDITOR_WEIGHTS
from hf_alphaedit.methods.mend.editor import GradientFactors
from hf_alphaedit.methods.mend.functional import (
    EditEpisode,
    ModelRunner,
    blocks_match_full_model,
    edited_weights,
    encode_continuations,
    gradient_factors,
    mend_losses,
)
from hf_alphaedit.methods.mend.training import MendTrainingArguments, train_mend
from tests.tiny_models import TINY_FAMILIES, tiny_causal_lm, tiny_tokenizer

PROMPTS = ["The Eiffel Tower is located in the city of", "The mother tongue of Danielle is", "Miles Davis plays the"]
TARGETS = ["Rome", "English language", "piano"]
REQUESTS = [{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
            {"prompt": "The mother tongue of {} is", "subject": "Danielle", "target_new": "English language"},
            {"prompt": "{} plays the", "subject": "Miles Davis", "target_new": "piano"}]


def _frozen(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    return tiny_causal_lm(family, seed=seed).requires_grad_(False)


def _descent_editor(model: torch.nn.Module, step: float = 0.05, **settings) -> MendEditor:
    """An untrained editor without input normalisation: exactly one step of gradient descent of size `step`."""
    return MendEditor.for_model(model, resolve_model_spec(model), normalize=False, rank=8, initial_step_size=step,
                                **settings)


def _true_gradients(model: torch.nn.Module, names: list[str], batch) -> list[torch.Tensor]:
    """`∇_W Σ_b mean NLL_b` of the stored parameters `names`, by plain autograd on the whole model."""
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(True)
    try:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        log_probs = torch.log_softmax(logits[:, :-1].float(), -1)
        labels = batch.labels[:, 1:]
        mask = labels != -100
        token_nll = -log_probs.gather(2, labels.clamp(min=0)[..., None])[..., 0] * mask
        loss = (token_nll.sum(1) / mask.sum(1)).sum()
        return list(torch.autograd.grad(loss, [params[name] for name in names]))
    finally:
        for name in names:
            params[name].requires_grad_(False)


# -- the editor network ------------------------------------------------------------------------------------------


def test_the_editor_is_the_identity_at_initialisation():
    model = _frozen()
    editor = _descent_editor(model, step=0.3)
    generator = torch.Generator().manual_seed(0)
    factors = {p.module: GradientFactors(torch.randn(5, p.shape[1], generator=generator),
                                         torch.randn(5, p.shape[0], generator=generator))
               for p in editor.inner_params}
    for module, (left, right) in editor(factors).items():
        inputs, output_grads = factors[module]
        assert torch.equal(right, inputs)
        assert torch.equal(left, -0.3 * output_grads.T)
    # With normalisation the identity network returns the standardised rows.
    normalized = MendEditor.for_model(model, resolve_model_spec(model), rank=8, initial_step_size=1.0)
    module = normalized.inner_params[0].module
    normalized.train()
    normalized({module: factors[module]})  # the statistics of this matrix's network: these 5 rows
    normalized.eval()
    (left, right) = normalized({module: factors[module]})[module]
    rows = torch.cat(factors[module], dim=1).double()
    standardised = ((rows - rows.mean(0)) / (rows.std(0) + 1e-7)).float()
    torch.testing.assert_close(right, standardised[:, :right.shape[1]], rtol=0, atol=1e-5)
    torch.testing.assert_close(-left.T, standardised[:, right.shape[1]:], rtol=0, atol=1e-5)


def test_every_network_parameter_gets_a_gradient_at_the_identity():
    # At initialisation every pre-activation is exactly 0; an activation whose gradient there is 0 (relu) would
    # leave the networks at the identity for ever and train only the step sizes.
    model = _frozen()
    editor = _descent_editor(model)
    generator = torch.Generator().manual_seed(0)
    factors = {p.module: GradientFactors(torch.randn(5, p.shape[1], generator=generator),
                                         torch.randn(5, p.shape[0], generator=generator))
               for p in editor.inner_params}
    target = torch.Generator().manual_seed(1)
    loss = sum(((left @ right) * torch.randn(left.shape[0], right.shape[1], generator=target)).sum()
               for left, right in editor(factors).values())
    loss.backward()
    no_gradient = [name for name, param in editor.named_parameters()
                   if name.rsplit(".", 1)[-1] not in ("down", "scale")
                   and not (param.grad is not None and param.grad.abs().sum() > 0)]
    assert no_gradient == []  # `down` and `scale` multiply `U = 0`: theirs come once `up` moves, as in the reference


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_gradient_factors_are_the_gradient_and_the_upper_blocks_reproduce_the_model(family):
    model = _frozen(family)
    spec = resolve_model_spec(model)
    batch = encode_continuations(tiny_tokenizer(), PROMPTS, TARGETS)
    editor = _descent_editor(model)
    modules = [p.module for p in editor.inner_params]
    start = min(p.layer for p in editor.inner_params)
    assert blocks_match_full_model(model, spec, batch, start)
    gradients = _true_gradients(model, [p.name for p in editor.inner_params], batch)
    for runner in (ModelRunner(model, spec, batch), ModelRunner(model, spec, batch, start)):
        factors, _ = gradient_factors(runner, modules)
        for param, gradient in zip(editor.inner_params, gradients, strict=True):
            inputs, output_grads = factors[param.module]
            math_gradient = gradient.T if param.conv1d else gradient  # orientation from the module type
            torch.testing.assert_close(output_grads.T @ inputs, math_gradient, rtol=1e-4,
                                       atol=1e-4 * float(math_gradient.abs().max()))


def test_a_one_step_edit_descends_the_edit_loss_and_the_reference_sign_ascends_it():
    model = _frozen()
    spec = resolve_model_spec(model)
    batch = encode_continuations(tiny_tokenizer(), PROMPTS, TARGETS)
    editor = _descent_editor(model, step=0.02)
    runner = ModelRunner(model, spec, batch)
    factors, before = gradient_factors(runner, [p.module for p in editor.inner_params])
    deltas = {name: left @ right for name, (left, right) in editor(factors).items()}
    descended = runner.label_logits(edited_weights(model, deltas)).nll().sum()
    ascended = runner.label_logits(edited_weights(model, {n: -d for n, d in deltas.items()})).nll().sum()
    assert descended < before.nll().sum() < ascended


def test_step_sizes_are_matched_by_name_not_by_position():
    model = _frozen("gpt2")
    spec = resolve_model_spec(model)
    # The reference lists c_proj before c_fc within a block, the opposite of module order (ALGORITHMS.md §8.4).
    modules = [name for layer in (2, 3) for name in reversed(spec.mlp_matrices(model, layer))]
    assert modules[0].endswith("c_proj")
    editor = _descent_editor(model, inner_modules=modules)
    with torch.no_grad():
        editor.step_sizes.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    batch = encode_continuations(tiny_tokenizer(), PROMPTS, TARGETS)
    factors, _ = gradient_factors(ModelRunner(model, spec, batch), modules)
    updates = editor(factors)
    for module, expected in zip(modules, (0.1, 0.2, 0.3, 0.4), strict=True):
        left, _ = updates[module]
        torch.testing.assert_close(left, -expected * factors[module].output_grads.T)
        assert float(editor.step_size(module).detach()) == pytest.approx(expected)


def test_default_inner_parameters_are_the_mlp_matrices_of_the_last_three_blocks():
    expected = {"llama": ["gate_proj", "up_proj", "down_proj"], "gpt2": ["c_fc", "c_proj"],
                "gptj": ["fc_in", "fc_out"], "opt": ["fc1", "fc2"], "phi3": ["gate_up_proj", "down_proj"]}
    for family, leaves in expected.items():
        model = _frozen(family)
        spec = resolve_model_spec(model)
        modules = default_inner_modules(model, spec)
        assert [name.rsplit(".", 1)[1] for name in modules] == leaves * 3
        assert sorted({spec.layer_of(name) for name in modules}) == [1, 2, 3]


# -- editing with AlphaEditModel -----------------------------------------------------------------------------------


def _editing_args(corpus: Path, editor: Path | str, **overrides) -> EditingArguments:
    """MEND with `editor`; `corpus` is conftest's folder (statistics for `use_projection`)."""
    return EditingArguments(method="mend", mend_editor=str(editor), statistics_corpus=str(corpus / "corpus.txt"),
                            statistics_samples=60, statistics_cache_dir=str(corpus / "stats"), disable_tqdm=True,
                            **overrides)


def _saved_editor(model: torch.nn.Module, folder: Path, step: float = 0.05) -> Path:
    return _descent_editor(model, step=step).save_pretrained(folder)


def test_conv1d_orientation_on_gpt2_edits_are_gradient_descent_on_the_stored_weights(corpus, tmp_path):
    model = _frozen("gpt2")
    editor = AlphaEditModel(model, tiny_tokenizer(), _editing_args(corpus, _saved_editor(model, tmp_path / "ed")))
    names = [p.name for p in editor.method.editor.inner_params]
    assert all(isinstance(model.get_submodule(name.removesuffix(".weight")), Conv1D) for name in names)
    batch = encode_continuations(tiny_tokenizer(), PROMPTS, TARGETS)
    gradients = _true_gradients(model, names, batch)
    before = {name: model.get_parameter(name).detach().clone() for name in names}
    editor.edit(REQUESTS)
    for name, gradient in zip(names, gradients, strict=True):
        torch.testing.assert_close(model.get_parameter(name) - before[name], -0.05 * gradient, rtol=1e-4,
                                   atol=1e-4 * float(gradient.abs().max()))


def test_mend_edits_are_low_rank_factors_that_revert_and_export_exactly(corpus, tmp_path):
    from peft import PeftModel

    model = _frozen()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    editor = AlphaEditModel(model, tiny_tokenizer(), _editing_args(corpus, _saved_editor(model, tmp_path / "ed")))
    result = editor.edit(REQUESTS, batch_size=2)
    assert len(result.batches) == 2 and result.batches[0].target_losses
    first = editor.state.batches[0]
    assert {u.module for u in first.layers} == {None, *editor.method.edited_modules}
    assert all(u.right.shape[0] == u.keys.shape[0] for u in first.layers)  # one factor column per token row
    edited = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = editor.save_edits(tmp_path / "lora", format="lora")
    merged = PeftModel.from_pretrained(tiny_causal_lm("llama"), str(adapter)).merge_and_unload()
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(value, edited[name], rtol=0, atol=1e-6)
    editor.revert(2)
    assert editor.state.num_edits == 0
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, original[name], rtol=0, atol=1e-6)
    changed = [name for name in original if not torch.equal(edited[name], original[name])]
    assert {name.rsplit(".", 2)[-2] for name in changed} == {"gate_proj", "up_proj", "down_proj"}


def test_published_mend_edits_reload_onto_the_base_and_continue(corpus, tmp_path):
    model = _frozen()
    base = tmp_path / "base"
    model.save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    folder = _saved_editor(model, tmp_path / "ed")
    editor = AlphaEditModel(model, tiny_tokenizer(), _editing_args(corpus, folder))
    editor.edit(REQUESTS[:2])
    saved = editor.save_pretrained(tmp_path / "edited")
    config = json.loads((saved / "editing_config.json").read_text())
    assert config["editing_args"]["mend_editor"] == config["hyperparameters"]["mend_editor"] == "<local>/ed"
    reloaded = AlphaEditModel.from_pretrained(str(base), editing_args=_editing_args(corpus, folder),
                                              edits=str(saved))
    for name, value in reloaded.model.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[name], rtol=0, atol=1e-6)
    reloaded.edit(REQUESTS[2:])
    reloaded.reset()
    for name, value in reloaded.model.state_dict().items():
        torch.testing.assert_close(value, _frozen().state_dict()[name], rtol=0, atol=1e-6)


def assert_only_rewrite_updates_projected(projected: AlphaEditModel, plain_updates: dict) -> None:
    """The first batch of `projected` (`use_projection=True`) against the same batch without the projection
    (`plain_updates`, keyed by `(layer, module)`): each rewrite module's ΔW lies in the null space (ΔW (I − P) = 0)
    and changed; every other matrix's update (inputs from the residual stream, not the keys the projector
    describes) is unprojected (equal up to the round-off of the reset in between)."""
    bases = projected.method.context.constrain_update.bases
    for update in projected.state.batches[0].layers:
        reference = plain_updates[(update.layer, update.module)]
        if update.module is None:
            basis = bases[update.layer].float()
            residual = update.delta - update.delta @ basis @ basis.T
            assert float(residual.abs().max()) < 1e-5 * float(update.delta.abs().max())
            assert not torch.allclose(update.delta, reference.delta)
        else:
            torch.testing.assert_close(update.delta, reference.delta, rtol=1e-4, atol=1e-7)


def test_projection_constrains_only_the_rewrite_modules_and_prune_restrains_every_matrix(corpus, tmp_path):
    model = _frozen()
    folder = _saved_editor(model, tmp_path / "ed")
    plain = AlphaEditModel(model, tiny_tokenizer(), _editing_args(corpus, folder))
    plain.edit(REQUESTS)
    plain_updates = {(u.layer, u.module): u for u in plain.state.batches[0].layers}
    plain.reset()
    projected = AlphaEditModel(model, tiny_tokenizer(), _editing_args(
        corpus, folder, use_projection=True, nullspace_threshold=0.5, nullspace_threshold_mode="relative"))
    projected.edit(REQUESTS)
    assert_only_rewrite_updates_projected(projected, plain_updates)
    projected.reset()
    strong = _saved_editor(model, tmp_path / "strong", step=50.0)  # updates far above the weights' σ_max
    pruned = AlphaEditModel(model, tiny_tokenizer(), _editing_args(corpus, strong, prune=True, prune_alpha="linear"))
    pruned.edit(REQUESTS)
    restrained = {u.module for u in pruned.state.batches[0].layers if u.restraint_rank > 0}
    assert None in restrained and set(pruned.method.edited_modules) <= restrained


def test_bad_mend_settings_are_refused_naming_the_field(corpus, tmp_path):
    model = _frozen()
    unset = AlphaEditModel(model, tiny_tokenizer(), EditingArguments(method="mend", disable_tqdm=True))
    with pytest.raises(ValueError, match="EditingArguments.mend_editor is not set"):
        unset.method  # noqa: B018  (building the method loads the editor)
    with pytest.raises(FileNotFoundError, match="mend_editor='/nowhere/editor': no such folder"):
        AlphaEditModel(model, tiny_tokenizer(), _editing_args(corpus, "/nowhere/editor")).method  # noqa: B018
    folder = _saved_editor(model, tmp_path / "ed")
    editor = AlphaEditModel(model, tiny_tokenizer(), _editing_args(corpus, folder, layers=[2, 3]))
    with pytest.raises(ValueError, match=r"EditingArguments.layers=\[2, 3\].*set layers=\[1, 2, 3\]"):
        editor.edit(REQUESTS[:1])
    with pytest.raises(ValueError, match="MendConfig.lr_scale=0"):
        MendConfig(lr_scale=0)
    untrained = MendEditor.for_model(model, resolve_model_spec(model), rank=4).save_pretrained(tmp_path / "untrained")
    with pytest.raises(ValueError, match="was never trained"):
        MendEditor.from_pretrained(untrained)
    weights = folder / EDITOR_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        MendEditor.from_pretrained(folder)
    with pytest.raises(ValueError, match="holds no mend_editor.json"):
        MendEditor.from_pretrained(tmp_path)


def test_an_editor_for_another_base_is_refused_naming_both_sides(tmp_path):
    model = _frozen()
    folder = _saved_editor(model, tmp_path / "ed")
    config = json.loads((folder / EDITOR_CONFIG).read_text())
    assert config["inner_params"][0]["name"] == "model.layers.1.mlp.gate_proj.weight"
    with pytest.raises(EditorMismatchError, match=r"weights of model.layers.1.mlp.gate_proj \(and 8 more\)"):
        MendEditor.from_pretrained(folder, model=_frozen(seed=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MendEditor.from_pretrained(folder, model=_frozen(seed=1), strict=False)
    assert any("strict=False" in str(w.message) for w in caught)
    with pytest.raises(EditorMismatchError, match=r"model type: editor 'llama', model 'gpt2'.*editor \[128, 64\] "
                                                  r"Linear, model has no such matrix"):
        MendEditor.from_pretrained(folder, model=_frozen("gpt2"))
    wider = tiny_causal_lm("llama")  # same names, other shapes
    wider.model.layers[1].mlp.gate_proj = torch.nn.Linear(64, 96, bias=False)
    with pytest.raises(EditorMismatchError, match=r"gate_proj.weight: editor \[128, 64\] Linear, model \[96, 64\]"):
        MendEditor.from_pretrained(folder, model=wider)


def test_save_push_fetch_give_identical_edits_and_work_offline_once_cached(corpus, tmp_path, unique_repo_id,
                                                                           fresh_hf_cache, hub_api, monkeypatch):
    model = _frozen()
    trained = _descent_editor(model)
    with torch.no_grad():  # something a fresh editor does not have, to see it travel
        trained.step_sizes.mul_(torch.linspace(0.5, 1.5, len(trained.inner_params)))
        trained.networks["in64_out128"].layers[0].up.normal_(std=0.01)
    folder = trained.save_pretrained(tmp_path / "ed")
    repo_id = unique_repo_id("mend-editor")
    commit = trained.push_to_hub(repo_id)
    files = set(hub_api.list_repo_files(repo_id))
    assert {EDITOR_WEIGHTS, EDITOR_CONFIG, "README.md"} <= files and not any("optimizer" in f for f in files)
    card = hub_api.model_info(repo_id).card_data
    assert "mend" in card.tags and card.library_name == "hf_alphaedit"
    fetched = MendEditor.from_pretrained(repo_id, model=model)
    for key, value in trained.state_dict().items():
        assert torch.equal(fetched.state_dict()[key], value), key

    def edited_weights_with(location: str, revision: str | None = None) -> dict[str, torch.Tensor]:
        base = _frozen()
        editor = AlphaEditModel(base, tiny_tokenizer(), _editing_args(corpus, location),
                                method_config=MendConfig(mend_editor_revision=revision))
        editor.edit(REQUESTS)
        return base.state_dict()

    local, remote = edited_weights_with(str(folder)), edited_weights_with(repo_id, commit)
    assert all(torch.equal(local[name], remote[name]) for name in local)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    offline = edited_weights_with(repo_id, commit)
    assert all(torch.equal(local[name], offline[name]) for name in local)


# -- training ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def training_files(tmp_path_factory, shared_data) -> dict[str, Path]:
    """A tiny Llama saved as a model folder and small flat-CounterFact / ZsRE training files."""
    folder = tmp_path_factory.mktemp("mend-training")
    model = tiny_causal_lm("llama")
    model.save_pretrained(folder / "base")
    tiny_tokenizer().save_pretrained(folder / "base")
    counterfact = json.loads((shared_data / "counterfact" / "counterfact-train.json").read_text())[:120]
    (folder / "counterfact.json").write_text(json.dumps(counterfact))
    zsre = json.loads((shared_data / "zsre" / "zsre_mend_train-1k.json").read_text())[:40]
    (folder / "zsre.json").write_text(json.dumps(zsre))
    return {"base": folder / "base", "counterfact": folder / "counterfact.json", "zsre": folder / "zsre.json",
            "root": folder}


def _training_args(files: dict[str, Path], output: Path, **overrides) -> MendTrainingArguments:
    values = {"output_dir": str(output), "model_name_or_path": str(files["base"]),
              "train_files": [str(files["counterfact"]), str(files["zsre"])], "validation_size": 16,
              "edits_per_batch": 4, "per_device_train_batch_size": 1, "per_device_eval_batch_size": 2,
              "max_steps": 30, "learning_rate": 1e-3, "step_size_learning_rate": 1e-3, "initial_step_size": 1e-3,
              "editor_rank": 16, "edit_loss_weight": 1.0, "outer_prompts": "both", "eval_strategy": "steps",
              "eval_steps": 10, "save_strategy": "steps", "save_steps": 10, "logging_steps": 5,
              "report_to": "none", "disable_tqdm": True, "use_cpu": True, "cache_lower_blocks": True, "seed": 0}
    values.update(overrides)
    return MendTrainingArguments(**values)


def test_a_short_training_run_lowers_the_validation_edit_loss_and_the_editor_edits(training_files, corpus, tmp_path):
    result = train_mend(_training_args(training_files, tmp_path / "run"))
    history = [log for log in json.loads((tmp_path / "run" / "checkpoint-30" / "trainer_state.json").read_text())[
        "log_history"] if "eval_edit_loss" in log]
    assert len(history) == 3
    assert history[-1]["eval_edit_loss"] < history[0]["eval_edit_loss"] < history[0]["eval_pre_edit_loss"]
    metrics = result.metrics
    assert metrics["validation_edit_loss"] < metrics["validation_pre_edit_loss"]
    config = json.loads((result.editor_dir / EDITOR_CONFIG).read_text())
    assert [item["format"] for item in config["training"]["data"]] == ["counterfact", "zsre"]
    assert config["training"]["train_records"] == 144 and config["training"]["steps"] == 30
    assert "validation_edit_loss" in (result.editor_dir / "README.md").read_text()
    # Checkpoints are editor folders too (plus Trainer's resume state).
    MendEditor.from_pretrained(tmp_path / "run" / "checkpoint-10")
    # The networks trained, not only the step sizes.
    assert all(float(layer.up.abs().max()) > 0 for network in result.editor.networks.values()
               for layer in network.layers)
    base, tokenizer = tiny_causal_lm("llama"), tiny_tokenizer()
    editor = AlphaEditModel(base, tokenizer, _editing_args(corpus, result.editor_dir))
    report = editor.edit(REQUESTS[:1])
    assert report.batches[0].target_losses[0] < 6.9  # ln(1024) ≈ 6.93: the untouched model's level


def test_training_resumes_from_a_checkpoint_to_the_same_editor(training_files, tmp_path):
    settings = {"eval_strategy": "no", "save_steps": 3, "lr_scheduler_type": "constant"}  # no decay tied to max_steps
    full = train_mend(_training_args(training_files, tmp_path / "full", max_steps=6, **settings))
    train_mend(_training_args(training_files, tmp_path / "part", max_steps=3, **settings))
    resumed = train_mend(_training_args(training_files, tmp_path / "part", max_steps=6, **settings,
                                        resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-3")))
    for key, value in full.editor.state_dict().items():
        torch.testing.assert_close(resumed.editor.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_the_training_episode_is_one_batch_edit_scored_before_and_after(training_files):
    model = _frozen()
    spec = resolve_model_spec(model)
    tokenizer = tiny_tokenizer()
    editor = _descent_editor(model, step=0.02)
    edit = encode_continuations(tokenizer, PROMPTS, TARGETS)
    locality = encode_continuations(tokenizer, ["Paris is the capital of"], ["France"])
    episode = EditEpisode.build(model, spec, edit, edit, locality, from_block=1)
    losses = mend_losses(editor, episode, edit_weight=1.0, locality_weight=1.0)
    assert losses.edit < losses.pre_edit and losses.locality > 0
    losses.total.backward()
    assert editor.step_sizes.grad is not None and bool(torch.isfinite(editor.step_sizes.grad).all())


def test_training_arguments_refuse_what_would_go_wrong(training_files, tmp_path):
    with pytest.raises(ValueError, match="train_files is empty"):
        MendTrainingArguments(output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="push_to_hub would make Trainer upload its checkpoints"):
        _training_args(training_files, tmp_path, push_to_hub=True)
    with pytest.raises(ValueError, match="push_editor_to_hub needs editor_repo_id"):
        _training_args(training_files, tmp_path, push_editor_to_hub=True)
    with pytest.raises(ValueError, match="outer_prompts='paraphrase'"):
        _training_args(training_files, tmp_path, outer_prompts="paraphrase")
    args = _training_args(training_files, tmp_path, learning_rate="1e-4", edits_per_batch="2")  # YAML strings
    assert args.learning_rate == 1e-4 and args.edits_per_batch == 2
    (tmp_path / "other.json").write_text(json.dumps([{"question": "q", "answer": "a"}]))
    with pytest.raises(ValueError, match="expected flat CounterFact"):
        train_mend(_training_args(training_files, tmp_path / "x", train_files=[str(tmp_path / "other.json")]))


def test_train_mend_command_trains_saves_and_pushes_an_editor_with_a_card(training_files, tmp_path, unique_repo_id,
                                                                         hub_api):
    from hf_alphaedit.cli import main

    repo_id = unique_repo_id("cli-mend")
    config = tmp_path / "mend.yaml"
    config.write_text("\n".join([
        f"model_name_or_path: {training_files['base']}",
        f"train_files: [{training_files['counterfact']}]",
        f"output_dir: {tmp_path / 'run'}", "validation_size: 8", "edits_per_batch: 4",
        "per_device_train_batch_size: 1", "per_device_eval_batch_size: 2", "max_steps: 4", "editor_rank: 8",
        "learning_rate: 1e-3", "eval_strategy: 'no'", "save_strategy: 'no'", "report_to: none", "use_cpu: true",
        "push_editor_to_hub: true", f"editor_repo_id: {repo_id}"]) + "\n")
    assert main(["train-mend", "--config", str(config), "--quiet"]) == 0
    assert (tmp_path / "run" / "editor" / EDITOR_CONFIG).is_file()
    files = set(hub_api.list_repo_files(repo_id))
    assert {EDITOR_WEIGHTS, EDITOR_CONFIG, "README.md"} <= files
    assert main(["info", "--path", str(tmp_path / "run" / "editor"), "--json"]) == 0


def test_the_smollm2_training_config_parses_for_train_mend():
    from hf_alphaedit.cli import COMMANDS, parse_command

    config = Path(__file__).resolve().parents[1] / "examples" / "configs" / "mend-smollm2.yaml"
    args = parse_command(COMMANDS["train-mend"], ["--config", str(config), "--max_steps", "7"])[MendTrainingArguments]
    assert args.max_steps == 7 and args.learning_rate == 3e-5 and isinstance(args.initial_step_size, float)
    assert args.edits_per_batch == 4 and args.cache_lower_blocks and args.load_best_model_at_end
    assert args.output_dir == str(Path.home() / ".cache" / "hf_alphaedit" / "mend-smollm2")
    assert [Path(f).name for f in args.train_files] == ["counterfact-train.json", "zsre_mend_train-1k.json"]


@pytest.mark.slow
def test_smollm2_gradient_factors_and_upper_blocks_match_the_full_model(smollm2):
    model, tokenizer = smollm2
    spec = resolve_model_spec(model)
    modules = default_inner_modules(model, spec)
    batch = encode_continuations(tokenizer, PROMPTS, TARGETS)
    assert blocks_match_full_model(model, spec, batch, spec.num_layers - 3)
    names = [f"{modules[-1]}.weight"]
    (gradient,) = _true_gradients(model, names, batch)
    factors, _ = gradient_factors(ModelRunner(model, spec, batch, spec.num_layers - 3), modules)
    inputs, output_grads = factors[modules[-1]]
    torch.testing.assert_close(output_grads.T @ inputs, gradient, rtol=1e-3, atol=1e-3 * float(gradient.abs().max()))
