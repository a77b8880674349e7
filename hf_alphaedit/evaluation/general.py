"""General-capability suite (the reference's "GLUE" evaluation, ALGORITHMS.md §10.7), scored by log-likelihood.

Each example is a zero-shot prompt followed by a few answer options ("Yes"/"No", "A".."D", ...); the predicted
answer is the option with the highest geometric-mean token probability `exp(−NLL)` of `" " + option` after the
prompt (the reference's "probability answer", whose weighted F1 it reports as `f1_new`). All options of all
examples of a task are scored in one batched pass; single-token options share one forward row per example.
The reference's inverted RTE labels are not reproduced unless `reference_compat=True`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..fingerprint import file_sha256
from ..metrics.summaries import matthews_correlation, weighted_f1
from .protocol import protocol_card
from .scorer import DEFAULT_BATCH_TOKENS, encode_prompt, encode_target, progress, score_continuations

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class GeneralTask:
    """One task: how to build the prompt, the answer options, and the index of the correct option."""

    name: str
    prompt: Callable[[Mapping[str, Any]], str]
    options: tuple[str, ...]
    label: Callable[[Mapping[str, Any]], int]
    # Binary tasks follow the reference's rule "option 1 if strictly more likely, else option 0"; with more
    # options the strictly most likely one wins and a tie is invalid (−1).
    binary: bool = True


def _mmlu_prompt(example: Mapping[str, Any]) -> str:
    choices = "".join(f"\n({letter}) {choice}" for letter, choice in zip(LETTERS, example["choices"], strict=True))
    return f"Question: {example['question']}{choices}\nAnswer:"


def _dialogue_prompt(example: Mapping[str, Any]) -> str:
    options = "".join(f"\n({letter}){option}" for letter, option in zip(LETTERS, example["options"], strict=True))
    return f"Q: Given the following: {example['article']}\nWhich choice is correct?{options}\nAnswer:"


_SENTIMENT_INSTRUCTION = ("For each snippet of text,label the sentiment of the text as positive or negative."
                          "The answer should be exact 'positive' or 'negative'. text:")

# Options are listed in label order: option i is the answer of label i.
GENERAL_TASKS: dict[str, GeneralTask] = {task.name: task for task in (
    GeneralTask("sst2", lambda e: f"Review :{e['sentence']}\nSentiment :", ("negative", "positive"),
                lambda e: int(e["label"])),
    GeneralTask("mrpc", lambda e: ("Are the sentences paraphrases of each other.\n"
                                   f"Sentence 1: {e['sentence1']}\nSentence 2: {e['sentence2']}\nAnswer:"),
                ("No", "Yes"), lambda e: int(e["label"])),
    GeneralTask("cola", lambda e: f"Is this sentence linguistically acceptable?\nSentence: {e['sentence']}\nAnswer: ",
                ("No", "Yes"), lambda e: int(e["label"])),
    # GLUE RTE: label 0 = entailment, so "True" is option 0.
    GeneralTask("rte", lambda e: f"{e['sentence1']}\nquestion: {e['sentence2']} True or False?\nanswer:",
                ("True", "False"), lambda e: int(e["label"])),
    GeneralTask("nli", lambda e: f"{e['sentence1']} entails the {e['sentence2']} True or False? Answer:",
                ("False", "True"), lambda e: int(e["label"] == "entailment")),
    GeneralTask("mmlu", _mmlu_prompt, LETTERS, lambda e: int(e["answer"]), binary=False),
    GeneralTask("sentiment_analysis", lambda e: f"{_SENTIMENT_INSTRUCTION} {e['sentence']} answer:",
                ("negative", "positive"), lambda e: int(e["label"])),
    GeneralTask("dialogue", _dialogue_prompt, LETTERS, lambda e: LETTERS.index(e["answers"]), binary=False),
)}


def _choose(probabilities: Sequence[float], binary: bool) -> int:
    if binary:
        return 1 if probabilities[1] > probabilities[0] else 0
    best = max(probabilities)
    return probabilities.index(best) if probabilities.count(best) == 1 else -1


def _context_length(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def evaluate_general(
    model: nn.Module,
    tokenizer: Any,
    data_dir: str | os.PathLike,
    tasks: Sequence[str] | None = None,
    num_examples: int | None = None,
    *,
    reference_compat: bool = False,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    protocol: Mapping[str, Any] | None = None,
    show_progress: bool | None = None,
) -> dict[str, dict[str, Any]]:
    """Zero-shot general-capability scores on `data_dir/<task>.json` for `tasks` (default: all of
    `GENERAL_TASKS`), using the first `num_examples` examples of each file (default all).

    Returns `{task: {"accuracy": %, "f1": weighted F1 (0–1, as the reference), "mcc": Matthews correlation,
    "invalid": ties, "total": examples, "seconds": s}}` plus `"average": {"accuracy", "f1"}` over the tasks and
    `"protocol"`: the protocol card (`evaluation.protocol`: weight fingerprint, task files and their hashes, ...),
    with the caller's `protocol` fields merged in (e.g. `editor_protocol(...)`: the model's Hub id and edit history
    instead of its config's `name_or_path`, which is a local folder for a model loaded from one).
    Prompts longer than the model's context are cut from the left. `reference_compat=True` reproduces the
    reference's RTE polarity bug ("True" scored as correct for not_entailment).
    """
    names = list(tasks) if tasks is not None else list(GENERAL_TASKS)
    unknown = [name for name in names if name not in GENERAL_TASKS]
    if unknown:
        raise ValueError(f"unknown general tasks {unknown}; choose from {', '.join(GENERAL_TASKS)}")
    if num_examples is not None and num_examples < 1:
        raise ValueError(f"num_examples must be positive or None (all), got {num_examples}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    context = _context_length(model)
    results: dict[str, dict[str, Any]] = {}
    for name in progress(names, total=len(names), description="general tasks", show=show_progress):
        task = GENERAL_TASKS[name]
        path = Path(data_dir) / f"{name}.json"
        if not path.exists():
            raise FileNotFoundError(f"general task {name!r}: {path} does not exist; pass the folder holding "
                                    f"{', '.join(f'{n}.json' for n in names)} as data_dir")
        examples = json.loads(path.read_text(encoding="utf-8"))[:num_examples]
        start = time.perf_counter()
        options = [encode_target(tokenizer, option) for option in task.options]
        pairs = []
        for example in examples:
            prompt = encode_prompt(tokenizer, task.prompt(example))
            for option in options:
                keep = len(prompt) if context is None else context - len(option) + 1
                pairs.append((prompt[-keep:], option))
        scores = score_continuations(model, pairs, pad_id=pad_id, batch_tokens=batch_tokens,
                                     show_progress=show_progress, description=name)
        labels = [task.label(example) for example in examples]
        if reference_compat and name == "rte":
            labels = [1 - label for label in labels]
        count = len(task.options)
        predictions = [_choose([math.exp(-s.nll) for s in scores[i * count : (i + 1) * count]],
                               task.binary) for i in range(len(examples))]
        correct = sum(p == label for p, label in zip(predictions, labels, strict=True))
        results[name] = {"accuracy": 100.0 * correct / len(examples), "f1": weighted_f1(labels, predictions),
                         "mcc": matthews_correlation(labels, predictions),
                         "invalid": sum(p == -1 for p in predictions), "total": len(examples),
                         "seconds": time.perf_counter() - start}
    results["average"] = {metric: sum(results[n][metric] for n in names) / len(names) for metric in ("accuracy", "f1")}
    dataset = {"source": Path(data_dir).name, "tasks": names, "records": [0, num_examples],
               "file_sha256": {name: file_sha256(Path(data_dir) / f"{name}.json") for name in names}}
    results["protocol"] = protocol_card(model, dataset=dataset, metric_families={"log_likelihood_choice": names},
                                       extra=protocol)
    return results
