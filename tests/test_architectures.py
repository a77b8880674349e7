from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from hf_alphaedit.architectures import (
    ModelSpec,
    UnsupportedArchitectureError,
    block_output_hidden,
    resolve_model_spec,
)
from tests.tiny_models import HIDDEN, INTERMEDIATE, LAYERS, TINY_FAMILIES, tiny_causal_lm, tiny_tokenizer

EXPECTED_PATHS = {
    "llama": ("model.layers.{}", "model.layers.{}.mlp.down_proj", "model.norm"),
    "mistral": ("model.layers.{}", "model.layers.{}.mlp.down_proj", "model.norm"),
    "qwen2": ("model.layers.{}", "model.layers.{}.mlp.down_proj", "model.norm"),
    "qwen3": ("model.layers.{}", "model.layers.{}.mlp.down_proj", "model.norm"),
    "gemma": ("model.layers.{}", "model.layers.{}.mlp.down_proj", "model.norm"),
    "gemma2": ("model.layers.{}", "model.layers.{}.mlp.down_proj", "model.norm"),
    "phi3": ("model.layers.{}", "model.layers.{}.mlp.down_proj", "model.norm"),
    "gpt2": ("transformer.h.{}", "transformer.h.{}.mlp.c_proj", "transformer.ln_f"),
    "gptj": ("transformer.h.{}", "transformer.h.{}.mlp.fc_out", "transformer.ln_f"),
    "gpt_neox": ("gpt_neox.layers.{}", "gpt_neox.layers.{}.mlp.dense_4h_to_h", "gpt_neox.final_layer_norm"),
    "opt": ("model.decoder.layers.{}", "model.decoder.layers.{}.fc2", "model.decoder.final_layer_norm"),
    "falcon": ("transformer.h.{}", "transformer.h.{}.mlp.dense_4h_to_h", "transformer.ln_f"),
}
GATED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"}
PROMPTS = ["The old lighthouse keeper climbed the stairs to", "Blue kites"]


@functools.cache
def _cached_model(model_type: str) -> PreTrainedModel:
    return tiny_causal_lm(model_type)


@pytest.fixture
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    """A fresh tiny model (tests here modify weights)."""
    return tiny_causal_lm(request.param)


def _padded_batch() -> dict[str, torch.Tensor]:
    batch = tiny_tokenizer()(PROMPTS, return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, -1] == 0, "the batch must contain right padding"
    return dict(batch)


def _mystery_llama() -> PreTrainedModel:
    model = tiny_causal_lm("llama")
    model.config.model_type = "mystery"
    return model


def test_tokenizer_fits_every_tiny_model() -> None:
    tokenizer = tiny_tokenizer()
    assert tokenizer.padding_side == "right"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    assert tokenizer.model_max_length == 128
    for model_type in TINY_FAMILIES:
        assert _cached_model(model_type).config.vocab_size >= len(tokenizer)


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_spec_resolves_with_expected_paths_and_sizes(model_type: str) -> None:
    model = _cached_model(model_type)
    spec = resolve_model_spec(model)
    layer_tmp, rewrite_tmp, norm = EXPECTED_PATHS[model_type]
    assert (spec.model_type, spec.layer_module_tmp, spec.rewrite_module_tmp) == (
        model_type,
        layer_tmp,
        rewrite_tmp,
    )
    assert spec.final_norm == norm
    assert spec.output_projection == ("model.decoder.project_out" if model_type == "opt" else None)
    assert (spec.num_layers, spec.hidden_size, spec.key_size) == (LAYERS, HIDDEN, INTERMEDIATE)
    assert spec.layer_style == ("gated" if model_type in GATED else "gpt")
    assert spec.conv1d == (model_type == "gpt2")
    assert spec.logit_softcap == (2.0 if model_type == "gemma2" else None)

    blocks = spec.blocks(model)
    assert len(blocks) == LAYERS
    assert blocks[2] is model.get_submodule(layer_tmp.format(2))
    for layer in range(LAYERS):
        module = spec.rewrite_module(model, layer)
        assert spec.rewrite_module_name(layer) == rewrite_tmp.format(layer)
        assert module is model.get_submodule(rewrite_tmp.format(layer))
        if spec.conv1d:
            assert isinstance(module, Conv1D)
            assert (module.nx, module.nf) == (INTERMEDIATE, HIDDEN)
        else:
            assert isinstance(module, torch.nn.Linear)
            assert (module.in_features, module.out_features) == (INTERMEDIATE, HIDDEN)
        assert spec.weight(model, layer).shape == (HIDDEN, INTERMEDIATE)
    assert spec.final_norm_module(model) is model.get_submodule(norm)

    layers = spec.default_layers()
    assert layers and layers == sorted(set(layers))
    assert 0 <= layers[0] and layers[-1] < LAYERS
    with pytest.raises(IndexError, match="out of range"):
        spec.block(model, LAYERS)


@pytest.mark.parametrize("model", TINY_FAMILIES, indirect=True)
def test_add_to_weight_changes_only_that_module_in_math_orientation(model: PreTrainedModel) -> None:
    spec = resolve_model_spec(model)
    layer = 1
    module = spec.rewrite_module(model, layer)
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(HIDDEN, INTERMEDIATE, generator=generator, dtype=torch.float64) * 0.1
    keys = torch.randn(3, INTERMEDIATE, generator=generator)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        out_before = module(keys)
        weight_before = spec.weight(model, layer).clone()

    spec.add_to_weight(model, layer, delta)

    with torch.no_grad():
        out_after = module(keys)
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed == {f"{spec.rewrite_module_name(layer)}.weight"}
    torch.testing.assert_close(spec.weight(model, layer), weight_before + delta.float())
    torch.testing.assert_close(out_after - out_before, keys @ delta.float().T, atol=1e-5, rtol=1e-4)


def _last_block_output(model: PreTrainedModel, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(last block's hidden output ``[batch, seq, d]``, model logits ``[batch, seq, vocab]``) on a
    right-padded batch."""
    captured: list[torch.Tensor] = []
    handle = spec.block(model, spec.num_layers - 1).register_forward_hook(
        lambda _module, _inputs, output: captured.append(block_output_hidden(output))
    )
    try:
        with torch.no_grad():
            logits = model(**_padded_batch()).logits
    finally:
        handle.remove()
    return captured[0], logits


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_logits_match_model_forward_on_right_padded_batch(model_type: str) -> None:
    model = _cached_model(model_type)
    spec = resolve_model_spec(model)
    hidden, expected = _last_block_output(model, spec)
    with torch.no_grad():
        logits = spec.logits(model, hidden)
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() < 1e-5


def test_softcap_and_output_projection_matter() -> None:
    """Guards the previous test: dropping the soft-cap or OPT's project_out would change the logits."""
    gemma2 = _cached_model("gemma2")
    spec = resolve_model_spec(gemma2)
    hidden, _ = _last_block_output(gemma2, spec)
    uncapped = dataclasses.replace(spec, logit_softcap=None)
    with torch.no_grad():
        assert (uncapped.logits(gemma2, hidden) - spec.logits(gemma2, hidden)).abs().max() > 1e-3

    opt = _cached_model("opt")
    spec = resolve_model_spec(opt)
    hidden, _ = _last_block_output(opt, spec)
    with torch.no_grad(), pytest.raises(RuntimeError):
        dataclasses.replace(spec, output_projection=None).logits(opt, hidden)


def test_unknown_architecture_error_suggests_templates() -> None:
    model = _mystery_llama()
    with pytest.raises(UnsupportedArchitectureError) as error:
        resolve_model_spec(model)
    message = str(error.value)
    assert "'mystery'" in message
    assert "layer_module_tmp='model.layers.{}'" in message
    assert "rewrite_module_tmp='model.layers.{}.mlp.down_proj'" in message
    assert "final_norm='model.norm'" in message
    assert isinstance(error.value, ValueError)

    with pytest.raises(
        UnsupportedArchitectureError, match="passed layer_module_tmp but not rewrite_module_tmp"
    ):
        resolve_model_spec(model, layer_module_tmp="model.layers.{}")


def test_unknown_gpt2_like_error_suggests_mlp_projection_not_attention() -> None:
    model = tiny_causal_lm("gpt2")
    model.config.model_type = "mystery"
    with pytest.raises(UnsupportedArchitectureError) as error:
        resolve_model_spec(model)
    assert "rewrite_module_tmp='transformer.h.{}.mlp.c_proj'" in str(error.value)
    spec = resolve_model_spec(
        model, layer_module_tmp="transformer.h.{}", rewrite_module_tmp="transformer.h.{}.mlp.c_proj"
    )
    assert (spec.conv1d, spec.layer_style, spec.final_norm) == (True, "gpt", "transformer.ln_f")


def test_unknown_architecture_works_with_overrides() -> None:
    model = _mystery_llama()
    spec = resolve_model_spec(
        model, layer_module_tmp="model.layers.{}", rewrite_module_tmp="model.layers.{}.mlp.down_proj"
    )
    reference = resolve_model_spec(tiny_causal_lm("llama"))
    assert spec == dataclasses.replace(reference, model_type="mystery")

    explicit = resolve_model_spec(
        model,
        layer_module_tmp="model.layers.{}",
        rewrite_module_tmp="model.layers.{}.mlp.up_proj",
        final_norm="model.norm",
    )
    assert (explicit.hidden_size, explicit.key_size, explicit.final_norm) == (
        INTERMEDIATE,
        HIDDEN,
        "model.norm",
    )


@pytest.mark.parametrize(
    ("kwargs", "field", "hint"),
    [
        (
            {"layer_module_tmp": "model.layers", "rewrite_module_tmp": "model.layers.{}.mlp.down_proj"},
            "layer_module_tmp",
            "exactly one",
        ),
        (
            {"layer_module_tmp": "model.layers.{}", "rewrite_module_tmp": "model.layers.{}.mlp.{}"},
            "rewrite_module_tmp",
            "exactly one",
        ),
        (
            {"layer_module_tmp": "model.layer.{}", "rewrite_module_tmp": "model.layers.{}.mlp.down_proj"},
            "layer_module_tmp",
            "'model.layers.0'",
        ),
        (
            {"layer_module_tmp": "model.layers.{}", "rewrite_module_tmp": "model.layers.{}.mlp.down_prj"},
            "rewrite_module_tmp",
            "'model.layers.0.mlp.down_proj'",
        ),
        (
            {"layer_module_tmp": "model.layers.{}", "rewrite_module_tmp": "model.layers.{}.mlp"},
            "rewrite_module_tmp",
            "nn.Linear or transformers Conv1D",
        ),
        (
            {
                "layer_module_tmp": "model.layers.{}",
                "rewrite_module_tmp": "model.layers.{}.mlp.down_proj",
                "final_norm": "model.nrm",
            },
            "final_norm",
            "'model.norm'",
        ),
    ],
)
def test_bad_overrides_name_the_field(kwargs: dict[str, str], field: str, hint: str) -> None:
    with pytest.raises(ValueError) as error:
        resolve_model_spec(_cached_model("llama"), **kwargs)
    assert not isinstance(error.value, UnsupportedArchitectureError)
    assert f"{field}=" in str(error.value)
    assert hint in str(error.value)


def test_missing_builtin_template_says_it_is_builtin() -> None:
    class Wrapper(torch.nn.Module):
        def __init__(self, inner: PreTrainedModel) -> None:
            super().__init__()
            self.base_model = inner
            self.config = inner.config

    with pytest.raises(ValueError, match="built-in template for model_type 'llama'") as error:
        resolve_model_spec(Wrapper(_cached_model("llama")))
    assert "'base_model.model.layers.0'" in str(error.value)


def test_add_to_weight_rejects_wrong_orientation() -> None:
    model = _cached_model("llama")
    spec = resolve_model_spec(model)
    with pytest.raises(ValueError, match=r"\[d, d_k\] = \[64, 128\]"):
        spec.add_to_weight(model, 0, torch.zeros(INTERMEDIATE, HIDDEN))


def _spec(num_layers: int, layer_style: str) -> ModelSpec:
    return ModelSpec(
        model_type="test",
        layer_module_tmp="model.layers.{}",
        rewrite_module_tmp="model.layers.{}.mlp.down_proj",
        final_norm="model.norm",
        num_layers=num_layers,
        hidden_size=8,
        key_size=16,
        conv1d=False,
        layer_style=layer_style,
        logit_softcap=None,
    )


@pytest.mark.parametrize(
    ("num_layers", "layer_style", "expected"),
    [
        (30, "gated", [4, 5, 6, 7, 8]),
        (32, "gated", [4, 5, 6, 7, 8]),
        (28, "gated", [4, 5, 6, 7, 8]),
        (40, "gated", [5, 6, 7, 8, 9, 10]),
        (80, "gated", list(range(10, 21))),
        (48, "gpt", [13, 14, 15, 16, 17]),
    ],
)
def test_default_layers_reference_sizes(num_layers: int, layer_style: str, expected: list[int]) -> None:
    assert _spec(num_layers, layer_style).default_layers() == expected


@pytest.mark.parametrize("layer_style", ["gated", "gpt"])
@pytest.mark.parametrize("num_layers", [1, 2, 3, 4, 6, 12])
def test_default_layers_small_models(num_layers: int, layer_style: str) -> None:
    layers = _spec(num_layers, layer_style).default_layers()
    assert layers and layers == sorted(set(layers))
    assert 0 <= layers[0] and layers[-1] < num_layers
