"""Live-decoding accuracy of knowledge edits: does the model *generate* the expected answer, not only rank it first
under teacher forcing?"""

from typing import Any

import datasets
import evaluate

from hf_alphaedit.metrics import base
from hf_alphaedit.metrics.base import COUNTERFACT_CITATION, MIRAGE_CITATION, REFERENCE_URLS
from hf_alphaedit.metrics.summaries import live_accuracy

INPUTS = """
Args:
    predictions: per record, the model's generated continuations of its prompts of one kind (a list, or one
        string): the first line of what the model decoded after each prompt.
    references: per record, the expected answer (the new target for rewrite and paraphrase prompts, the true
        answer for neighborhood prompts).
    match: "prefix" (default; the continuation starts with the answer) or "contains" (the answer occurs in it).
Returns:
    live_accuracy: mean over records of the share of the record's continuations that give its answer, in percent.
    live_accuracy_std: population standard deviation over records, in percent.
"""


class LiveAccuracy(base.EditingMetric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=(
                "Live-decoding success of edited facts: the model generates a continuation of each prompt on its own "
                "(no gold prefix), and a prompt succeeds when that continuation, normalised for case, punctuation "
                "and articles, starts with (or contains) the expected answer. Teacher-forced metrics score the "
                "answer token by token given the gold prefix and can report success the model never generates."),
            citation="\n".join([COUNTERFACT_CITATION, MIRAGE_CITATION]),
            inputs_description=INPUTS,
            features=[datasets.Features({"predictions": datasets.Sequence(datasets.Value("string")),
                                         "references": datasets.Value("string")}),
                      datasets.Features({"predictions": datasets.Value("string"),
                                         "references": datasets.Value("string")})],
            reference_urls=[*REFERENCE_URLS, "https://arxiv.org/abs/2502.11177"],
        )

    def _compute(self, predictions: Any, references: Any, match: str = "prefix") -> dict[str, float]:
        mean, std = live_accuracy(predictions, references, match)
        return {"live_accuracy": mean, "live_accuracy_std": std}
