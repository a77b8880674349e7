"""What the shipped `evaluate` modules have in common: citations, input schemas, the CounterFact base class."""

from __future__ import annotations

from typing import Any

import datasets
import evaluate

from .summaries import probability_comparison

ROME_CITATION = """\
@inproceedings{meng2022locating,
  title={Locating and Editing Factual Associations in {GPT}},
  author={Meng, Kevin and Bau, David and Andonian, Alex and Belinkov, Yonatan},
  booktitle={Advances in Neural Information Processing Systems},
  year={2022}
}"""
MEMIT_CITATION = """\
@inproceedings{meng2023memit,
  title={Mass-Editing Memory in a Transformer},
  author={Meng, Kevin and Sharma, Arnab Sen and Andonian, Alex and Belinkov, Yonatan and Bau, David},
  booktitle={International Conference on Learning Representations},
  year={2023}
}"""
ALPHAEDIT_CITATION = """\
@inproceedings{fang2025alphaedit,
  title={{AlphaEdit}: Null-Space Constrained Knowledge Editing for Language Models},
  author={Fang, Junfeng and Jiang, Houcheng and Wang, Kun and Ma, Yunshan and Wang, Xiang and He, Xiangnan
          and Chua, Tat-Seng},
  booktitle={International Conference on Learning Representations},
  year={2025}
}"""
ZSRE_CITATION = """\
@inproceedings{levy2017zero,
  title={Zero-Shot Relation Extraction via Reading Comprehension},
  author={Levy, Omer and Seo, Minjoon and Choi, Eunsol and Zettlemoyer, Luke},
  booktitle={Proceedings of the 21st Conference on Computational Natural Language Learning},
  year={2017}
}"""
MIRAGE_CITATION = """\
@article{yang2025mirage,
  title={The Mirage of Model Editing: Revisiting Evaluation in the Wild},
  author={Yang, Wanli and others},
  journal={arXiv preprint arXiv:2502.11177},
  year={2025}
}"""
COUNTERFACT_CITATION = "\n".join([ROME_CITATION, MEMIT_CITATION, ALPHAEDIT_CITATION])
REFERENCE_URLS = ["https://arxiv.org/abs/2410.02355", "https://arxiv.org/abs/2210.07229",
                  "https://arxiv.org/abs/2202.05262"]


def per_record_features(kind: datasets.Value, *names: str) -> list[datasets.Features]:
    """Two accepted input schemas with the same column names: a list of values per record (records with
    several prompts of a kind), or one value per record."""
    return [datasets.Features({name: datasets.Sequence(kind) for name in names}),
            datasets.Features({name: kind for name in names})]


NLL_INPUTS = """
Args:
    new_target_nll: per record, the mean negative log-likelihood per token of the new target after each prompt
        of this kind (a list, or one number when the record has one prompt).
    true_target_nll: the same for the true (original) target, same shape.
Returns:
    {name}: success rate in percent (mean over records of the per-record share of successful prompts).
    {name}_std: population standard deviation over records, in percent.
    {name}_magnitude: mean difference of geometric-mean token probabilities exp(-NLL), in percent.
    {name}_magnitude_std: its standard deviation over records, in percent.
"""


class EditingMetric(evaluate.Metric):
    """An `evaluate.Metric` whose input errors name the columns and the accepted schemas (evaluate's own message
    assumes `predictions`/`references` columns and fails with a KeyError when several schemas are accepted)."""

    def _infer_feature_from_batch(self, batch: dict[str, Any]) -> datasets.Features:
        missing = [name for name, values in batch.items() if values is None]  # evaluate passes None for them
        if missing:
            raise ValueError(f"{self.name}: missing input column(s) {missing}; pass every column of "
                             f"{list(batch)}, one value (or list of values) per record")
        return super()._infer_feature_from_batch(batch)

    def _infer_feature_from_example(self, example: dict[str, Any]) -> datasets.Features:
        try:
            return super()._infer_feature_from_example(example)
        except KeyError:
            schemas = " or ".join(str(dict(features)) for features in self.features)
            values = ", ".join(f"{name}={value!r}" for name, value in example.items())
            raise ValueError(f"{self.name}: inputs ({values}) match none of the accepted schemas: {schemas}; "
                             "pass one list of numbers (or one number) per record for every column") from None


class ProbabilityComparisonMetric(EditingMetric):
    """A CounterFact probability-comparison metric (ALGORITHMS.md §10.2): the new target should win on
    rewrite and paraphrase prompts, the true target on neighborhood prompts."""

    metric_name: str
    new_should_win: bool
    metric_description: str

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=self.metric_description,
            citation=COUNTERFACT_CITATION,
            inputs_description=NLL_INPUTS.format(name=self.metric_name),
            features=per_record_features(datasets.Value("float64"), "new_target_nll", "true_target_nll"),
            reference_urls=REFERENCE_URLS,
        )

    def _compute(self, new_target_nll: Any, true_target_nll: Any) -> dict[str, float]:
        summary = probability_comparison(new_target_nll, true_target_nll, new_should_win=self.new_should_win)
        name = self.metric_name
        return {name: summary["success"], f"{name}_std": summary["success_std"],
                f"{name}_magnitude": summary["magnitude"], f"{name}_magnitude_std": summary["magnitude_std"]}
