"""NAS, norm-anchor scaling of the targets (arXiv 2602.02543), on tiny random models: the rescaling against an
independent computation, the anchor on the original weights, its effect on an edit, its disk cache, bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_alphaedit import AlphaEditModel, EditingArguments
from hf_alphaedit.methods.nas import NormAnchor, NormAnchorScaling
from hf_alphaedit.methods.targets import TargetOptimizer, TargetResult
from hf_alphaedit.requests import EditRequest, as_edit_requests
from tests.tiny_models import tiny_causal_lm, tiny_tokenizer

REQUESTS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle", "target_new": "English language"},
    {"prompt": "{}, who plays the", "subject": "Miles Davis", "target_new": "piano"},
]
LAYERS = [1, 2]
Z_LAYER = LAYERS[-1]
ANCHOR_SAMPLES = 20  # the smallest count of which the trimmed mean leaves one norm out


@pytest.fixture(scope="module")
def records_file(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """The first `ANCHOR_SAMPLES` CounterFact training records (flat format) in a file of their own."""
    records = json.loads((shared_data / "counterfact" / "counterfact-train.json").read_text(encoding="utf-8"))
    path = tmp_path_factory.mktemp("nas_records") / "counterfact-train-head.json"
    path.write_text(json.dumps(records[:ANCHOR_SAMPLES]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A statistics cache shared by the module's editors (the key statistics of the tiny Llama, collected once)."""
    return tmp_path_factory.mktemp("nas_cache")


def _editor(corpus_file: Path, cache: Path, records: Path | None, **overrides) -> AlphaEditModel:
    values = {"method": "memit", "layers": LAYERS, "statistics_corpus": str(corpus_file), "statistics_samples": 60,
              "statistics_cache_dir": str(cache), "disable_tqdm": True, "v_num_grad_steps": 8, "v_lr": 0.5,
              "norm_anchor_records": None if records is None else str(records),
              "norm_anchor_samples": ANCHOR_SAMPLES}
    values.update(overrides)
    return AlphaEditModel(tiny_causal_lm("llama"), tiny_tokenizer(), EditingArguments(**values))


def _lookup(tokenizer, request: EditRequest) -> tuple[list[int], int]:
    """Token ids of the bare prompt and its last subject token (ALGORITHMS.md §3.3, `subject_last`)."""
    prefix, _ = request.split_prompt()
    ids = tokenizer(request.prompt_with_subject)["input_ids"]
    subject_ids = tokenizer(prefix + request.subject)["input_ids"]
    assert ids[:len(subject_ids)] == subject_ids
    return ids, len(subject_ids) - 1


def _mlp_outputs(model: torch.nn.Module, tokenizer, requests: list[EditRequest]) -> torch.Tensor:
    """`v0` `[n, d]`: the output of layer `Z_LAYER`'s down projection at the lookup token, one full forward each."""
    captured: list[torch.Tensor] = []
    handle = model.model.layers[Z_LAYER].mlp.down_proj.register_forward_hook(
        lambda _m, _a, out: captured.append(out.detach()))
    rows = []
    try:
        for request in requests:
            ids, lookup = _lookup(tokenizer, request)
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]))
            rows.append(captured[-1][0, lookup].double())
    finally:
        handle.remove()
    return torch.stack(rows)


def _expected(targets: TargetResult, v0: torch.Tensor, anchor: float) -> torch.Tensor:
    """The NAS targets `[n, d]` of the paper's formula, row by row."""
    rows = []
    for z, h_init, v in zip(targets.values.double(), targets.initial_hidden.double(), v0, strict=True):
        v_star = v + (z - h_init)
        v_star = v if v_star.norm() > 2 * anchor else anchor * v_star / v_star.norm()
        rows.append(h_init - v + v_star)
    return torch.stack(rows)


def _optimize(editor: AlphaEditModel, requests: list[EditRequest]) -> TargetResult:
    return TargetOptimizer(editor.model, editor.tokenizer, editor.spec, editor.hparams,
                           editor.state.context_templates).optimize(requests)


def _parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_rescaled_targets_equal_the_formula_in_both_branches(corpus_file, cache_dir, records_file):
    editor = _editor(corpus_file, cache_dir, records_file, norm_anchor=True)
    scaling = editor.method.context.rescale_targets
    assert isinstance(scaling, NormAnchorScaling)
    requests = as_edit_requests(REQUESTS)
    targets = _optimize(editor, requests)
    v0 = _mlp_outputs(editor.model, editor.tokenizer, requests)
    norms = (v0 + targets.values.double() - targets.initial_hidden.double()).norm(dim=1)
    low, high = float(norms.min()), float(norms.max())
    assert high > 1.05 * low
    # Every v* rescaled; every δ dropped; the longest dropped and the others rescaled.
    for anchor, dropped in ((high, []), (0.49 * low, [0, 1, 2]), (0.5 * (low + high) / 2, None)):
        scaling.anchor = NormAnchor(anchor, Z_LAYER, (anchor,), 0)
        result = scaling(requests, targets)
        expected = _expected(targets, v0, anchor)
        torch.testing.assert_close(result.values.double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result.initial_hidden, targets.initial_hidden, rtol=0, atol=0)
        was_dropped = (result.values.double() - targets.initial_hidden.double()).norm(dim=1) < 1e-5
        if dropped is not None:
            assert was_dropped.nonzero().flatten().tolist() == dropped
        else:
            assert was_dropped[int(norms.argmax())] and not was_dropped.all()
    # The wiring: LocateThenEditMethod.optimize_targets returns the rescaled targets.
    scaling.anchor = NormAnchor(high, Z_LAYER, (high,), 0)
    torch.testing.assert_close(editor.method.optimize_targets(requests).values.double(),
                               _expected(targets, v0, high), rtol=1e-5, atol=1e-5)


def test_the_anchor_is_the_trimmed_mean_on_the_original_weights_after_edits(corpus_file, tmp_path, records_file):
    editor = _editor(corpus_file, tmp_path, records_file)
    original = tiny_causal_lm("llama")
    editor.edit(REQUESTS, batch_size=3)
    edited = _parameters(editor.model)
    assert not torch.equal(edited[f"model.layers.{Z_LAYER}.mlp.down_proj.weight"],
                           original.model.layers[Z_LAYER].mlp.down_proj.weight)
    anchor = editor.provider.norm_anchor()
    after = _parameters(editor.model)
    assert all(torch.equal(after[name], edited[name]) for name in edited)
    # Independently, on a fresh copy of the original model.
    requests = as_edit_requests(json.loads(records_file.read_text(encoding="utf-8")), batch_size=1)
    targets = TargetOptimizer(original, editor.tokenizer, editor.spec, editor.hparams,
                              editor.state.context_templates).optimize(requests)
    v0 = _mlp_outputs(original, editor.tokenizer, requests)
    norms = (v0 + targets.values.double() - targets.initial_hidden.double()).norm(dim=1)
    kept = norms.sort().values[:-1]  # floor(0.05 · 20) = 1 dropped
    assert (anchor.layer, anchor.dropped, len(anchor.norms)) == (Z_LAYER, 1, ANCHOR_SAMPLES)
    torch.testing.assert_close(torch.tensor(anchor.norms, dtype=torch.float64), norms, rtol=1e-5, atol=1e-6)
    assert anchor.value == pytest.approx(float(kept.mean()), rel=1e-5)
    assert anchor.value < anchor.raw_mean
    # The edited weights give other norms, so the check above tells the two apart.
    on_edited = _mlp_outputs(editor.model, editor.tokenizer, requests)
    assert not torch.allclose(on_edited, v0, rtol=1e-3, atol=1e-4)


def test_the_anchor_of_a_new_editor_is_optimised_on_the_fast_path(corpus_file, tmp_path, records_file, monkeypatch):
    """A NAS method is built before its first edit chooses the forward mode; the anchor's target optimisation
    chooses it then (`prefix_cache` for a Llama) instead of running the whole model at every step."""
    modes: list[str] = []
    init = TargetOptimizer.__init__

    def recording(self: TargetOptimizer, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        modes.append(self.mode)

    monkeypatch.setattr(TargetOptimizer, "__init__", recording)
    editor = _editor(corpus_file, tmp_path, records_file)
    assert editor.forward_mode is None
    anchor = editor.provider.norm_anchor()
    # choose_forward_mode's probes (full, then prefix_cache, which matches), then the anchor's optimisation.
    assert modes == ["full", "prefix_cache", "prefix_cache"]
    assert editor.forward_mode == "prefix_cache"
    editor.edit(REQUESTS[:1], batch_size=1)
    assert modes[3:] == ["prefix_cache"] and editor.forward_mode == "prefix_cache"
    assert len(anchor.norms) == ANCHOR_SAMPLES


@pytest.mark.parametrize("method", ["alphaedit", "memit", "nse"])
def test_an_edit_with_nas_pins_the_mlp_part_of_every_target_to_the_anchor(corpus_file, cache_dir, records_file,
                                                                          method):
    overrides = {"nullspace_threshold": 0.5, "nullspace_threshold_mode": "relative"} if method == "alphaedit" else {}
    with_nas = _editor(corpus_file, cache_dir, records_file, method=method, norm_anchor=True, **overrides)
    without = _editor(corpus_file, cache_dir, None, method=method, **overrides)
    requests = as_edit_requests(REQUESTS)
    v0 = _mlp_outputs(with_nas.model, with_nas.tokenizer, requests)
    scaling = with_nas.method.context.rescale_targets
    used: list[TargetResult] = []

    def recording(batch: list[EditRequest], targets: TargetResult) -> TargetResult:
        used.append(scaling(batch, targets))
        return used[-1]

    with_nas.method.context.rescale_targets = recording
    original = {layer: without.spec.weight(without.model, layer).detach().clone() for layer in LAYERS}
    with_nas.edit(requests, batch_size=3)
    without.edit(requests, batch_size=3)
    (targets,) = used
    mlp_part = targets.values.double() - targets.initial_hidden.double() + v0
    anchor = scaling.anchor.value
    assert anchor > 0
    torch.testing.assert_close(mlp_part.norm(dim=1), torch.full((3,), anchor, dtype=torch.float64), rtol=1e-5,
                               atol=0)
    # The rescaled targets give another update: by 4% of it for AlphaEdit here, whose targets at clamp 0.5 all lie
    # within 6% of the anchor; by 47% for MEMIT and NSE.
    for layer in LAYERS:
        update = without.spec.weight(without.model, layer).detach() - original[layer]
        changed = (with_nas.spec.weight(with_nas.model, layer) - without.spec.weight(without.model, layer)).detach()
        assert float(changed.norm()) > 0.01 * float(update.norm()) > 0


def test_the_anchor_is_cached_on_disk_keyed_by_the_records(corpus_file, tmp_path, records_file, monkeypatch):
    first = _editor(corpus_file, tmp_path, records_file, norm_anchor=True)
    anchor = first.method.context.rescale_targets.anchor
    files = sorted(tmp_path.glob("*norm-anchor*.json"))
    assert len(files) == 1
    assert NormAnchor.from_dict(json.loads(files[0].read_text(encoding="utf-8"))) == anchor

    optimised: list[int] = []
    optimize = TargetOptimizer.optimize

    def counting(self: TargetOptimizer, requests: list[EditRequest]) -> TargetResult:
        optimised.append(len(requests))
        return optimize(self, requests)

    monkeypatch.setattr(TargetOptimizer, "optimize", counting)
    second = _editor(corpus_file, tmp_path, records_file, norm_anchor=True)
    assert second.method.context.rescale_targets.anchor == anchor
    assert optimised == []

    records = json.loads(records_file.read_text(encoding="utf-8"))
    records[0]["target_new"] = "violin"
    other_file = tmp_path / "other-records.json"
    other_file.write_text(json.dumps(records), encoding="utf-8")
    other = _editor(corpus_file, tmp_path, other_file, norm_anchor=True).provider.norm_anchor()
    assert optimised == [ANCHOR_SAMPLES]
    assert len(list(tmp_path.glob("*norm-anchor*.json"))) == 2
    assert other.norms[1:] == pytest.approx(anchor.norms[1:], rel=1e-5)


@pytest.mark.parametrize("method", ["rome", "ft", "mend"])
def test_nas_is_refused_by_methods_with_their_own_targets(method):
    with pytest.raises(ValueError, match=f"norm_anchor=True: method '{method}' has its own target procedure"):
        EditingArguments(method=method, norm_anchor=True, norm_anchor_records="records.json")


def test_bad_nas_settings_name_the_field():
    with pytest.raises(ValueError, match="norm_anchor=True needs norm_anchor_records"):
        EditingArguments(norm_anchor=True)
    with pytest.raises(ValueError, match="norm_anchor_samples=0: must be at least 1"):
        EditingArguments(norm_anchor=True, norm_anchor_records="records.json", norm_anchor_samples=0)


def test_published_nas_settings_without_their_records_turn_nas_off(tmp_path):
    records = tmp_path / "records.json"
    records.write_text("[]", encoding="utf-8")
    args = EditingArguments.from_published({"norm_anchor": True, "norm_anchor_records": str(records)})
    assert (args.norm_anchor, args.norm_anchor_records) == (False, None)
