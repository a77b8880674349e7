"""The CounterFact table of ROME, MEMIT and AlphaEdit in one call: efficacy, generalization, specificity, their
magnitudes, and the harmonic-mean score."""

from typing import Any

import datasets
import evaluate

from hf_alphaedit.metrics import base
from hf_alphaedit.metrics.base import COUNTERFACT_CITATION, REFERENCE_URLS, per_record_features
from hf_alphaedit.metrics.summaries import harmonic_mean, probability_comparison

# Prompt kind -> (reported metric, whether the new target should win).
KINDS = {"rewrite": ("efficacy", True), "paraphrase": ("generalization", True), "neighborhood": ("specificity", False)}

INPUTS = """
Args:
    rewrite_new_nll, rewrite_true_nll: per record, the mean per-token negative log-likelihood of the new and of the
        true target after each rewrite prompt (a list, or one number per record).
    paraphrase_new_nll, paraphrase_true_nll: the same after each paraphrased prompt.
    neighborhood_new_nll, neighborhood_true_nll: the same after each neighborhood prompt (other subjects whose
        true object is the edited fact's true object).
Returns:
    efficacy, generalization, specificity: success rates in percent, and their `_std`;
    efficacy_magnitude, generalization_magnitude, specificity_magnitude: probability differences in percent, and
        their `_std`;
    score: harmonic mean of efficacy, generalization and specificity.
"""


class KnowledgeEditing(base.EditingMetric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=(
                "All CounterFact probability-comparison metrics of ROME, MEMIT and AlphaEdit computed at once, "
                "summarised as the reference code does (per-record means, then mean and population std over records, "
                "x 100), plus the harmonic-mean score of efficacy, generalization and specificity."),
            citation=COUNTERFACT_CITATION,
            inputs_description=INPUTS,
            features=per_record_features(datasets.Value("float64"),
                                         *(f"{kind}_{target}_nll" for kind in KINDS for target in ("new", "true"))),
            reference_urls=REFERENCE_URLS,
        )

    def _compute(self, **scores: Any) -> dict[str, float]:
        results: dict[str, float] = {}
        for kind, (name, new_should_win) in KINDS.items():
            summary = probability_comparison(scores[f"{kind}_new_nll"], scores[f"{kind}_true_nll"],
                                             new_should_win=new_should_win)
            results.update({name: summary["success"], f"{name}_std": summary["success_std"],
                            f"{name}_magnitude": summary["magnitude"], f"{name}_magnitude_std": summary["magnitude_std"]})
        results["score"] = harmonic_mean([results[name] for name, _ in KINDS.values()])
        return results
