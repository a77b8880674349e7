"""Efficacy of knowledge edits: how often the new target beats the true one on the rewrite prompt."""

# Imported as a module: evaluate takes the first metric class in this namespace as the module's metric.
from hf_alphaedit.metrics import base


class Efficacy(base.ProbabilityComparisonMetric):
    metric_name = "efficacy"
    new_should_win = True
    metric_description = (
        "Efficacy (CounterFact rewrite success, ROME/MEMIT/AlphaEdit): the share of edited facts whose new target "
        "is more likely than the true target after the edited prompt, comparing mean per-token negative "
        "log-likelihoods. The magnitude is the mean of exp(-NLL_new) - exp(-NLL_true)."
    )
