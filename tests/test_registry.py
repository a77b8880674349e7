"""The method registry and config layer: a third-party plugin in one file, method configs (JSON, HfArgumentParser),
`use_projection` (the null-space booster on MEMIT, inherent in AlphaEdit) and MEMIT_seq."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import torch
from transformers import HfArgumentParser

import hf_alphaedit
from hf_alphaedit import AlphaEditModel, EditingArguments, KeyStatistics, register_method
from hf_alphaedit.methods import (
    AlphaEditConfig,
    BatchUpdate,
    EditContext,
    LayerUpdate,
    LocateThenEditMethod,
    Memit,
    MemitConfig,
    MethodConfig,
)
from hf_alphaedit.methods.ft import FTConfig
from hf_alphaedit.requests import EditRequest
from tests.test_engine import _scaled_model
from tests.tiny_models import tiny_causal_lm, tiny_tokenizer

REQUESTS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle", "target_new": "English language"},
    {"prompt": "{}, who plays the", "subject": "Miles Davis", "target_new": "piano"},
]


# -- a third-party plugin, written in this one file --------------------------------------------------------------


@dataclass
class MinimumNormConfig(MethodConfig):
    ridge: float = field(default=1e-6, metadata={"help": "Ridge added to K Kᵀ before the solve."})


class MinimumNorm(LocateThenEditMethod):
    """Fits every request exactly with the smallest update: `ΔW = R (KᵀK + ridge I)⁻¹ Kᵀ` (rank n)."""

    def solve(self, layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        keys64 = keys.double()  # [n, d_k]
        gram = keys64 @ keys64.T + self.config.ridge * torch.eye(keys64.shape[0], dtype=torch.float64)
        return torch.linalg.solve(gram, keys64)  # [n, d_k]


class ScaleRow:
    """A bare `EditMethod` (no base class): adds `scale · e₀ e₀ᵀ` to the first edited layer, then refuses
    projection (its updates are not key-space deltas)."""

    projection = "unsupported"

    def __init__(self, context: EditContext, config: None) -> None:
        self.context = context

    def edit_batch(self, requests: Sequence[EditRequest]) -> BatchUpdate:
        spec, layer = self.context.spec, self.context.hparams.layers[0]
        left = torch.zeros(spec.hidden_size, 1)
        left[0, 0] = float(len(requests))
        right = torch.zeros(1, spec.key_size)
        right[0, 0] = 1.0
        return BatchUpdate([self.context.apply_update(LayerUpdate(layer, left, right, torch.zeros(0, spec.key_size)))])

    def commit(self, update: BatchUpdate) -> None:
        pass


register_method("minimum_norm", MinimumNormConfig, MinimumNorm)
register_method("scale_row", None, ScaleRow)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("registry")
    lines = [line.strip() for line in open("/work/shared/data/wikitext-2/valid.txt", encoding="utf-8")
             if line.strip()][:60]
    (folder / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    return str(folder / "corpus.txt"), str(folder / "stats")


def _args(corpus, **overrides) -> EditingArguments:
    corpus_file, cache = corpus
    values = {"layers": [1, 2], "statistics_corpus": corpus_file, "statistics_samples": 60,
              "statistics_cache_dir": cache, "disable_tqdm": True, "v_num_grad_steps": 6, "v_lr": 0.5}
    values.update(overrides)
    return EditingArguments(**values)


def test_a_plugin_in_one_file_is_listed_selected_and_edits(corpus):
    assert {"alphaedit", "memit", "minimum_norm", "scale_row"} <= set(hf_alphaedit.list_methods())
    config = MinimumNormConfig(ridge=1e-8)
    model = AlphaEditModel(tiny_causal_lm("llama"), tiny_tokenizer(), _args(corpus, method="minimum_norm"),
                           method_config=config)
    assert isinstance(model.method, MinimumNorm) and model.method.config is config
    before = model.spec.weight(model.model, 2).detach().clone()
    model.edit(REQUESTS)
    (record,) = model.state.batches
    update = record.layers[-1]
    # The last layer takes the whole remaining residual, and the minimum-norm solve fits it exactly.
    torch.testing.assert_close(update.delta @ update.keys.T, update.left, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(model.spec.weight(model.model, 2).detach(), before + update.delta,
                               rtol=1e-6, atol=1e-6)
    assert model.state.method == "minimum_norm"


def test_a_bare_protocol_plugin_edits_and_refuses_projection(corpus):
    model = AlphaEditModel(tiny_causal_lm("llama"), tiny_tokenizer(), _args(corpus, method="scale_row"))
    before = model.spec.weight(model.model, 1).detach().clone()
    model.edit(REQUESTS, batch_size=2)
    change = model.spec.weight(model.model, 1).detach() - before
    assert change[0, 0] == pytest.approx(3.0) and torch.count_nonzero(change) == 1
    with pytest.raises(ValueError, match="EditingArguments.use_projection=True: method 'scale_row'"):
        EditingArguments(method="scale_row", use_projection=True)


def test_registration_errors_name_the_fix():
    with pytest.raises(ValueError, match="already registered as 'minimum_norm'.*replace=True"):
        register_method("minimum_norm", None, ScaleRow)
    register_method("minimum_norm", MinimumNormConfig, MinimumNorm)  # the same pair again is harmless
    with pytest.raises(ValueError, match="already the config of method 'minimum_norm'"):
        register_method("other_name", MinimumNormConfig, MinimumNorm)
    with pytest.raises(TypeError, match="deriving from hf_alphaedit.methods.MethodConfig"):
        register_method("plain", dict, MinimumNorm)
    with pytest.raises(TypeError, match="has no edit_batch"):
        register_method("empty", None, object)
    with pytest.raises(ValueError, match="must start with a letter"):
        register_method("my method", None, ScaleRow)
    assert "other_name" not in hf_alphaedit.list_methods()


# -- method configs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("config_cls", "method"), [(AlphaEditConfig, "alphaedit"), (MemitConfig, "memit"),
                                                    (MinimumNormConfig, "minimum_norm")])
def test_method_configs_round_trip_and_parse_with_the_editing_arguments(config_cls, method):
    default = config_cls()
    changed = config_cls(**{f: not v if isinstance(v, bool) else v * 2
                            for f, v in default.to_dict().items() if f != "method"})
    assert changed != default
    saved = changed.to_dict()
    assert saved["method"] == method
    assert MethodConfig.from_dict(saved) == changed
    assert MethodConfig.from_json_string(changed.to_json_string()) == changed
    flags = ["--method", method]
    for name, value in saved.items():
        if name != "method":
            flags += [f"--{name}", str(value)]
    args, parsed = HfArgumentParser((EditingArguments, config_cls)).parse_args_into_dataclasses(flags)
    assert args.method == method and parsed == changed
    _, from_dict = HfArgumentParser((EditingArguments, config_cls)).parse_dict(
        {k: str(v) for k, v in saved.items()})
    assert from_dict == changed  # parse_dict does no type conversion; the config coerces


def test_config_loading_is_forward_compatible_and_strict_about_the_method(caplog):
    assert MemitConfig.from_dict({"protect_previous_edits": True, "added_later": 1}) == \
        MemitConfig(protect_previous_edits=True)
    assert "added_later" in caplog.text
    with pytest.raises(ValueError, match="is for method 'alphaedit', not 'memit'"):
        MemitConfig.from_dict({"method": "alphaedit"})
    with pytest.raises(ValueError, match="no 'method' key"):
        MethodConfig.from_dict({"protect_previous_edits": True})
    with pytest.raises(ValueError, match="MemitConfig.protect_previous_edits='maybe'"):
        MemitConfig(protect_previous_edits="maybe")


def test_a_config_of_another_method_is_refused(corpus):
    with pytest.raises(TypeError, match="expects AlphaEditConfig, got MemitConfig"):
        AlphaEditModel(tiny_causal_lm("llama"), tiny_tokenizer(), _args(corpus), method_config=MemitConfig())


# -- use_projection ----------------------------------------------------------------------------------------------


def test_use_projection_defaults_and_refusals():
    assert EditingArguments(method="alphaedit").resolve(_spec()).use_projection is True
    assert EditingArguments(method="alphaedit", use_projection=True).resolve(_spec()).use_projection is True
    assert EditingArguments(method="memit").resolve(_spec()).use_projection is False
    assert EditingArguments(method="memit", use_projection="true").resolve(_spec()).use_projection is True
    with pytest.raises(ValueError, match="EditingArguments.use_projection=False: method 'alphaedit'.*MEMIT_seq"):
        EditingArguments(method="alphaedit", use_projection=False)
    saved = EditingArguments(method="memit", use_projection=True, prune=True).to_dict()
    assert (saved["use_projection"], saved["prune"]) == (True, True)


def _spec():
    from hf_alphaedit.architectures import resolve_model_spec

    return resolve_model_spec(tiny_causal_lm("llama"))


def test_memit_with_projection_changes_nothing_outside_the_null_space(corpus):
    deltas = {}
    for use_projection in (False, True):
        model = AlphaEditModel(_scaled_model(), tiny_tokenizer(),
                               _args(corpus, method="memit", use_projection=use_projection))
        model.edit(REQUESTS, batch_size=2)
        deltas[use_projection] = {layer: model.state.accumulated_delta(layer).double() for layer in (1, 2)}
    projector = model.projector
    for layer in (1, 2):
        assert 0 < projector.null_space_dim(layer) < model.spec.key_size, "the test needs a non-trivial null space"
        outside = torch.eye(model.spec.key_size, dtype=torch.float64) - projector.dense(layer)
        projected, plain = deltas[True][layer], deltas[False][layer]
        assert (projected @ outside).abs().max() < 1e-6 * projected.abs().max()  # ΔW (I − P) = 0
        # MEMIT's λ·C₀ term already steers it towards unused key directions, but not all the way.
        assert torch.linalg.matrix_norm(plain @ outside) > 1e-3 * torch.linalg.matrix_norm(plain)


def test_memit_seq_adds_previous_keys_and_equals_memit_without_them():
    generator = torch.Generator().manual_seed(0)
    corpus_keys = torch.randn(300, 12, generator=generator, dtype=torch.float64)
    statistics = KeyStatistics({0: corpus_keys.T @ corpus_keys}, {0: 300})
    keys = torch.randn(3, 12, generator=generator, dtype=torch.float64)
    residuals = torch.randn(3, 8, generator=generator, dtype=torch.float64)
    previous = torch.randn(4, 12, generator=generator, dtype=torch.float64)

    class Context:
        hparams = type("H", (), {"layers": (0,), "mom2_update_weight": 5.0})()
        model = torch.nn.Linear(1, 1)

        @staticmethod
        def statistics(layers):
            return statistics

    plain, sequential = Memit(Context()), Memit(Context(), MemitConfig(protect_previous_edits=True))
    torch.testing.assert_close(sequential.solve(0, keys, residuals), plain.solve(0, keys, residuals))  # C_p = 0
    for method in (plain, sequential):
        method.commit(BatchUpdate([LayerUpdate(0, residuals.T, keys, previous)]))
    torch.testing.assert_close(plain.solve(0, keys, residuals), Memit(Context()).solve(0, keys, residuals))
    delta = residuals.T @ sequential.solve(0, keys, residuals)
    system = 5.0 * statistics.second_moment(0) + previous.T @ previous + keys.T @ keys  # §5.3
    torch.testing.assert_close(delta @ system, residuals.T @ keys, rtol=1e-9, atol=1e-9)


def test_alphaedit_without_previous_edit_protection_keeps_no_gram(corpus):
    model = AlphaEditModel(_scaled_model(), tiny_tokenizer(), _args(corpus, layers=[2]),
                           method_config=AlphaEditConfig(protect_previous_edits=False))
    model.edit(REQUESTS[:1])
    assert torch.count_nonzero(model.method.previous_gram[2]) == 0


@pytest.mark.parametrize("family, num_layers, method, config, layers", [
    ("llama", 30, "alphaedit", None, (4, 5, 6, 7, 8)),   # SmolLM2-135M
    ("llama", 30, "rome", None, (5,)),
    ("llama", 32, "rome", None, (5,)),                   # Llama-3-8B's ROME file
    ("gpt2", 48, "rome", None, (17,)),                   # GPT-2 XL's
    ("gptj", 28, "rome", None, (5,)),                    # GPT-J's
    ("llama", 30, "ft", None, (0,)),                     # constrained FT (L∞ box): layer 0
    ("llama", 32, "ft", FTConfig(norm_constraint=None), (21,)),  # Llama-3-8B's unconstrained FT file
    ("llama", 30, "nse", None, (4, 5, 6, 7, 8)),
])
def test_methods_choose_their_default_layers_from_the_model(family, num_layers, method, config, layers):
    import dataclasses

    from hf_alphaedit.architectures import resolve_model_spec

    spec = dataclasses.replace(resolve_model_spec(tiny_causal_lm(family)), num_layers=num_layers)
    assert EditingArguments(method=method).resolve(spec, config).layers == layers
    assert EditingArguments(method=method, layers=[2, 3]).resolve(spec, config).layers == (2, 3)  # explicit wins
