"""BetaEdit (`methods/betaedit`): every batch's update equals the reference's dense solve, projector refresh included;
with no leakage penalty and no refresh it is AlphaEdit bit for bit; its refreshed state survives revert and resume."""

from __future__ import annotations

import pytest
import torch

from hf_alphaedit import AlphaEditModel, BetaEditConfig, EditingArguments
from hf_alphaedit.checkpointing import load_checkpoint, restore_checkpoint, save_checkpoint
from hf_alphaedit.engine import copy_method_state
from tests.test_ultraedit import REQUESTS  # six requests, so three batches of two
from tests.tiny_models import tiny_causal_lm_with_large_activations, tiny_tokenizer

LAYERS = [1, 2]


def _editor(corpus_file, method: str = "betaedit", config=None, **overrides) -> AlphaEditModel:
    args = EditingArguments(method=method, layers=LAYERS, statistics_corpus=str(corpus_file), statistics_samples=60,
                            statistics_cache_dir=str(corpus_file.parent / "stats"), disable_tqdm=True,
                            v_num_grad_steps=6, v_lr=0.5, projection="compute", **overrides)
    return AlphaEditModel(tiny_causal_lm_with_large_activations(), tiny_tokenizer(), args, method_config=config)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _null_space_projector(second_moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """The reference's `get_project` / `_update_P`: `U[:, S < threshold] U[:, S < threshold]ᵀ` from an SVD."""
    u, s, _ = torch.linalg.svd(second_moment, full_matrices=False)
    small = u[:, s < threshold]
    return small @ small.T


def test_every_update_equals_the_reference_dense_solve_with_the_projector_refreshed(corpus_file):
    """A transcription of the reference's `batch_edit` and `ProjectionUpdater` on the keys and residuals the run
    recorded: `(P (K Kᵀ + C_p + λ₁ C₀) + λ₂ I) X = P K Rᵀ`, `ΔW = Xᵀ`, `C_p += K Kᵀ` after each layer, and `P`
    rebuilt from `(C_p / N + λ₁ C₀) / (λ₁ + 1)` before a batch once `N − N_last ≥ τ`. λ₁ = 1 (not 3000) gives the
    edit keys enough weight to move the refreshed null space, so the refresh is seen."""
    penalty, every = 1.0, 3
    editor = _editor(corpus_file, config=BetaEditConfig(leakage_penalty=penalty, projector_refresh_every=every))
    for start in range(0, 6, 2):  # three batches of two: a refresh before the third (N = 4 ≥ 3), none before
        editor.edit(REQUESTS[start:start + 2])
    statistics = editor.key_statistics(LAYERS)
    hp = editor.hparams
    assert hp.nullspace_threshold_mode == "absolute"
    for index, layer in enumerate(LAYERS):
        c0 = statistics.second_moment(layer).double()
        d_k = c0.shape[0]
        projector = _null_space_projector(c0, hp.nullspace_threshold)
        initial = projector
        cache, count, last = torch.zeros(d_k, d_k, dtype=torch.float64), 0, 0
        for record in editor.state.batches:
            if count - last >= every:
                projector = _null_space_projector((cache / count + penalty * c0) / (penalty + 1),
                                                  hp.nullspace_threshold)
                last = count
            update = record.layers[index]
            assert update.layer == layer
            keys = update.keys.double().T  # [d_k, n]
            residuals = update.left.double()  # [d, n]
            system = projector @ (keys @ keys.T + cache + penalty * c0) + hp.l2 * torch.eye(d_k, dtype=torch.float64)
            reference = torch.linalg.solve(system, projector @ keys @ residuals.T).T
            applied = update.left.double() @ update.right.double()
            torch.testing.assert_close(applied, reference, rtol=2e-5, atol=1e-6 * float(reference.abs().max()))
            cache = cache + keys @ keys.T
            count += keys.shape[1]
        refreshed_rank, initial_rank = int(torch.trace(projector).round()), int(torch.trace(initial).round())
        # The refresh moved the null space (with λ₁ = 1 the mixture halves C₀, and the edit keys take directions).
        assert 0 < refreshed_rank < d_k and refreshed_rank != initial_rank
        assert editor.method.bases[layer].shape[1] == refreshed_rank


def test_without_penalty_or_refresh_it_is_alphaedit_bit_for_bit(corpus_file):
    alphaedit = _editor(corpus_file, method="alphaedit")
    betaedit = _editor(corpus_file, config=BetaEditConfig(leakage_penalty=0.0, projector_refresh_every=None))
    for editor in (alphaedit, betaedit):
        editor.edit(REQUESTS[:2])
        editor.edit(REQUESTS[2:4])
    assert all(torch.equal(a, b) for a, b in zip(_weights(alphaedit.model).values(),
                                                  _weights(betaedit.model).values(), strict=True))
    penalised = _editor(corpus_file)  # the reference's λ₁ = 3000 changes the updates
    penalised.edit(REQUESTS[:2])
    first = alphaedit.state.batches[0].layers[0]
    assert not torch.allclose(penalised.state.batches[0].layers[0].right, first.right, rtol=1e-3)


def test_the_refreshed_state_survives_revert_and_resume(corpus_file, tmp_path):
    config = BetaEditConfig(leakage_penalty=1.0, projector_refresh_every=3)
    uninterrupted = _editor(corpus_file, config=config)
    uninterrupted.edit(REQUESTS[:2])
    uninterrupted.edit(REQUESTS[2:4])  # the refresh happens when this batch is committed
    saved = save_checkpoint(uninterrupted, tmp_path, {"method": "betaedit"})
    state_after_two = copy_method_state(uninterrupted.method)
    uninterrupted.edit(REQUESTS[4:])
    resumed = _editor(corpus_file, config=config)
    restore_checkpoint(resumed, load_checkpoint(saved))
    resumed.edit(REQUESTS[4:])
    assert all(torch.equal(a, b) for a, b in zip(_weights(uninterrupted.model).values(),
                                                  _weights(resumed.model).values(), strict=True))
    uninterrupted.revert(1)
    state = copy_method_state(uninterrupted.method)
    assert set(state) == {"previous_gram", "leakage_gram", "bases", "edit_second_moment", "edit_counts"}
    for name, tensors in state.items():
        for layer, tensor in tensors.items():
            assert torch.equal(tensor, state_after_two[name][layer]), (name, layer)
    assert [int(c) for c in state["edit_counts"][1]] == [4, 4]


@pytest.mark.parametrize(("settings", "message"), [
    ({"leakage_penalty": -1.0}, "BetaEditConfig.leakage_penalty"),
    ({"projector_refresh_every": 0}, "BetaEditConfig.projector_refresh_every"),
])
def test_bad_settings_name_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        BetaEditConfig(**settings)
