"""PRUNE as a restraint on any method (ALGORITHMS.md §7, §15): the function, the factored SVD, and the restraint
wired into sequential editing ('end' and 'every_batch'), with undo and the edit state kept exact."""

from __future__ import annotations

import math

import pytest
import torch

from hf_alphaedit import AlphaEditModel, EditingArguments, EditState
from hf_alphaedit.architectures import resolve_model_spec
from hf_alphaedit.methods import LayerUpdate
from hf_alphaedit.methods.prune import PruneRestraint, factored_svd, restrain_singular_values
from tests.tiny_models import tiny_causal_lm, tiny_tokenizer

REQUESTS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle", "target_new": "English language"},
    {"prompt": "{}, who plays the", "subject": "Miles Davis", "target_new": "piano"},
]
ALPHAS = ["e", "2", "1.5", "1.2", "linear"]
LAYERS = [1, 2]


def _f(sigma: float, sigma_max: float, alpha: str) -> float:
    """PRUNE's F (§7.1), written plainly."""
    if sigma < sigma_max:
        return sigma
    if alpha == "linear":
        return sigma / 2 + sigma_max / 2
    return sigma_max + math.log(sigma / sigma_max) / math.log(math.e if alpha == "e" else float(alpha))


def _dense_restraint(delta: torch.Tensor, sigma_max: float, alpha: str) -> torch.Tensor:
    """`U diag(F(σ)) Vᵀ` of a dense `delta` (float64)."""
    u, sigma, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    restrained = torch.tensor([_f(s, sigma_max, alpha) for s in sigma.tolist()], dtype=torch.float64)
    return u @ torch.diag(restrained) @ vh


# -- the restraint function and the factored SVD -----------------------------------------------------------------


@pytest.mark.parametrize("alpha", ALPHAS)
def test_restraint_function_is_identity_below_sigma_max_continuous_and_increasing(alpha):
    sigma_max = 6.0  # ≥ 1/ln 1.2 ≈ 5.48, so every base shrinks (§7.1)
    sigma = torch.linspace(0.01, 60.0, 20001, dtype=torch.float64)
    restrained = restrain_singular_values(sigma, sigma_max, alpha)
    below = sigma < sigma_max
    assert torch.equal(restrained[below], sigma[below])
    assert (restrained.diff() > 0).all()
    at_and_above = restrain_singular_values(torch.tensor([sigma_max, sigma_max * (1 + 1e-12)], dtype=torch.float64),
                                            sigma_max, alpha)
    assert at_and_above[0] == sigma_max and abs(at_and_above[1] - sigma_max) < 1e-9
    above = ~below
    assert (restrained[above] <= sigma[above]).all()
    expected = torch.tensor([_f(s, sigma_max, alpha) for s in sigma[above].tolist()], dtype=torch.float64)
    torch.testing.assert_close(restrained[above], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("alpha", ["e", "1.2"])
def test_a_small_sigma_max_would_enlarge_and_is_refused_unless_clipped(alpha):
    floor = 1 / math.log(math.e if alpha == "e" else float(alpha))
    sigma_max = 0.5 * floor
    just_above = torch.tensor([sigma_max * 1.01], dtype=torch.float64)
    assert restrain_singular_values(just_above, sigma_max, alpha) > just_above  # the §7.1 caveat
    assert restrain_singular_values(just_above, sigma_max, alpha, clip=True) == just_above
    weight = {"m": sigma_max * torch.eye(4)}

    def restraint(weights, **kwargs):
        return PruneRestraint(weights, lambda module, delta: None, lambda update: "m", alpha, **kwargs)

    with pytest.raises(ValueError, match=f"prune_alpha='{alpha}'.*prune_clip=True"):
        restraint(weight)
    restraint(weight, clip=True)
    restraint({"m": floor * torch.eye(4)})  # exactly at the bound: allowed


@pytest.mark.parametrize(("d", "d_k", "rank"), [(16, 24, 5), (6, 9, 12)])
def test_factored_svd_equals_the_dense_svd(d, d_k, rank):
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(d, rank, generator=generator)
    right = torch.randn(rank, d_k, generator=generator)
    u, sigma, v = factored_svd(left, right)
    dense = left.double() @ right.double()
    torch.testing.assert_close(u @ torch.diag(sigma) @ v.T, dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sigma, torch.linalg.svdvals(dense)[: sigma.numel()], rtol=1e-12, atol=1e-12)
    eye = torch.eye(sigma.numel(), dtype=torch.float64)
    torch.testing.assert_close(u.T @ u, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(v.T @ v, eye, rtol=0, atol=1e-12)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_restraint_of_known_singular_values_sets_w0_plus_restrained_delta(alpha):
    """W = W₀ + U diag(F(σ)) Vᵀ, with the correction appended to the batch's factors (§15)."""
    generator = torch.Generator().manual_seed(1)
    d, d_k = 8, 12

    def orthonormal(rows: int, cols: int) -> torch.Tensor:
        return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))[0]

    original = 6.0 * orthonormal(d, d) @ orthonormal(d_k, d).T  # every singular value is 6 = σ_max
    u, v = orthonormal(d, 3), orthonormal(d_k, 3)
    sigma = torch.tensor([40.0, 9.0, 2.0], dtype=torch.float64)
    weight = original.clone()
    weight += u @ torch.diag(sigma) @ v.T  # the method applied ΔW = (U diag(σ)) Vᵀ

    def add_delta(module: str, delta: torch.Tensor) -> None:
        weight.add_(delta.double())

    update = LayerUpdate(0, (u * sigma).float(), v.T.float(), torch.zeros(2, d_k))
    restraint = PruneRestraint({"m": original}, add_delta, lambda update: "m", alpha)
    assert restraint.sigma_max["m"] == pytest.approx(6.0, rel=1e-6)
    (recorded,) = restraint.restrain([], [update])
    restrained = _dense_restraint(u @ torch.diag(sigma) @ v.T, 6.0, alpha)
    torch.testing.assert_close(weight - original, restrained, rtol=0, atol=5e-5)
    torch.testing.assert_close(recorded.delta.double(), restrained, rtol=0, atol=5e-5)
    assert recorded.restraint_rank == 2  # only 40 and 9 are ≥ σ_max
    assert torch.equal(recorded.keys, update.keys)
    top = torch.linalg.svdvals(weight - original)[0]
    assert top == pytest.approx(_f(40.0, 6.0, alpha), rel=1e-6)


# -- wired into editing ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("prune")
    lines = [line.strip() for line in open("/work/shared/data/wikitext-2/valid.txt", encoding="utf-8")
             if line.strip()][:60]
    (folder / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    return str(folder / "corpus.txt"), str(folder / "stats")


def _model() -> torch.nn.Module:
    """A tiny Llama whose edits are large relative to σ_max(W₀) ≈ 1.5 (≥ 1, so base e shrinks).

    Small keys (up projections × 0.003) make the closed-form updates large (ΔW ∝ 1/‖k‖); the edited down
    projections × 4 lift σ_max above 1/ln e = 1.
    """
    model = tiny_causal_lm("llama")
    with torch.no_grad():
        for block in model.model.layers:
            block.mlp.up_proj.weight.mul_(0.003)
            block.mlp.down_proj.weight.mul_(4.0)
    return model


def _editor(corpus, model: torch.nn.Module, **overrides) -> AlphaEditModel:
    corpus_file, cache = corpus
    values = {"method": "memit", "layers": LAYERS, "statistics_corpus": corpus_file, "statistics_samples": 60,
              "statistics_cache_dir": cache, "disable_tqdm": True, "v_num_grad_steps": 8, "v_lr": 0.5}
    values.update(overrides)
    return AlphaEditModel(model, tiny_tokenizer(), EditingArguments(**values))


def _weights(editor: AlphaEditModel) -> dict[int, torch.Tensor]:
    return {layer: editor.spec.weight(editor.model, layer).detach().double().clone() for layer in LAYERS}


@pytest.fixture(scope="module")
def unrestrained(corpus) -> dict[int, torch.Tensor]:
    """ΔW of each layer after the three requests in batches of two, without PRUNE."""
    editor = _editor(corpus, _model())
    before = _weights(editor)
    editor.edit(REQUESTS, batch_size=2)
    after = _weights(editor)
    return {layer: after[layer] - before[layer] for layer in LAYERS}


def test_end_restraint_equals_the_reference_post_hoc_restraint_without_double_add(corpus, unrestrained):
    alpha = "e"
    editor = _editor(corpus, _model(), prune=True, prune_alpha=alpha)
    original = _weights(editor)
    editor.edit(REQUESTS, batch_size=2)
    current = _weights(editor)
    for layer in LAYERS:
        sigma_max = editor.engine.restraint.sigma_max[editor.spec.rewrite_module_name(layer)]
        sigma = torch.linalg.svdvals(unrestrained[layer])
        assert sigma[0] > sigma_max > sigma[2], "the test needs singular values on both sides of σ_max"
        expected = _dense_restraint(unrestrained[layer], sigma_max, alpha)
        torch.testing.assert_close(current[layer] - original[layer], expected, rtol=0, atol=2e-4)
        # The edit state still describes the weights exactly: W = W₀ + Σ recorded factors.
        torch.testing.assert_close(editor.state.accumulated_delta(layer).double(), current[layer] - original[layer],
                                   rtol=0, atol=2e-6)
        restrained_top = torch.linalg.svdvals(current[layer] - original[layer])[0]
        assert restrained_top == pytest.approx(_f(float(sigma[0]), sigma_max, alpha), rel=1e-4)
        # The reference MEMIT_prune bug would leave W₀ + ΔW + ΔW'.
        double_added = unrestrained[layer] + expected
        assert (current[layer] - original[layer] - double_added).abs().max() > 0.1


def test_every_batch_restraint_is_what_the_next_batch_edits(corpus, unrestrained):
    editor = _editor(corpus, _model(), prune=True, prune_restrain_at="every_batch")
    original = _weights(editor)
    editor.edit(REQUESTS[:2])
    after_first = _weights(editor)
    sigma_max = {layer: editor.engine.restraint.sigma_max[editor.spec.rewrite_module_name(layer)]
                 for layer in LAYERS}
    fed_back = [u.layer for u in editor.state.batches[0].layers if u.restraint_rank]
    assert fed_back, "the test needs a restraint after the first batch"
    for layer, first in zip(LAYERS, editor.state.batches[0].layers, strict=True):
        n = first.keys.shape[0]  # the factors are [the method's update (n columns) | the restraint]
        assert first.left.shape[1] == n + first.restraint_rank
        method_part = first.left[:, :n] @ first.right[:n]
        torch.testing.assert_close(after_first[layer] - original[layer],
                                   _dense_restraint(method_part, sigma_max[layer], "e"), rtol=0, atol=1e-4)
    editor.edit(REQUESTS[2:])
    final = _weights(editor)
    for layer, second in zip(LAYERS, editor.state.batches[1].layers, strict=True):
        assert second.left.shape[1] == 1 + second.restraint_rank  # no lift in this mode
        method_part = second.left[:, :1].double() @ second.right[:1].double()
        expected = _dense_restraint(after_first[layer] - original[layer] + method_part, sigma_max[layer], "e")
        torch.testing.assert_close(final[layer] - original[layer], expected, rtol=0, atol=2e-4)
    for layer in fed_back:  # the restraint fed back: not what restraining the unrestrained run once gives
        end_mode = _dense_restraint(unrestrained[layer], sigma_max[layer], "e")
        assert (final[layer] - original[layer] - end_mode).abs().max() > 1e-2


def test_revert_and_saved_state_keep_the_restraint_exact(corpus, tmp_path):
    editor = _editor(corpus, _model(), prune=True)
    original = _weights(editor)
    editor.edit(REQUESTS[:2])
    after_first = _weights(editor)
    editor.edit(REQUESTS[2:])
    second = editor.state.batches[1].layers
    assert all(u.restraint_rank > 0 for u in second)
    # 'end' mode: the second batch lifted the first batch's restraint before it was computed.
    restrained_first = [u for u in editor.state.batches[0].layers if u.restraint_rank]
    assert restrained_first, "the test needs a restraint after the first batch"
    for previous in restrained_first:
        (update,) = [u for u in second if u.layer == previous.layer]
        lift = update.left[:, : previous.restraint_rank] @ update.right[: previous.restraint_rank]
        restraint = previous.left[:, -previous.restraint_rank:] @ previous.right[-previous.restraint_rank:]
        torch.testing.assert_close(lift, -restraint, rtol=0, atol=0)
    editor.state.save(tmp_path / "state")
    loaded = EditState.load(tmp_path / "state")
    assert [[u.restraint_rank for u in b.layers] for b in loaded.batches] == \
        [[u.restraint_rank for u in b.layers] for b in editor.state.batches]
    editor.revert(1)
    for layer in LAYERS:
        torch.testing.assert_close(_weights(editor)[layer], after_first[layer], rtol=0, atol=2e-6)
    editor.edit(REQUESTS[2:])  # lifts the first batch's restraint again, read from the record
    for layer in LAYERS:
        torch.testing.assert_close(editor.state.accumulated_delta(layer).double(),
                                   _weights(editor)[layer] - original[layer], rtol=0, atol=2e-6)


def test_alphaedit_with_prune_keeps_the_previous_edit_gram_of_the_method_keys(corpus):
    editor = _editor(corpus, _model(), method="alphaedit", prune=True, l2=1e-6)
    editor.edit(REQUESTS, batch_size=2)
    assert any(u.restraint_rank > 0 for b in editor.state.batches for u in b.layers), "PRUNE must trigger"
    for i, layer in enumerate(LAYERS):
        keys = torch.cat([b.layers[i].keys for b in editor.state.batches]).double()
        assert keys.shape[0] == len(REQUESTS)
        basis = editor.method.bases[layer]
        torch.testing.assert_close(editor.method.previous_gram[layer], basis.T @ keys.T @ keys @ basis)


def test_prune_with_the_projection_booster_stays_in_the_null_space(corpus):
    editor = _editor(corpus, _model(), prune=True, use_projection=True, nullspace_threshold_mode="energy",
                     nullspace_threshold=5e-2)
    editor.edit(REQUESTS, batch_size=2)
    assert any(u.restraint_rank for b in editor.state.batches for u in b.layers), "PRUNE must trigger"
    projector = editor.projector
    for layer in LAYERS:
        assert 0 < projector.null_space_dim(layer) < editor.spec.key_size
        delta = editor.state.accumulated_delta(layer).double()
        outside = delta - delta @ projector.dense(layer)
        assert outside.abs().max() < 1e-5 * delta.abs().max()


def test_prune_refuses_a_small_sigma_max_before_any_change(corpus):
    editor = _editor(corpus, tiny_causal_lm("llama"), prune=True)  # σ_max ≈ 0.4 < 1 = 1/ln e
    before = _weights(editor)
    for _ in range(2):  # the refused method is not kept half-built
        with pytest.raises(ValueError, match="prune_alpha='e'"):
            editor.edit(REQUESTS[:1])
    assert all(torch.equal(before[layer], _weights(editor)[layer]) for layer in LAYERS)


@pytest.mark.parametrize(("field", "value"), [("prune_alpha", "10"), ("prune_restrain_at", "last")])
def test_bad_prune_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"EditingArguments.{field}='{value}'"):
        EditingArguments(prune=True, **{field: value})


def test_prune_settings_parse_from_numbers_and_are_saved():
    args = EditingArguments.from_dict({"prune": "true", "prune_alpha": 1.5, "prune_restrain_at": "every_batch"})
    assert (args.prune, args.prune_alpha) == (True, "1.5")
    saved = args.to_dict()
    assert {k: saved[k] for k in ("prune", "prune_alpha", "prune_restrain_at", "prune_clip", "use_projection")} == \
        {"prune": True, "prune_alpha": "1.5", "prune_restrain_at": "every_batch", "prune_clip": False,
         "use_projection": None}


@pytest.mark.slow
def test_smollm2_edited_layers_are_large_enough_for_every_log_base(smollm2):
    """§7.1: F(σ) ≤ σ needs σ_max ≥ 1/ln α (5.48 for α = 1.2); real edited matrices satisfy it."""
    model, _ = smollm2
    spec = resolve_model_spec(model)
    layers = EditingArguments().resolve(spec).layers
    restraint = PruneRestraint({layer: spec.weight(model, layer) for layer in layers}, lambda layer, delta: None,
                               "1.2")
    assert min(restraint.sigma_max.values()) >= 1 / math.log(1.2)
