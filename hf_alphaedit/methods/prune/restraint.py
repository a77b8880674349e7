"""PRUNE (ALGORITHMS.md §7): restrain the large singular values of each edited matrix's accumulated perturbation.

The perturbation is never formed densely: it is the sum of the recorded low-rank factors of every batch, so its
SVD comes from a QR decomposition of the stacked factors and the SVD of a small core, and the restraint itself is
recorded as one more pair of factors. Publishing and undo, which work on the factors, keep working.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

import torch

from ...updates import LayerUpdate

PRUNE_PAPER = 'Ma et al., "Perturbation-Restrained Sequential Model Editing", ICLR 2025, arXiv:2405.16821'

PruneAlpha = Literal["e", "2", "1.5", "1.2", "linear"]
RestrainAt = Literal["end", "every_batch"]
LOG_BASES: dict[str, float] = {"e": math.e, "2": 2.0, "1.5": 1.5, "1.2": 1.2}

Factors = tuple[torch.Tensor, torch.Tensor]  # (left [d, m], right [m, d_k]): ΔW = left @ right


def restrain_singular_values(sigma: torch.Tensor, sigma_max: float, alpha: PruneAlpha = "e",
                             clip: bool = False) -> torch.Tensor:
    """PRUNE's `F` (§7.1) applied to singular values `sigma` `[q]`.

    The identity below `sigma_max`; from `sigma_max` on, `σ_max + ln(σ/σ_max)/ln α` (or `σ/2 + σ_max/2` for
    `"linear"`). `F(σ_max) = σ_max`, so the reference's `≥` and the AlphaEdit repository's `>` agree. With `clip`,
    `min(F(σ), σ)`: the log function exceeds `σ` just above `σ_max` when `σ_max < 1/ln α`.
    """
    if alpha == "linear":
        restrained = 0.5 * sigma + 0.5 * sigma_max
    else:
        restrained = sigma_max + torch.log(sigma / sigma_max) / math.log(LOG_BASES[alpha])
    restrained = torch.where(sigma >= sigma_max, restrained, sigma)
    return torch.minimum(restrained, sigma) if clip else restrained


def factored_svd(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD `U diag(S) Vᵀ` of `left @ right` without forming it (float64).

    `left` `[d, K]`, `right` `[K, d_k]` → `U` `[d, q]`, `S` `[q]` (descending), `V` `[d_k, q]`, `q = min(d, d_k, K)`:
    `left = Q_l R_l`, `rightᵀ = Q_r R_r`, and the SVD of the core `R_l R_rᵀ` rotates the two orthonormal bases.
    """
    left_basis, left_core = torch.linalg.qr(left.double())
    right_basis, right_core = torch.linalg.qr(right.double().T)
    core_u, singular_values, core_vh = torch.linalg.svd(left_core @ right_core.T, full_matrices=False)
    return left_basis @ core_u, singular_values, right_basis @ core_vh.T


class PruneRestraint:
    """PRUNE as a restraint on top of any method, applied after every batch (§7, "Our plugin").

    After a batch, the accumulated perturbation of each edited layer, `ΔW = Σ left @ right` over everything
    recorded so far, is decomposed as `U diag(σ) Vᵀ`, and the correction `U diag(F(σ) − σ) Vᵀ` (only the
    components with `σ ≥ σ_max`, the largest singular value of the original weight) is added to the weight and
    appended to the batch's factors (`LayerUpdate.restraint_rank` counts its columns). The weight is then
    `W₀ + ΔW'` with `ΔW' = U diag(F(σ)) Vᵀ`, not `W₀ + ΔW + ΔW'` (the reference `MEMIT_prune` bug), and
    `EditState.accumulated_delta` still equals `W − W₀`; reverting a batch subtracts its correction with it.

    `restrain_at="end"` (the reference): before the next batch the previous batch's correction is lifted again
    (its negative is applied and becomes that batch's first factors), so every batch is computed on the
    unrestrained weights and, between batches, the model holds the restraint of the whole perturbation, as if
    the last batch made were the last edit; a sequential user never has to say which edit is the last.
    `"every_batch"`: the restrained weights are what the next batch edits.

    Everything but `sigma_max` is read from the recorded batches, so reverting batches or loading published
    edits needs no extra state.
    """

    def __init__(self, original_weights: Mapping[str, torch.Tensor],
                 add_delta: Callable[[str, torch.Tensor], None], module_of: Callable[[LayerUpdate], str],
                 alpha: PruneAlpha = "e", restrain_at: RestrainAt = "end", clip: bool = False) -> None:
        """`original_weights`: `{module: W₀ [d_out, d_in]}` of the matrices a method may edit (any dtype; only their
        largest singular values are kept); `add_delta(module, ΔW [d_out, d_in])` adds to a weight;
        `module_of(update)` names the matrix an update edits."""
        self.alpha, self.restrain_at, self.clip = alpha, restrain_at, clip
        self.add_delta, self.module_of = add_delta, module_of
        self.sigma_max: dict[str, float] = {}
        self.add_modules(original_weights)
        self._lifted: dict[str, Factors] = {}  # set by `lift`, recorded by the following `restrain`

    def add_modules(self, original_weights: Mapping[str, torch.Tensor]) -> None:
        """Restrain these matrices too (`{module: W₀ [d_out, d_in]}`, e.g. the gate/up projections MEND edits besides
        the rewrite modules); refuses a weight the restraint function would enlarge (see `__init__`)."""
        sigma_max = {module: float(torch.linalg.matrix_norm(weight.detach().float(), ord=2))
                     for module, weight in original_weights.items()}
        if self.alpha != "linear" and not self.clip:
            floor = 1.0 / math.log(LOG_BASES[self.alpha])
            small = {module: round(value, 4) for module, value in sigma_max.items() if value < floor}
            if small:
                raise ValueError(
                    f"EditingArguments.prune_alpha={self.alpha!r}: the largest singular value σ_max of the original "
                    f"weight is below 1/ln α = {floor:.3g} for {small}, so the restraint would enlarge singular "
                    "values just above σ_max (ALGORITHMS.md §7.1). Choose a larger base (prune_alpha='e' needs "
                    "σ_max ≥ 1) or 'linear', or set prune_clip=True to use min(F(σ), σ).")
        self.sigma_max.update(sigma_max)

    def lift(self, previous: Sequence[LayerUpdate]) -> None:
        """Before a batch, in `"end"` mode: take the previous batch's correction (`previous`: its recorded
        updates) out of the weights, so the batch is computed on the unrestrained ones."""
        self._lifted = {}
        if self.restrain_at != "end":
            return
        for update in previous:
            if update.restraint_rank:
                left, right = update.left[:, -update.restraint_rank:], update.right[-update.restraint_rank:]
                module = self.module_of(update)
                self.add_delta(module, -(left @ right))
                self._lifted[module] = (-left, right)

    def restrain(self, history: Iterable[LayerUpdate], updates: Sequence[LayerUpdate]) -> list[LayerUpdate]:
        """Restrain the accumulated perturbation after a batch and return the batch's factors to record.

        `history`: every earlier batch's recorded updates; `updates`: what the method applied in this batch. The
        result has one `LayerUpdate` per matrix whose factors are `[lift, the method's update(s), correction]`
        and whose keys are the method's keys only (so previous-edit key caches rebuilt from it are unchanged).
        """
        accumulated: dict[str, list[Factors]] = {}
        for update in history:
            accumulated.setdefault(self.module_of(update), []).append((update.left, update.right))
        batch: dict[str, list[Factors]] = {module: [factors] for module, factors in self._lifted.items()}
        keys: dict[str, list[torch.Tensor]] = {}
        names: dict[str, tuple[int, str | None]] = {}  # module -> (layer, LayerUpdate.module) of the record
        for update in history:
            names.setdefault(self.module_of(update), (update.layer, update.module))
        for update in updates:
            module = self.module_of(update)
            if module not in self.sigma_max:
                raise ValueError(f"PRUNE: the method edited {module}, which is not one of the matrices "
                                 f"{sorted(self.sigma_max)} whose original weights were recorded.")
            batch.setdefault(module, []).append((update.left, update.right))
            keys.setdefault(module, []).append(update.keys)
            names[module] = (update.layer, update.module)
        corrections = {module: self._correction(module, accumulated.get(module, []) + parts)
                       for module, parts in batch.items()}
        for module, correction in corrections.items():
            if correction is not None:
                self.add_delta(module, correction[0] @ correction[1])
        self._lifted = {}
        return [_merged(*names[module], parts, keys.get(module, []), corrections[module])
                for module, parts in batch.items()]

    def _correction(self, module: str, parts: Sequence[Factors]) -> Factors | None:
        """`(U·diag(F(σ) − σ), Vᵀ)` over the components of `Σ left @ right` that F changes, or None."""
        u, sigma, v = factored_svd(torch.cat([left for left, _ in parts], 1), torch.cat([right for _, right in parts]))
        change = restrain_singular_values(sigma, self.sigma_max[module], self.alpha, self.clip) - sigma
        changed = change != 0
        if not changed.any():
            return None
        dtype = parts[0][0].dtype
        return (u[:, changed] * change[changed]).to(dtype), v[:, changed].T.contiguous().to(dtype)


def _merged(layer: int, module: str | None, parts: Sequence[Factors], keys: Sequence[torch.Tensor],
            correction: Factors | None) -> LayerUpdate:
    """One `LayerUpdate` with `parts` and then `correction` side by side; keys `[n, d_in]` (`[0, d_in]` when none)."""
    parts = [*parts, correction] if correction is not None else list(parts)
    left = torch.cat([left for left, _ in parts], 1)
    right = torch.cat([right for _, right in parts])
    batch_keys = torch.cat(list(keys)) if keys else right.new_zeros(0, right.shape[1])
    return LayerUpdate(layer, left, right, batch_keys, correction[0].shape[1] if correction is not None else 0,
                       module)
