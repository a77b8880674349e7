"""Fluency of generated text: the reference's weighted bigram/trigram entropy (`ngram_entropy`)."""

from typing import Any

import datasets
import evaluate

from hf_alphaedit.metrics import base
from hf_alphaedit.metrics.base import COUNTERFACT_CITATION, REFERENCE_URLS, per_record_features
from hf_alphaedit.metrics.summaries import fluency

INPUTS = """
Args:
    texts: per record, the texts generated from its generation prompts (a list, or one string).
Returns:
    fluency: mean over records of the mean n-gram entropy of the record's texts, x 100 (the reference reports
        values around 600 for fluent text; repetitive text scores lower).
    fluency_std: population standard deviation over records, x 100.
"""


class Fluency(base.EditingMetric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=(
                "Generation fluency used by ROME, MEMIT and AlphaEdit: per text, the entropies (bits) H2 and H3 of "
                "its word bigram and trigram frequency distributions, combined as (2/3 H2 + 4/3 H3) / 2. A model "
                "that repeats itself after an edit scores low."),
            citation=COUNTERFACT_CITATION,
            inputs_description=INPUTS,
            features=per_record_features(datasets.Value("string"), "texts"),
            reference_urls=REFERENCE_URLS,
        )

    def _compute(self, texts: Any) -> dict[str, float]:
        mean, std = fluency(texts)
        return {"fluency": mean, "fluency_std": std}
