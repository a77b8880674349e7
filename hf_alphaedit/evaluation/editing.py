"""Evaluation of edits: CounterFact probability comparisons, ZsRE token accuracy and fluency (ALGORITHMS.md §10).

`evaluate_edits` scores every prompt of every record in one `score_continuations` pass per data set (not one
forward per record, as the reference does), then summarises the scores with the shipped `evaluate` modules, so
the numbers a user gets from `evaluate.load(...)` on their own scores and from this runner are the same code.
Protocol (§10.1): evaluate after all edits ("post"); pass `baseline=` (e.g. the result of a call on the unedited
model, or `AlphaEditModel.evaluate(..., baseline=True)`) to report pre-edit numbers next to them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import datasets
from torch import nn

from ..metrics import load_metric
from ..metrics.summaries import harmonic_mean, token_accuracy
from ..requests import EditRequest, ZsreTarget, as_edit_requests
from .decoding import REFERENCE_SAMPLING, LiveDecoding, generate_texts, live_continuations
from .protocol import dataset_card, protocol_card
from .scorer import DEFAULT_BATCH_TOKENS, encode_prompt, encode_target, score_continuations

RecordKind = Literal["auto", "counterfact", "zsre"]
EditRecords = str | os.PathLike | datasets.Dataset | Iterable[Mapping[str, Any] | EditRequest]
# Prompt kinds of a CounterFact record -> (reported metric, whether the new target should win) (§10.2).
COUNTERFACT_KINDS = {"rewrite": ("efficacy", True), "paraphrase": ("generalization", True),
                     "neighborhood": ("specificity", False)}
_ZSRE_RECORD_KEYS = ("src", "loc", "loc_ans")


def load_edit_records(source: EditRecords, *, split: str | None = None,
                      limit: int | None = None) -> list[Mapping[str, Any] | EditRequest]:
    """Records from a local `.json`/`.jsonl` file, a Hub dataset name (`split`, default "train"), a
    `datasets.Dataset`, or an iterable of records / `EditRequest`s; the first `limit` of them (all when None).

    Files and Hub data sets load through `datasets` (`load_dataset("json", ...)` for local files).
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.exists():
            if path.is_dir() or path.suffix.lower() not in (".json", ".jsonl"):
                raise ValueError(f"records file {str(path)!r}: give a .json or .jsonl file of records")
            source = datasets.load_dataset("json", data_files=str(path), split="train")
        else:
            source = datasets.load_dataset(str(source), split=split or "train")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be non-negative or None, got {limit}")
    if isinstance(source, datasets.Dataset):
        return source.select(range(min(limit, len(source)))).to_list() if limit is not None else source.to_list()
    records = list(source)
    return records[:limit] if limit is not None else records


def _is_zsre(record: Mapping[str, Any] | EditRequest, request: EditRequest, kind: RecordKind) -> bool:
    if kind != "auto":
        return kind == "zsre"
    if isinstance(record, Mapping):
        return any(record.get(key) is not None for key in _ZSRE_RECORD_KEYS)
    return request.target_true is None


def evaluate_edits(
    model: nn.Module,
    tokenizer: Any,
    records: EditRecords,
    *,
    kind: RecordKind = "auto",
    zsre_target: ZsreTarget = "answers",
    split: str | None = None,
    limit: int | None = None,
    baseline: Mapping[str, Any] | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    live: bool | LiveDecoding = False,
    generation: bool = False,
    max_generation_records: int | None = 100,
    generation_length: int = 100,
    seed: int = 0,
    protocol: Mapping[str, Any] | None = None,
    show_progress: bool | None = None,
    per_record: bool = False,
) -> dict[str, Any]:
    """Evaluate `model` on edit records as the reference code does after an editing run.

    Records (see `load_edit_records`) are CounterFact-style (with a true target) or ZsRE (MEND format, or
    requests without `target_true`); `kind` forces one reading. Returns a flat dict:

    * CounterFact records: `efficacy`, `generalization`, `specificity` (success rates in percent, §10.2) with
      `_std`, `_magnitude`, `_magnitude_std`; `score` (their harmonic mean); `rewrite_acc`, `paraphrase_acc`,
      `neighborhood_acc` (teacher-forced exact match of the target that should win, percent);
    * ZsRE records: `zsre_efficacy`, `zsre_generalization`, `zsre_specificity` (token-level top-1 accuracy,
      percent, §10.4) with `_std`;
    * with `live=True` (or a `LiveDecoding`): the live-decoding family beside them, `live_efficacy`,
      `live_generalization`, `live_specificity`, `live_score` (CounterFact) and `zsre_live_*` (ZsRE): the model
      generates each prompt's continuation (greedy by default) and succeeds when it starts with the new target
      (the true answer for neighbourhood prompts); the `live_accuracy` metric card states the rules;
    * with `generation=True`: `fluency` (n-gram entropy × 100, §10.3) of top-5 samples of `generation_length`
      tokens from the first `max_generation_records` CounterFact records' generation prompts (records without
      generation prompts, like the flat CounterFact splits, use their rewrite prompt);
    * `num_records`, `seconds`, `records_per_second`; `protocol`: the protocol card (`evaluation.protocol`; the
      caller's `protocol` fields, e.g. the edit history, merged in); `pre`: `baseline` when given (refused when
      its card shows the same weights as this model after edits); `records`: per-record scores when `per_record`.
    """
    start = time.perf_counter()
    live_settings = LiveDecoding() if live is True else (live or None)
    raw = load_edit_records(records, split=split, limit=limit)
    if not raw:
        raise ValueError("no records to evaluate; pass at least one edit record")
    # batch_size=1: evaluation does not apply the records, so two of them may ask for conflicting edits.
    requests = as_edit_requests(raw, zsre_target=zsre_target, batch_size=1)
    zsre_flags = [_is_zsre(record, request, kind) for record, request in zip(raw, requests, strict=True)]
    counterfact = [r for r, is_zsre in zip(requests, zsre_flags, strict=True) if not is_zsre]
    zsre = [r for r, is_zsre in zip(requests, zsre_flags, strict=True) if is_zsre]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scoring = {"pad_id": pad_id, "batch_tokens": batch_tokens, "show_progress": show_progress}
    decoding = {"show_progress": show_progress}

    results: dict[str, Any] = {"num_records": len(requests)}
    families: dict[str, list[str]] = {"teacher_forced": [], "sampled_generation": []}
    details: list[dict[str, Any]] = []
    parts: list[tuple[str, dict[str, Any], list[dict[str, Any]]]] = []
    if counterfact:
        parts.append(("teacher_forced", *_evaluate_counterfact(model, tokenizer, counterfact, scoring)))
        if live_settings is not None:
            parts.append((live_settings.family, *_live_counterfact(model, tokenizer, counterfact, live_settings,
                                                                   decoding)))
        if generation:
            fluency = _evaluate_fluency(model, tokenizer, counterfact[:max_generation_records], generation_length,
                                        seed, show_progress)
            parts.append(("sampled_generation", fluency, []))
    if zsre:
        parts.append(("teacher_forced", *_evaluate_zsre(model, tokenizer, zsre, scoring)))
        if live_settings is not None:
            parts.append((live_settings.family, *_live_zsre(model, tokenizer, zsre, live_settings, decoding)))
    per_kind: dict[str, list[dict[str, Any]]] = {}
    for family, summary, record_details in parts:
        results.update(summary)
        families.setdefault(family, []).extend(name for name in summary if not name.endswith("_std"))
        if record_details:
            kind_name = record_details[0]["kind"]
            if kind_name in per_kind:
                for entry, extra in zip(per_kind[kind_name], record_details, strict=True):
                    entry.update(extra)
            else:
                per_kind[kind_name] = record_details
                details.extend(record_details)
    seconds = time.perf_counter() - start
    results.update(seconds=seconds, records_per_second=len(requests) / seconds)
    dataset = dataset_card(records, split=split, records=[r.to_dict() if isinstance(r, EditRequest) else dict(r)
                                                          for r in raw])
    card = protocol_card(model, dataset=dataset, metric_families=families,
                         live_decoding=live_settings.to_dict() if live_settings is not None else None, extra=protocol)
    if baseline is not None:
        _check_baseline(baseline, card)
        results["pre"] = {k: v for k, v in baseline.items() if k not in ("pre", "records")}
    results["protocol"] = card
    if per_record:
        results["records"] = details
    return results


def _check_baseline(baseline: Mapping[str, Any], card: Mapping[str, Any]) -> None:
    """Refuse pre-edit numbers that were measured on the very weights being evaluated after edits."""
    pre_card = baseline.get("protocol")
    if not isinstance(pre_card, Mapping):
        return
    edits = (card.get("editing") or {}).get("num_edits") or 0
    same = (pre_card.get("model") or {}).get("weights_sha256") == card["model"]["weights_sha256"]
    if edits and same:
        raise ValueError(f"baseline: its protocol card has the same weights_sha256 as this model after {edits} edits, "
                         "so it was not measured on the unedited weights; evaluate the base model (or use "
                         "AlphaEditModel.evaluate(..., baseline=True), which swaps in the exact original weights)")


# One evaluation item: (prompt kind, prompt, the answer that should come out: the new target on rewrite and
# paraphrase prompts, the true answer on neighborhood prompts).
Item = tuple[str, str, str]


def _counterfact_items(request: EditRequest) -> list[Item]:
    return ([("rewrite", request.prompt_with_subject, request.target_new)]
            + [("paraphrase", prompt, request.target_new) for prompt in request.paraphrase_prompts]
            + [("neighborhood", prompt, request.neighborhood_target) for prompt in request.neighborhood_prompts])


def _zsre_items(request: EditRequest) -> list[Item]:
    """The neighborhood prompt gets a `"?"` appended, as in the reference (the MEND files store NQ questions
    without one)."""
    return ([("rewrite", request.prompt_with_subject, request.target_new)]
            + [("paraphrase", prompt, request.target_new) for prompt in request.paraphrase_prompts]
            + [("neighborhood", prompt + "?", request.neighborhood_target) for prompt in request.neighborhood_prompts])


def _check_counterfact(requests: Sequence[EditRequest]) -> None:
    missing = [i for i, r in enumerate(requests) if r.target_true is None]
    if missing:
        raise ValueError(f"CounterFact records {missing[:10]} have no target_true; give 'target_true' "
                         "(or 'ground_truth'), or evaluate them with kind='zsre'")


def _check_zsre(requests: Sequence[EditRequest]) -> None:
    lacking = [i for i, r in enumerate(requests) if not (r.paraphrase_prompts and r.neighborhood_prompts)]
    if lacking:
        raise ValueError(f"ZsRE records {lacking[:10]} lack a paraphrase ('rephrase') or a neighborhood pair "
                         "('loc'/'loc_ans'); ZsRE accuracy needs both")


Summary = tuple[dict[str, float], list[dict[str, Any]]]


def _evaluate_counterfact(model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest],
                          scoring: dict[str, Any]) -> Summary:
    """Score new and true target after every rewrite / paraphrase / neighborhood prompt in one pass."""
    _check_counterfact(requests)
    encode = _Encoder(tokenizer)
    pairs, slots = [], []  # slot: (record, prompt kind, candidate) of each scored pair
    for index, request in enumerate(requests):
        for prompt_kind, prompt, _ in _counterfact_items(request):
            true = request.neighborhood_target if prompt_kind == "neighborhood" else request.target_true
            for candidate, target in (("new", request.target_new), ("true", true)):
                pairs.append((encode.prompt(prompt), encode.target(target)))
                slots.append((index, prompt_kind, candidate))
    scores = score_continuations(model, pairs, description="CounterFact", **scoring)

    nll = {(i, k, c): [] for i in range(len(requests)) for k in COUNTERFACT_KINDS for c in ("new", "true")}
    exact = {(i, k): [] for i in range(len(requests)) for k in COUNTERFACT_KINDS}
    for (index, prompt_kind, candidate), score in zip(slots, scores, strict=True):
        nll[index, prompt_kind, candidate].append(score.nll)
        if (candidate == "new") == COUNTERFACT_KINDS[prompt_kind][1]:
            exact[index, prompt_kind].append(score.all_correct)

    details = [{"case_id": request.case_id, "kind": "counterfact",
                **{f"{k}_{c}_nll": nll[index, k, c] for k in COUNTERFACT_KINDS for c in ("new", "true")}}
               for index, request in enumerate(requests)]
    results = _counterfact_summary(details)
    for prompt_kind in COUNTERFACT_KINDS:
        having = [i for i in range(len(requests)) if nll[i, prompt_kind, "new"]]
        if having:
            results[f"{prompt_kind}_acc"] = token_accuracy([exact[i, prompt_kind] for i in having])[0]
    return results, details


def _counterfact_summary(details: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Efficacy, generalization, specificity (with their spreads and magnitudes) and their harmonic mean `score`
    from CounterFact records' scores (`evaluate_edits(..., per_record=True)["records"]`); a prompt kind no
    record has is left out."""
    results: dict[str, float] = {}
    for prompt_kind, (name, _) in COUNTERFACT_KINDS.items():
        having = [d for d in details if d[f"{prompt_kind}_new_nll"]]
        if having:
            results.update(load_metric(name).compute(new_target_nll=[d[f"{prompt_kind}_new_nll"] for d in having],
                                                     true_target_nll=[d[f"{prompt_kind}_true_nll"] for d in having]))
    if all(name in results for name, _ in COUNTERFACT_KINDS.values()):
        results["score"] = harmonic_mean([results[name] for name, _ in COUNTERFACT_KINDS.values()])
    return results


def _zsre_summary(details: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """ZsRE token-level accuracies (`zsre_efficacy`, ...) from ZsRE records' scores."""
    columns = {f"{k}_correct": [d[f"{k}_correct"] for d in details] for k in COUNTERFACT_KINDS}
    return {f"zsre_{name}": value for name, value in load_metric("zsre_accuracy").compute(**columns).items()}


def summarize_record_scores(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The teacher-forced edit metrics of any subset of the per-record scores `evaluate_edits(...,
    per_record=True)` returns under `"records"` (e.g. the records of one edit batch), computed by the same
    `evaluate` modules, so the subset's numbers are what `evaluate_edits` would report on those records alone.

    CounterFact records give `efficacy`, `generalization`, `specificity` (+ `_std`, `_magnitude`) and `score`;
    ZsRE records `zsre_efficacy`, `zsre_generalization`, `zsre_specificity` (+ `_std`); `num_records` counts both.
    """
    if not records:
        raise ValueError("records: no per-record scores to summarise; pass evaluate_edits(..., "
                         "per_record=True)['records'] or a non-empty part of it")
    counterfact = [r for r in records if r.get("kind") == "counterfact"]
    zsre = [r for r in records if r.get("kind") == "zsre"]
    if len(counterfact) + len(zsre) != len(records):
        raise ValueError("records: every entry needs kind 'counterfact' or 'zsre' (the per-record scores of "
                         "evaluate_edits(..., per_record=True)['records'])")
    return {"num_records": len(records), **(_counterfact_summary(counterfact) if counterfact else {}),
            **(_zsre_summary(zsre) if zsre else {})}


def _evaluate_zsre(model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest],
                   scoring: dict[str, Any]) -> Summary:
    """Token-level teacher-forced accuracy (§10.4) on question, paraphrase and the unrelated NQ pair.

    Inputs are built by id concatenation, the §10.4 default (no decoded text, no BOS inside).
    """
    _check_zsre(requests)
    encode = _Encoder(tokenizer)
    pairs, slots = [], []
    for index, request in enumerate(requests):
        for prompt_kind, prompt, target in _zsre_items(request):
            pairs.append((encode.prompt(prompt), encode.target(target)))
            slots.append((index, prompt_kind))
    scores = score_continuations(model, pairs, description="ZsRE", **scoring)
    flags: dict[tuple[int, str], list[bool]] = {(i, k): [] for i in range(len(requests)) for k in COUNTERFACT_KINDS}
    for slot, score in zip(slots, scores, strict=True):
        flags[slot].extend(score.token_correct)
    details = [{"case_id": request.case_id, "kind": "zsre", **{f"{k}_correct": flags[index, k] for k in COUNTERFACT_KINDS}}
               for index, request in enumerate(requests)]
    return _zsre_summary(details), details


def _live(model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], items: list[list[Item]],
          settings: LiveDecoding, decoding: dict[str, Any], kind_name: str) -> Summary:
    """Live-decoding success per prompt kind (the `live_accuracy` module) from the model's own continuations."""
    flat = [(index, item) for index, record_items in enumerate(items) for item in record_items]
    continuations = live_continuations(model, tokenizer, [(prompt, answer) for _, (_, prompt, answer) in flat],
                                       settings, **decoding)
    generated: dict[tuple[int, str], list[str]] = {(i, k): [] for i in range(len(requests)) for k in COUNTERFACT_KINDS}
    answer_of: dict[tuple[int, str], str] = {}
    for (index, (prompt_kind, _, answer)), text in zip(flat, continuations, strict=True):
        generated[index, prompt_kind].append(text)
        answer_of[index, prompt_kind] = answer
    results: dict[str, float] = {}
    for prompt_kind, (name, _) in COUNTERFACT_KINDS.items():
        having = [i for i in range(len(requests)) if generated[i, prompt_kind]]
        if having:
            summary = load_metric("live_accuracy").compute(
                predictions=[generated[i, prompt_kind] for i in having],
                references=[answer_of[i, prompt_kind] for i in having], match=settings.match)
            results[f"live_{name}"], results[f"live_{name}_std"] = summary["live_accuracy"], summary["live_accuracy_std"]
    details = [{"case_id": request.case_id, "kind": kind_name,
                **{f"{k}_live": generated[index, k] for k in COUNTERFACT_KINDS}}
               for index, request in enumerate(requests)]
    return results, details


def _live_counterfact(model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], settings: LiveDecoding,
                      decoding: dict[str, Any]) -> Summary:
    _check_counterfact(requests)
    results, details = _live(model, tokenizer, requests, [_counterfact_items(r) for r in requests], settings,
                             decoding, "counterfact")
    names = [f"live_{name}" for name, _ in COUNTERFACT_KINDS.values()]
    if all(name in results for name in names):
        results["live_score"] = harmonic_mean([results[name] for name in names])
    return results, details


def _live_zsre(model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], settings: LiveDecoding,
               decoding: dict[str, Any]) -> Summary:
    _check_zsre(requests)
    results, details = _live(model, tokenizer, requests, [_zsre_items(r) for r in requests], settings, decoding,
                             "zsre")
    return {f"zsre_{name}": value for name, value in results.items()}, details


def _evaluate_fluency(model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], length: int, seed: int,
                      show_progress: bool | None) -> dict[str, float]:
    """Fluency of the reference sampler's texts (top-k 5, temperature 1, fixed length, seeded)."""
    prompts_per_record = [r.generation_prompts or (r.prompt_with_subject,) for r in requests]
    texts = generate_texts(model, tokenizer, [p for prompts in prompts_per_record for p in prompts],
                           max_length=length, sampling=dataclasses.replace(REFERENCE_SAMPLING, seed=seed),
                           show_progress=show_progress)
    grouped, position = [], 0
    for prompts in prompts_per_record:
        grouped.append(texts[position : position + len(prompts)])
        position += len(prompts)
    return load_metric("fluency").compute(texts=grouped)


class _Encoder:
    """Memoised prompt and target encodings (CounterFact repeats neighborhood prompts and targets a lot)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._prompts: dict[str, list[int]] = {}
        self._targets: dict[str, list[int]] = {}

    def prompt(self, text: str) -> list[int]:
        if text not in self._prompts:
            self._prompts[text] = encode_prompt(self.tokenizer, text)
        return self._prompts[text]

    def target(self, text: str) -> list[int]:
        if text not in self._targets:
            self._targets[text] = encode_target(self.tokenizer, text)
        return self._targets[text]
