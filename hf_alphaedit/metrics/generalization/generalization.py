"""Generalization of knowledge edits: how often the new target beats the true one on paraphrased prompts."""

# Imported as a module: evaluate takes the first metric class in this namespace as the module's metric.
from hf_alphaedit.metrics import base


class Generalization(base.ProbabilityComparisonMetric):
    metric_name = "generalization"
    new_should_win = True
    metric_description = (
        "Generalization (CounterFact paraphrase success, ROME/MEMIT/AlphaEdit): per record, the share of "
        "paraphrased prompts after which the new target is more likely than the true target (mean per-token "
        "negative log-likelihoods); averaged over records. The magnitude is the mean of exp(-NLL_new) - "
        "exp(-NLL_true)."
    )
