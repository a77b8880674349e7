"""ROME, FT and NSE plugins (ALGORITHMS.md §6.1, §6.2, §9.1) on tiny random models and on SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch

from hf_alphaedit import AlphaEditModel, EditingArguments
from hf_alphaedit.architectures import resolve_model_spec
from hf_alphaedit.methods import LocateThenEditMethod
from hf_alphaedit.methods.ft import FTConfig
from hf_alphaedit.methods.nse import NSEConfig
from hf_alphaedit.methods.rome import RomeConfig
from hf_alphaedit.methods.targets import TargetOptimizer
from hf_alphaedit.requests import as_edit_requests
from tests.naive_scoring import rewrite_log_probs
from tests.tiny_models import tiny_causal_lm, tiny_tokenizer

REQUESTS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle", "target_new": "English language"},
    {"prompt": "{}, who plays the", "subject": "Miles Davis", "target_new": "piano"},
]


@pytest.fixture()
def corpus(tmp_path, shared_data):
    lines = (shared_data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()
    (tmp_path / "corpus.txt").write_text("\n".join([x.strip() for x in lines if x.strip()][:80]), encoding="utf-8")
    return tmp_path


def _editor(corpus, family: str, method: str, config=None, **overrides) -> AlphaEditModel:
    values = {"method": method, "statistics_corpus": str(corpus / "corpus.txt"), "statistics_samples": 80,
              "statistics_cache_dir": str(corpus / "stats"), "disable_tqdm": True, "v_num_grad_steps": 6,
              "v_lr": 0.5, "context_template_count": 2, "context_template_length": 6, **overrides}
    return AlphaEditModel(tiny_causal_lm(family), tiny_tokenizer(), EditingArguments(**values),
                          method_config=config)


def _rome_config(**overrides) -> RomeConfig:
    return RomeConfig(**{"rome_template_lengths": [4, 6], "rome_templates_per_length": 3, **overrides})


def _math_weights(model: AlphaEditModel) -> dict[int, torch.Tensor]:
    return {layer: model.spec.weight(model.model, layer).detach().clone() for layer in model.hparams.layers}


# -- ROME ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_rome_maps_the_raw_prompt_key_to_the_optimised_value(family, corpus):
    model = _editor(corpus, family, "rome", _rome_config(mom2_adjustment=True), layers=[1])
    rome = model.method
    assert rome.covariance_factors and len(rome.templates) == 7
    request = as_edit_requests(REQUESTS[:1])[0]
    keys, outputs = rome.projection_io(request, 1)
    expected = rome.target_optimizer(1).optimize([request]).values[0]
    before = _math_weights(model)[1]
    model.edit(REQUESTS[:1])
    delta = model.spec.weight(model.model, 1).detach() - before
    # §15: ΔW k = v* − w for the raw-prompt key, and ΔW has rank one.
    torch.testing.assert_close(delta @ keys[0], expected - outputs[0], rtol=1e-3, atol=1e-4)
    assert int(torch.linalg.matrix_rank(delta.double(), rtol=1e-4)) == 1
    (update,) = model.state.batches[0].layers
    torch.testing.assert_close(update.delta, delta, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(update.keys[0], keys[0])


def test_rome_averaged_key_mode_fits_the_template_mean(corpus):
    model = _editor(corpus, "gpt2", "rome", _rome_config(key_mode="averaged", mom2_adjustment=False), layers=[2])
    request = as_edit_requests(REQUESTS[1:2])[0]
    keys, outputs = model.method.projection_io(request, 2)
    expected = model.method.target_optimizer(2).optimize([request]).values[0]
    before = _math_weights(model)[2]
    model.edit([request])
    delta = model.spec.weight(model.model, 2).detach() - before
    # outputs.mean() = W k̄ + b: the projection is affine in its input.
    torch.testing.assert_close(delta @ keys.mean(0), expected - outputs.mean(0), rtol=1e-3, atol=1e-4)
    # The direction is k̄/‖k̄‖ without mom2_adjustment.
    right = model.state.batches[0].layers[0].right[0]
    torch.testing.assert_close(right, keys.mean(0) / keys.mean(0).norm(), rtol=1e-5, atol=1e-6)


def test_rome_edits_every_request_of_a_batch_on_the_weights_left_by_the_previous(corpus):
    batched = _editor(corpus, "llama", "rome", _rome_config(), layers=[1, 2])
    one_by_one = _editor(corpus, "llama", "rome", _rome_config(), layers=[1, 2])
    batched.edit(REQUESTS[:2], batch_size=2)
    one_by_one.edit(REQUESTS[:2], batch_size=1)
    for layer in (1, 2):
        torch.testing.assert_close(batched.spec.weight(batched.model, layer),
                                   one_by_one.spec.weight(one_by_one.model, layer), rtol=1e-5, atol=1e-6)
    for update in batched.state.batches[0].layers:
        assert update.left.shape == (batched.spec.hidden_size, 2) and update.right.shape == (2, batched.spec.key_size)
        parts = [update.left[:, j: j + 1] @ update.right[j: j + 1] for j in range(2)]
        assert all(int(torch.linalg.matrix_rank(p.double(), rtol=1e-4)) == 1 for p in parts)
        torch.testing.assert_close(sum(parts), update.delta, rtol=1e-5, atol=1e-6)
    assert len(batched.state.batches[0].target_losses) == 2


# -- FT -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "objective"), [("llama", "prompt_last"), ("gpt2", "target_new")])
def test_ft_trains_only_the_edited_weight_inside_the_box(family, objective, corpus):
    config = FTConfig(objective=objective, norm_constraint=2e-3, lr=1e-2, num_steps=15)
    model = _editor(corpus, family, "ft", config, layers=[2])
    ft = model.method
    examples = [ft.example(r) for r in as_edit_requests(REQUESTS)]
    with torch.no_grad():
        initial = ft.losses(examples)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    weight_before = _math_weights(model)[2]
    result = model.edit(REQUESTS)
    after = model.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {model.spec.rewrite_module_name(2) + ".weight"}
    delta = model.spec.weight(model.model, 2).detach() - weight_before
    assert delta.abs().max() <= 2e-3 + 1e-6
    assert delta.abs().max() > 1e-3  # the box is reached: the constraint is active
    with torch.no_grad():
        final = ft.losses(examples)
    assert (final < initial).all()
    torch.testing.assert_close(torch.tensor(result.batches[0].target_losses), final, rtol=1e-4, atol=1e-5)
    (update,) = model.state.batches[0].layers
    assert torch.equal(update.delta, update.left @ update.right) and update.keys.shape == (0, model.spec.key_size)
    torch.testing.assert_close(update.delta, delta, rtol=0, atol=1e-6)


def test_ft_prompt_last_scores_every_target_token_at_the_last_prompt_token(corpus):
    model = _editor(corpus, "llama", "ft", FTConfig(), layers=[2])
    request = as_edit_requests(REQUESTS[1:2])[0]
    example = model.method.example(request)
    prompt = model.tokenizer(request.prompt_with_subject)["input_ids"]
    assert example.ids == prompt and {p for p, _ in example.labels} == {len(prompt) - 1}
    assert len(example.labels) > 1


# -- NSE ----------------------------------------------------------------------------------------------------------


def test_nse_targets_come_from_the_original_weights(corpus):
    model = _editor(corpus, "llama", "nse", NSEConfig(alpha=0.0, upper_bound=1e9), layers=[1, 2])
    original = tiny_causal_lm("llama")  # the same seed: the unedited weights
    model.edit(REQUESTS[:2])
    edited = _math_weights(model)
    requests = as_edit_requests(REQUESTS[2:])
    targets = model.method.optimize_targets(requests)
    assert all(torch.equal(edited[layer], w) for layer, w in _math_weights(model).items())  # restored exactly
    reference = TargetOptimizer(original, model.tokenizer, resolve_model_spec(original), model.hparams,
                                model.state.context_templates).optimize(requests)
    torch.testing.assert_close(targets.values, reference.values, rtol=1e-5, atol=1e-5)
    current = LocateThenEditMethod.optimize_targets(model.method, requests)  # on the edited weights
    assert not torch.allclose(current.values, reference.values, atol=1e-4)


def test_nse_neuron_selection_leaves_other_key_dimensions_untouched(corpus):
    config = NSEConfig(alpha=0.0, upper_bound=1e9, neuron_threshold=0.5, max_iterations=2)  # one pass
    model = _editor(corpus, "gpt2", "nse", config, layers=[2])
    before = _math_weights(model)[2]
    model.edit(REQUESTS)
    delta = model.spec.weight(model.model, 2).detach() - before
    (update,) = model.state.batches[0].layers
    touched = (delta.abs().sum(dim=0) > 0).nonzero().flatten()
    # The only edited layer's keys do not depend on its own edit, so the stored keys are the solved keys.
    selected = model.method.selected_neurons(update.keys)
    assert torch.equal(touched, selected) and 0 < len(selected) < model.spec.key_size
    scores = update.keys.double().abs().sum(dim=0)
    assert scores[selected].sum() <= 0.5 * scores.sum() < scores[selected].sum() + scores[selected].min()


def test_nse_re_edits_until_the_error_is_small_and_accumulates_previous_keys(corpus):
    model = _editor(corpus, "llama", "nse", NSEConfig(alpha=0.0, upper_bound=1e9, max_iterations=3),
                    layers=[1, 2])
    preserved = {layer: value.clone() for layer, value in model.method.preserved.items()}
    model.edit(REQUESTS)
    (batch,) = model.state.batches
    for update in batch.layers:
        # alpha = 0: every request is edited in both passes.
        assert update.left.shape[1] == 2 * len(REQUESTS) and update.keys.shape[0] == len(REQUESTS)
        keys = update.keys.double()
        torch.testing.assert_close(model.method.preserved[update.layer], preserved[update.layer] + keys.T @ keys)
    single = _editor(corpus, "llama", "nse", NSEConfig(alpha=0.0, upper_bound=1e9, max_iterations=2),
                     layers=[1, 2])
    single.edit(REQUESTS)
    assert all(u.left.shape[1] == len(REQUESTS) for u in single.state.batches[0].layers)


def test_nse_skips_requests_outside_the_error_band(corpus):
    model = _editor(corpus, "llama", "nse", NSEConfig(alpha=1e9), layers=[1, 2])
    weights = _math_weights(model)
    model.edit(REQUESTS)
    assert all(torch.equal(w, model.spec.weight(model.model, layer)) for layer, w in weights.items())
    assert all(u.left.shape[1] == 0 and u.keys.shape[0] == 3 for u in model.state.batches[0].layers)


# -- configs ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "field", "value"), [
    (RomeConfig, "key_mode", "mean"), (RomeConfig, "rome_clamp_norm_factor", 0.0),
    (FTConfig, "objective", "nll"), (FTConfig, "norm_constraint", -1.0), (FTConfig, "chunk_size", 0),
    (NSEConfig, "neuron_threshold", 1.5), (NSEConfig, "max_iterations", 1),
])
def test_bad_config_values_name_the_field(cls, field, value):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field}="):
        cls(**{field: value})


def test_configs_parse_strings_and_pick_reference_defaults(corpus):
    assert FTConfig(lr="1e-3", norm_constraint="5e-4").lr == 1e-3
    rome = _editor(corpus, "gpt2", "rome", _rome_config(), layers=[1]).method
    assert rome.covariance_factors and rome.target_hparams[1].v_weight_decay == 0.5
    rome = _editor(corpus, "llama", "rome", _rome_config(), layers=[1]).method
    assert not rome.covariance_factors and rome.target_hparams[1].v_weight_decay == 1e-3
    assert rome.target_hparams[1].clamp_norm_factor == 4.0
    assert len(_editor(corpus, "llama", "rome", RomeConfig(), layers=[1]).method.templates) == 21


def _reference_spec(model_type: str, num_layers: int):
    from hf_alphaedit.architectures import ModelSpec

    gpt = model_type in ("gpt2", "gptj")
    return ModelSpec(model_type, "h.{}", "h.{}.mlp", None, num_layers, 8, 16, model_type == "gpt2",
                     "gpt" if gpt else "gated", None)


@pytest.mark.parametrize(("model_type", "num_layers", "rome_steps", "nse_weight", "alphaedit_lr", "alphaedit_steps"), [
    ("gpt2", 48, 20, 10000.0, 0.5, 20), ("gptj", 28, 20, 15000.0, 0.5, 25), ("llama", 32, 25, 15000.0, 0.1, 25)])
def test_reference_preset_takes_rome_and_nse_settings_from_their_own_files(model_type, num_layers, rome_steps,
                                                                          nse_weight, alphaedit_lr, alphaedit_steps):
    """§11.3 / §9.1: ROME's files use v_lr 0.5 (AlphaEdit's Llama-3 file 0.1) and 20 steps on GPT-J (AlphaEdit's
    25); NSE's GPT-2 XL file λ = 10,000 (MEMIT's 20,000). Values a user sets still win; `auto` is untouched."""
    spec = _reference_spec(model_type, num_layers)
    rome = EditingArguments(method="rome", preset="reference").resolve(spec)
    assert (rome.v_lr, rome.v_num_grad_steps) == (0.5, rome_steps)
    alphaedit = EditingArguments(preset="reference").resolve(spec)
    assert (alphaedit.v_lr, alphaedit.v_num_grad_steps) == (alphaedit_lr, alphaedit_steps)
    nse = EditingArguments(method="nse", preset="reference").resolve(spec)
    assert nse.mom2_update_weight == nse_weight and nse.reference_file == alphaedit.reference_file
    assert EditingArguments(method="rome", preset="reference", v_lr=0.2).resolve(spec).v_lr == 0.2
    assert EditingArguments(method="nse", preset="reference", mom2_update_weight=5.0).resolve(
        spec).mom2_update_weight == 5.0
    assert EditingArguments(method="rome").resolve(spec).reference_file is None


def test_nse_reference_preset_uses_the_absolute_error_bounds(corpus):
    editor = _editor(corpus, "gpt2", "nse", layers=[1, 2], preset="reference")
    editor.edit(REQUESTS[:1])  # the first edit builds the method and its context templates
    targets = editor.method.optimize_targets(as_edit_requests(REQUESTS[1:]))
    alpha, upper = editor.method.error_bounds(targets)
    assert alpha.tolist() == [35.0, 35.0] and upper.tolist() == [150.0, 150.0]  # GPT-2 XL's NSE file
    relative = _editor(corpus, "gpt2", "nse", layers=[1, 2])
    relative.edit(REQUESTS[:1])
    relative = relative.method.error_bounds(targets)[0]
    assert torch.allclose(relative, 0.2 * targets.initial_hidden.norm(dim=1).double())
    custom = _editor(corpus, "gpt2", "nse", NSEConfig(alpha=3.0), layers=[1, 2], preset="reference")
    custom.edit(REQUESTS[:1])
    assert custom.method.error_bounds(targets)[0].tolist() == [3.0, 3.0]


def _tokenizer_with_bos():
    """The tiny tokenizer plus a Llama-3 style BOS token that every encoding starts with."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = tiny_tokenizer().backend_tokenizer.__class__.from_str(tiny_tokenizer().backend_tokenizer.to_str())
    backend.add_special_tokens(["<|begin_of_text|>"])
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>"), bos


def test_context_templates_keep_the_bos_text_only_when_asked():
    """§3.1 quirk: the reference decodes templates with special tokens, so a Llama-3 prompt built on one starts
    with two BOS ids; `context_template_special_tokens=True` reproduces that, the default does not."""
    from hf_alphaedit.methods.prompts import generate_context_templates

    tokenizer, bos = _tokenizer_with_bos()
    model = tiny_causal_lm("llama")
    kept = generate_context_templates(model, tokenizer, 6, 2, seed=0, keep_special_tokens=True)
    skipped = generate_context_templates(model, tokenizer, 6, 2, seed=0)
    assert all(t.startswith("<|begin_of_text|>") for t in kept[1:])
    assert [t.removeprefix("<|begin_of_text|>") for t in kept] == skipped
    assert tokenizer(kept[1].format("Paris"))["input_ids"][:2] == [bos, bos]
    assert tokenizer(skipped[1].format("Paris"))["input_ids"][:2].count(bos) == 1
    hp = EditingArguments(context_template_special_tokens=True).resolve(_reference_spec("llama", 32))
    assert hp.context_template_special_tokens


# -- SmolLM2 ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def five_records(shared_data) -> list[dict]:
    return json.loads((shared_data / "counterfact" / "counterfact-edit.json").read_text())[:5]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "config", "overrides"), [
    ("rome", RomeConfig(rome_template_lengths=[5], rome_templates_per_length=5), {"layers": [5],
                                                                                 "v_num_grad_steps": 10}),
    ("ft", FTConfig(norm_constraint=None, lr=5e-4, num_steps=10), {"layers": [5]}),
    # NSE's layers are among AlphaEdit's, so the statistics the SmolLM2 tests share serve it without a new pass.
    ("nse", NSEConfig(), {"layers": [4, 5], "v_num_grad_steps": 15}),
])
def test_smollm2_counterfact_edits_raise_the_target_probability(smollm2_editor, five_records, method, config,
                                                                overrides):
    editor = smollm2_editor(method, config, **overrides)
    before = rewrite_log_probs(editor.model, editor.tokenizer, five_records, "target_new")
    editor.edit(five_records, batch_size=5)
    after = rewrite_log_probs(editor.model, editor.tokenizer, five_records, "target_new")
    print(f"{method}: mean target log-prob {before.mean():.2f} -> {after.mean():.2f}")
    assert (after > before).all() and after.mean() > before.mean() + 1.0
