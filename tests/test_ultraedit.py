"""UltraEdit: the applied updates and the lifelong normaliser against an independent copy of the reference code, the
normaliser rebuilt from saved records bit for bit, which matrices change, atomicity, settings and composition."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers.pytorch_utils import Conv1D

from hf_alphaedit import AlphaEditModel, EditingArguments, EditState, UltraEditConfig
from hf_alphaedit.architectures import resolve_model_spec
from hf_alphaedit.engine import copy_method_state
from hf_alphaedit.methods.ultraedit.method import fold, row_statistics, standardise
from tests.test_mend import assert_only_rewrite_updates_projected
from tests.tiny_models import tiny_causal_lm, tiny_tokenizer

REQUESTS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle", "target_new": "English language"},
    {"prompt": "{}, who plays the", "subject": "Miles Davis", "target_new": "piano"},
    {"prompt": "The capital of {} is", "subject": "Italy", "target_new": "Paris"},
    {"prompt": "{} is a musician who plays", "subject": "Yo-Yo Ma", "target_new": "the violin"},
    {"prompt": "The official language of {} is", "subject": "Brazil", "target_new": "French"},
]
MODULES = {  # two matrices of one shape (one shared normaliser) and one of another, rewrite module included
    "llama": ["model.layers.1.mlp.gate_proj", "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"],
    "gpt2": ["transformer.h.1.mlp.c_fc", "transformer.h.2.mlp.c_fc", "transformer.h.2.mlp.c_proj"],
}


def _editor(family: str = "llama", corpus_file: Path | None = None, arguments: dict | None = None,
            **settings) -> AlphaEditModel:
    """UltraEdit on a fresh tiny `family` model; `corpus_file` (conftest's) for the statistics of `use_projection`,
    `arguments` more `EditingArguments`, `settings` `UltraEditConfig` fields."""
    config = UltraEditConfig(**{"lr": 1e-3, "chunk_size": 2, "edit_modules": MODULES[family], **settings})
    statistics = {} if corpus_file is None else {
        "statistics_corpus": str(corpus_file), "statistics_samples": 60,
        "statistics_cache_dir": str(corpus_file.parent / "stats")}
    return AlphaEditModel(tiny_causal_lm(family), tiny_tokenizer(), EditingArguments(
        method="ultraedit", disable_tqdm=True, **statistics, **(arguments or {})), method_config=config)


def _normalizer(editor: AlphaEditModel) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in editor.method.normalizer.items()}


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a), [n for n in a if not torch.equal(a[n], b[n])]


# -- the reference, written out from XiaojieGu/UltraEdit (nets.py, util.py, data/, editor/) -------------------------


class ReferenceRunningMeanStd:
    """nets.RunningMeanStd."""

    def __init__(self, size: int) -> None:
        self.n, self.mean, self.var, self.std = torch.zeros(1), torch.zeros(size), torch.zeros(size), torch.zeros(size)

    def update(self, x: torch.Tensor) -> None:
        n = self.n + x.shape[0]
        delta = x.mean(0) - self.mean
        self.mean += x.shape[0] * delta / n
        self.var += x.shape[0] * x.var(0) + self.n * x.shape[0] * delta.pow(2) / n
        self.std = (self.var / (n - 1 + torch.finfo(x.dtype).eps)).sqrt()
        self.n = n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.std + torch.finfo(x.dtype).eps)


def _shape(module: nn.Module) -> tuple[int, int]:
    """util.get_shape: (d_in, d_out)."""
    shape = tuple(module.weight.shape)
    return shape[::-1] if isinstance(module, nn.Linear) else shape


def _pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """editor/ultraedit.pad_tensor along dim 0 with zeros."""
    if tensor.shape[0] >= length:
        return tensor[:length]
    return torch.cat([tensor, torch.zeros(length - tensor.shape[0], *tensor.shape[1:])])


class _Tracer:
    """util.Tracer: the module's input rows and output-gradient rows at `indices`."""

    def __init__(self, module: nn.Module, indices: tuple[torch.Tensor, ...]) -> None:
        def forward_hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            self.keys = inputs[0][indices].detach()

        def backward_hook(_module: nn.Module, _inputs_grad: tuple, outputs_grad: tuple) -> None:
            self.values_grad = outputs_grad[0][indices].detach()

        self.handles = [module.register_forward_hook(forward_hook), module.register_full_backward_hook(backward_hook)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class ReferenceUltraEdit:
    """editor/ultraedit.ULTRAEDIT on one model: `turn` is one step of `sequential_valid` (cache, predict, edit)."""

    def __init__(self, model: nn.Module, modules: list[str], lr: float, batch_size: int, editor_batch_size: int):
        self.model, self.modules, self.lr = model, modules, lr
        self.batch_size, self.editor_batch_size = batch_size, editor_batch_size
        for name in modules:
            model.get_submodule(name).weight.requires_grad_(True)
        self.normalizers = {}
        for name in modules:
            shape = _shape(model.get_submodule(name))
            self.normalizers.setdefault(shape, ReferenceRunningMeanStd(sum(shape)))

    def tuples(self, requests: list[dict[str, str]]) -> list[dict[str, torch.Tensor]]:
        """data/zsre.tok_tuples of each request, then data/base.collate_fn (longest first, chunks, right padding)."""
        tok, encoded = tiny_tokenizer(), []
        for request in requests:
            prompt = request["prompt"].replace("{}", request["subject"])
            tok_prompt = tok(prompt, return_tensors="pt")
            tok_answer = tok(" " + request["target_new"], return_tensors="pt", add_special_tokens=False)
            item = {key: torch.cat((tok_prompt[key], tok_answer[key][:, :-1]), -1)
                    for key in ("input_ids", "attention_mask")}
            item["labels"] = torch.cat((torch.full(tok_prompt["input_ids"].shape, -100)[:, 1:],
                                        tok_answer["input_ids"]), -1)
            encoded.append(item)
        encoded = sorted(encoded, key=lambda x: x["attention_mask"].sum().item(), reverse=True)
        return [{key: pad_sequence([t[key].squeeze(0) for t in encoded[i: i + self.batch_size]], batch_first=True,
                                   padding_value=-100 if key == "labels" else 0) for key in encoded[0]}
                for i in range(0, math.ceil(len(encoded) / self.batch_size) * self.batch_size, self.batch_size)]

    def turn(self, requests: list[dict[str, str]]) -> None:
        cached = {name: ([], []) for name in self.modules}
        for t in self.tuples(requests):  # cache(): util.TracerDict with token = ans, util.cross_entropy
            answers = torch.where(t["labels"] != -100)
            traced = {name: _Tracer(self.model.get_submodule(name), answers) for name in self.modules}
            logits = self.model(**t)["logits"]
            F.cross_entropy(logits[answers], t["labels"][answers]).backward()
            for name in self.modules:
                traced[name].remove()
                keys, grads = traced[name].keys.float(), traced[name].values_grad.float()
                self.normalizers[_shape(self.model.get_submodule(name))].update(torch.cat((keys, grads), -1))
                cached[name][0].append(keys)
                cached[name][1].append(grads)
        shifts = {}
        for name in self.modules:  # predict_param_shifts()
            shape = _shape(self.model.get_submodule(name))
            normalizer = self.normalizers[shape]
            hidden_states, values_grad = torch.cat(cached[name][0]), torch.cat(cached[name][1])
            v_feature = torch.empty((0, shape[1]))
            for start in range(0, hidden_states.shape[0], self.editor_batch_size):
                z = torch.cat((_pad(hidden_states[start: start + self.editor_batch_size], self.editor_batch_size),
                               _pad(values_grad[start: start + self.editor_batch_size], self.editor_batch_size)), -1)
                keys_hat, values_hat = normalizer(z).split([shape[0], shape[1]], -1)
                coeffs = - self.lr * (keys_hat * keys_hat).sum(-1).unsqueeze(-1)
                v_feature = torch.cat((v_feature, coeffs * values_hat))
            mat = hidden_states.T @ hidden_states + torch.eye(shape[0])
            shifts[name] = torch.linalg.solve(mat, hidden_states.T @ v_feature[:hidden_states.shape[0]])
        with torch.no_grad():  # base.edit_model(param_shifts, False)
            for name, shift in shifts.items():
                module = self.model.get_submodule(name)
                module.weight.data += shift.T if isinstance(module, nn.Linear) else shift
        self.model.zero_grad()


# -- tests ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_updates_and_normaliser_match_the_reference_over_sequential_batches(family):
    editor = _editor(family)
    reference = ReferenceUltraEdit(tiny_causal_lm(family), MODULES[family], lr=1e-3, batch_size=2,
                                   editor_batch_size=3)
    if family == "gpt2":
        assert all(isinstance(editor.model.get_submodule(name), Conv1D) for name in MODULES[family])
    for batch in (REQUESTS[:4], REQUESTS[4:]):  # the second batch starts from the first one's normaliser
        ours_before = {name: editor.model.get_submodule(name).weight.detach().clone() for name in MODULES[family]}
        reference_before = {name: reference.model.get_submodule(name).weight.detach().clone()
                            for name in MODULES[family]}
        editor.edit(batch, batch_size=len(batch))
        reference.turn(batch)
        for name in MODULES[family]:
            ours = editor.model.get_submodule(name).weight.detach() - ours_before[name]
            expected = reference.model.get_submodule(name).weight.detach() - reference_before[name]
            assert float(expected.abs().max()) > 0
            torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    for (d_in, d_out), normalizer in reference.normalizers.items():
        ours = {field: editor.method.normalizer[f"in{d_in}_out{d_out}.{field}"] for field in ("n", "mean", "var")}
        assert torch.equal(ours["n"], normalizer.n) and int(normalizer.n) > 0
        torch.testing.assert_close(ours["mean"], normalizer.mean, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours["var"], normalizer.var, rtol=1e-5, atol=1e-7)


def test_the_normaliser_rebuilt_from_saved_records_is_bit_identical(tmp_path):
    editor = _editor()
    editor.edit(REQUESTS[:4], batch_size=4)
    after_one = _normalizer(editor)
    editor.edit(REQUESTS[4:], batch_size=2)
    after_two, weights = _normalizer(editor), {k: v.clone() for k, v in editor.model.state_dict().items()}
    assert not torch.equal(after_one["in64_out128.n"], after_two["in64_out128.n"])
    editor.state.save(tmp_path / "state")
    fresh = _editor()
    fresh.engine.apply_batches(EditState.load(tmp_path / "state").batches)
    _assert_bitwise(_normalizer(fresh), after_two)
    _assert_bitwise(fresh.model.state_dict(), weights)
    editor.revert(1)
    _assert_bitwise(_normalizer(editor), after_one)
    first_only = _editor()
    first_only.edit(REQUESTS[:4], batch_size=4)
    _assert_bitwise(_normalizer(first_only), after_one)


def test_a_single_row_adds_no_spread_where_the_reference_would_turn_the_normaliser_nan():
    row = torch.randn(1, 5)
    count, mean, var = row_statistics(row)
    assert count == 1 and torch.equal(mean, row[0]) and torch.equal(var, torch.zeros(5))
    n, mean, var = fold((torch.zeros(1), torch.zeros(5), torch.zeros(5)), count, mean, var)
    assert torch.equal(standardise((n, mean, var), row), torch.zeros(1, 5))


def test_only_the_configured_matrices_change():
    modules = ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.gate_proj"]
    editor = _editor(edit_modules=modules)
    assert editor.hparams.layers == (1, 2) and editor.method.edited_modules == tuple(modules)
    before = {k: v.clone() for k, v in editor.model.state_dict().items()}
    editor.edit(REQUESTS[:2])
    changed = {k for k, v in editor.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{module}.weight" for module in modules}


def test_the_default_matrices_are_the_rewrite_modules_of_nine_blocks_ending_at_the_second_to_last():
    spec = resolve_model_spec(tiny_causal_lm("llama"))
    for num_layers, layers in [(4, (0, 1, 2)), (28, tuple(range(18, 27))), (32, tuple(range(22, 31))),
                               (62, tuple(range(52, 61))), (1, (0,))]:
        resized = dataclasses.replace(spec, num_layers=num_layers)
        assert EditingArguments(method="ultraedit").resolve(resized, None).layers == layers
    config = UltraEditConfig(edit_modules=["model.layers.3.mlp.up_proj", "model.layers.1.mlp.gate_proj"])
    assert EditingArguments(method="ultraedit").resolve(spec, config).layers == (1, 3)
    editor = AlphaEditModel(tiny_causal_lm("llama"), tiny_tokenizer(), EditingArguments(method="ultraedit"))
    assert [p.module for p in editor.method.params] == [f"model.layers.{i}.mlp.down_proj" for i in (0, 1, 2)]
    assert editor.method.edited_modules == () and editor.method.config.lr == 1e-6


def test_a_failing_batch_leaves_weights_and_normaliser_as_they_were(monkeypatch):
    editor = _editor()
    editor.edit(REQUESTS[:2])
    weights, state = {k: v.clone() for k, v in editor.model.state_dict().items()}, copy_method_state(editor.method)
    solve, calls = editor.method.solve, []

    def solve_then_fail(*args):
        if calls:  # the first matrix's update is already applied when the second solve fails
            raise RuntimeError("injected solve failure")
        calls.append(args)
        return solve(*args)

    monkeypatch.setattr(editor.method, "solve", solve_then_fail)
    with pytest.raises(RuntimeError, match="injected solve failure"):
        editor.edit(REQUESTS[2:4])
    _assert_bitwise(editor.model.state_dict(), weights)
    _assert_bitwise(copy_method_state(editor.method)["normalizer"], state["normalizer"])
    assert editor.state.num_edits == 2


def test_bad_settings_are_refused_naming_the_field():
    for lr in (0, -1e-6):
        with pytest.raises(ValueError, match=r"UltraEditConfig.lr=.*must be above 0"):
            UltraEditConfig(lr=lr)
    with pytest.raises(ValueError, match=r"UltraEditConfig.chunk_size=0: must be at least 1"):
        UltraEditConfig(chunk_size=0)
    with pytest.raises(ValueError, match=r"UltraEditConfig.edit_modules=\[\]: give a non-empty list"):
        UltraEditConfig(edit_modules=[])
    with pytest.raises(ValueError, match=r"UltraEditConfig.edit_modules: \['a.b'\] appear more than once"):
        UltraEditConfig(edit_modules=["a.b", "a.b"])
    with pytest.raises(ValueError, match=r"UltraEditConfig.edit_modules: module 'model.layers.1.mlp.nope' does "
                                         r"not exist .*e.g. \['model.layers.1.mlp.gate_proj'"):
        _ = _editor(edit_modules=["model.layers.1.mlp.nope"]).method
    with pytest.raises(ValueError, match=r"UltraEditConfig.edit_modules: module 'lm_head' is not inside any block"):
        _editor(edit_modules=["lm_head"])
    with pytest.raises(ValueError, match=r"UltraEditConfig.edit_modules: module 'model.layers.1.self_attn' is a "
                                         r"LlamaAttention, not an nn.Linear"):
        _ = _editor(edit_modules=["model.layers.1.self_attn"]).method
    mismatched = AlphaEditModel(tiny_causal_lm("llama"), tiny_tokenizer(), EditingArguments(
        method="ultraedit", layers=[1]), method_config=UltraEditConfig(edit_modules=["model.layers.2.mlp.up_proj"]))
    with pytest.raises(ValueError, match=r"EditingArguments.layers=\[1\], but UltraEditConfig.edit_modules lie in "
                                         r"blocks \[2\]; set layers=\[2\]"):
        _ = mismatched.method


def test_projection_constrains_the_rewrite_module_and_prune_restrains_every_matrix(corpus_file):
    plain = _editor()
    plain.edit(REQUESTS[:4])
    plain_updates = {(u.layer, u.module): u for u in plain.state.batches[0].layers}
    projected = _editor(corpus_file=corpus_file, arguments={
        "use_projection": True, "nullspace_threshold": 0.5, "nullspace_threshold_mode": "relative"})
    projected.edit(REQUESTS[:4])
    assert_only_rewrite_updates_projected(projected, plain_updates)
    pruned = _editor(arguments={"prune": True, "prune_alpha": "linear"}, lr=1e3)
    pruned.edit(REQUESTS[:4])
    restrained = {u.module for u in pruned.state.batches[0].layers if u.restraint_rank > 0}
    assert None in restrained and set(pruned.method.edited_modules) <= restrained
