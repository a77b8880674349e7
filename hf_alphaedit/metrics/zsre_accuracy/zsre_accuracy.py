"""ZsRE token-level top-1 accuracy under teacher forcing, for rewrite, paraphrase and neighborhood prompts."""

from typing import Any

import datasets
import evaluate

from hf_alphaedit.metrics import base
from hf_alphaedit.metrics.base import ALPHAEDIT_CITATION, MEMIT_CITATION, REFERENCE_URLS, ZSRE_CITATION
from hf_alphaedit.metrics.summaries import token_accuracy

KINDS = {"rewrite": "efficacy", "paraphrase": "generalization", "neighborhood": "specificity"}

INPUTS = """
Args:
    rewrite_correct: per record, one boolean per target token: whether the model's argmax after the question
        and the preceding target tokens is that token.
    paraphrase_correct: the same for the paraphrased question.
    neighborhood_correct: the same for the unrelated question and its answer (should stay correct).
Returns:
    efficacy, generalization, specificity: mean over records of the per-record token accuracy, in percent.
    efficacy_std, generalization_std, specificity_std: population standard deviations over records, in percent.
"""


class ZsreAccuracy(base.EditingMetric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=(
                "ZsRE editing accuracy as in MEMIT and AlphaEdit: token-level top-1 accuracy of the target answer "
                "under teacher forcing, on the edited question (efficacy), its paraphrase (generalization) and an "
                "unrelated Natural Questions pair (specificity)."),
            citation="\n".join([ZSRE_CITATION, MEMIT_CITATION, ALPHAEDIT_CITATION]),
            inputs_description=INPUTS,
            features=datasets.Features({f"{kind}_correct": datasets.Sequence(datasets.Value("bool"))
                                        for kind in KINDS}),
            reference_urls=REFERENCE_URLS,
        )

    def _compute(self, rewrite_correct: Any, paraphrase_correct: Any, neighborhood_correct: Any) -> dict[str, float]:
        results = {}
        for kind, flags in zip(KINDS, (rewrite_correct, paraphrase_correct, neighborhood_correct), strict=True):
            mean, std = token_accuracy(flags)
            results[KINDS[kind]] = mean
            results[f"{KINDS[kind]}_std"] = std
        return results
