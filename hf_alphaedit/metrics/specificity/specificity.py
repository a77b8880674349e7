"""Specificity of knowledge edits: how often unrelated (neighborhood) prompts keep their true target."""

# Imported as a module: evaluate takes the first metric class in this namespace as the module's metric.
from hf_alphaedit.metrics import base


class Specificity(base.ProbabilityComparisonMetric):
    metric_name = "specificity"
    new_should_win = False
    metric_description = (
        "Specificity (CounterFact neighborhood success, ROME/MEMIT/AlphaEdit): per record, the share of prompts "
        "about other subjects that share the true object after which the true target stays more likely than the "
        "new one (mean per-token negative log-likelihoods); averaged over records. The magnitude is the mean of "
        "exp(-NLL_true) - exp(-NLL_new)."
    )
