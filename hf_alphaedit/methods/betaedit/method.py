from __future__ import annotations

import logging

import torch

from ...projection import NullSpaceProjector, null_space_mask
from ...updates import BatchUpdate
from ..alphaedit.method import AlphaEdit
from ..base import EditContext
from .config import BetaEditConfig

logger = logging.getLogger(__name__)


class BetaEdit(AlphaEdit):
    """BetaEdit (Liu, Liu and Li, IJCAI 2026, arXiv 2605.09285; reference `algs/betaedit/betaedit_main.py` of
    github.com/lbq8942/BetaEdit) in AlphaEdit's exact reduced form.

    Leakage penalty: the reference solves `(P (K Kᵀ + C_p + λ₁ C₀) + λ₂ I) X = P K Rᵀ` and adds `ΔW = Xᵀ`. The
    solution lies in the range of `P = Û Ûᵀ` (the part orthogonal to it solves `λ₂ x = 0`), so with `X = Û Y` it is
    `Y = (Ûᵀ (C_p + λ₁ C₀) Û + ÛᵀK KᵀÛ + λ₂ I)⁻¹ ÛᵀK Rᵀ`: AlphaEdit's `r × r` Cholesky solve with
    `λ₁ Ûᵀ C₀ Û` (`leakage_gram`) added. `C₀` is the mean second moment of the preserved keys (the statistics the
    projector was built from); its eigenvalues inside the null space are below the threshold but not zero, so
    without the term an update may still move preserved keys' outputs (the reference's "knowledge leakage").

    Projector refresh: once `τ` edits have been committed since the last refresh (the reference checks before each
    batch, with the keys of every batch so far, which is what `commit` sees after the previous one), the null space
    is rebuilt from the eigenvectors of `(C_p / N + λ₁ C₀) / (λ₁ + 1)` below the run's threshold, `C_p` `[d_k, d_k]`
    the sum of the `N` edit keys' outer products, and `Ûᵀ C_p Û` and `λ₁ Ûᵀ C₀ Û` are formed again in the new basis.
    Everything follows from the committed batches' keys, so undo and resume rebuild it exactly. The telemetry's
    null-space room stays measured in the projector of the key statistics (a refresh is logged with how far its null
    space moved from it).

    Everything else is AlphaEdit's, `preset="auto"`'s clamp 0.5 included (the reference's files set BetaEdit's target
    optimisation as AlphaEdit's). Not taken over: the reference's script stops the whole run once an update's
    `‖ΔW‖_F / √n` exceeds 20; here `EditingArguments.collapse_guard` refuses a batch by the weights' norm growth.
    """

    title = "BetaEdit"
    paper = ('Liu, Liu and Li, "BetaEdit: Null-Space Constrained Sequential Model Editing", '
             'IJCAI 2026, arXiv:2605.09285')

    def __init__(self, context: EditContext, config: BetaEditConfig | None = None,
                 projector: NullSpaceProjector | None = None) -> None:
        super().__init__(context, config if config is not None else BetaEditConfig(), projector)
        device = next(iter(self.bases.values())).device
        statistics = context.statistics(context.hparams.layers)
        second_moments = {layer: statistics.second_moment(layer).to(device, torch.float64) for layer in self.bases}
        self.leakage_gram = {layer: self._leakage_gram(basis, second_moments[layer])
                             for layer, basis in self.bases.items()}
        self.initial_bases = dict(self.bases)
        if self.config.projector_refresh_every is not None:  # only a refresh reads C₀ again
            self.preserved_second_moment = second_moments
            self.edit_second_moment = {layer: torch.zeros_like(c0) for layer, c0 in second_moments.items()}
            # [edits committed, edits committed at the last refresh] per layer
            self.edit_counts = {layer: torch.zeros(2, dtype=torch.long) for layer in self.bases}

    @property
    def sequential_state(self) -> tuple[str, ...]:
        if self.config.projector_refresh_every is None:
            return super().sequential_state
        return ("previous_gram", "leakage_gram", "bases", "edit_second_moment", "edit_counts")

    def _leakage_gram(self, basis: torch.Tensor, preserved_second_moment: torch.Tensor) -> torch.Tensor:
        """`λ₁ Ûᵀ C₀ Û` `[r, r]` for the basis `Û` `[d_k, r]` and `C₀` `[d_k, d_k]`."""
        return self.config.leakage_penalty * (basis.T @ preserved_second_moment @ basis)

    def batch_independent_gram(self, layer: int) -> torch.Tensor:
        return self.previous_gram[layer] + self.leakage_gram[layer]

    def commit(self, update: BatchUpdate) -> None:
        super().commit(update)
        refresh_every = self.config.projector_refresh_every
        if refresh_every is None:
            return
        for layer_update in update.layers:
            layer = layer_update.layer
            keys = layer_update.keys.to(self.edit_second_moment[layer])  # [n, d_k]
            self.edit_second_moment[layer] = self.edit_second_moment[layer] + keys.T @ keys
            counts = self.edit_counts[layer].clone()
            counts[0] += keys.shape[0]
            self.edit_counts[layer] = counts
            if counts[0] - counts[1] >= refresh_every:
                self._refresh(layer)

    def _refresh(self, layer: int) -> None:
        """Rebuild `layer`'s null space from the preserved and the edit keys (see the class docstring)."""
        hp, penalty = self.context.hparams, self.config.leakage_penalty
        edits = int(self.edit_counts[layer][0])
        edit_moment = self.edit_second_moment[layer]
        protected = (edit_moment / edits + penalty * self.preserved_second_moment[layer]) / (penalty + 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(protected)
        basis = eigenvectors[:, null_space_mask(eigenvalues, hp.nullspace_threshold, hp.nullspace_threshold_mode)]
        self.bases[layer] = basis.contiguous()
        self.leakage_gram[layer] = self._leakage_gram(basis, self.preserved_second_moment[layer])
        self.previous_gram[layer] = (basis.T @ edit_moment @ basis if self.config.protect_previous_edits
                                     else basis.new_zeros(basis.shape[1], basis.shape[1]))
        self.edit_counts[layer] = torch.tensor([edits, edits])
        initial = self.initial_bases[layer]
        kept = int((torch.linalg.svdvals(initial.T @ basis) > 0.99).sum()) if basis.shape[1] and initial.shape[1] else 0
        logger.info("BetaEdit: layer %d's projector refreshed after %d edits: %d null-space directions (%d from the "
                    "key statistics, %d of them kept)", layer, edits, basis.shape[1], initial.shape[1], kept)
