"""`EditRequest`: the one internal form of a knowledge edit, its validation and the record adapters.

Every method and evaluator takes `EditRequest`s. Records from users and data sets are turned into them by
`from_record` / `as_edit_requests`, which auto-detect four shapes (ALGORITHMS.md §12):

1. our own / CounterFact-style dicts: `prompt` (a template with one `{}`), `subject`, `target_new`, ...;
2. full CounterFact records with a `requested_rewrite` (§12.1);
3. flat CounterFact records (MEND/EasyEdit, §12.2) whose `prompt` contains the subject literally;
4. ZsRE records in MEND format (§12.3), edited towards `answers[0]` (official AlphaEdit) or `alt` (EasyEdit).

Validation collects every problem of every record before raising a single `EditRequestError`, so a user
fixes a file in one go. An `EditRequest` that exists is always valid: the constructor runs the same checks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

ZsreTarget = Literal["answers", "alt"]
ZSRE_TARGETS: tuple[str, ...] = ("answers", "alt")
PROMPT_LIST_FIELDS = ("paraphrase_prompts", "neighborhood_prompts", "generation_prompts")
TARGET_FIELDS = ("target_new", "target_true", "neighborhood_target")
ACCEPTED_SHAPES = (
    "(1) {'prompt': template with one '{}' (or a prompt containing the subject), 'subject', 'target_new', "
    "optional 'target_true', 'case_id', 'paraphrase_prompts', 'neighborhood_prompts', 'neighborhood_target', "
    "'generation_prompts'}",
    "(2) full CounterFact {'case_id', 'requested_rewrite': {'prompt', 'subject', 'target_new': {'str'}, "
    "'target_true': {'str'}}, 'paraphrase_prompts', 'neighborhood_prompts', 'generation_prompts'}",
    "(3) flat CounterFact {'case_id', 'prompt', 'subject', 'target_new', 'ground_truth', 'rephrase_prompt', "
    "'locality_prompt', 'locality_ground_truth'}",
    "(4) ZsRE {'subject', 'src', 'answers', 'alt', 'rephrase', 'loc', 'loc_ans'}",
)
_ZSRE_KEYS = frozenset({"src", "answers", "alt", "loc", "loc_ans"})
_PROMPT_STYLE_KEYS = frozenset({"prompt", "subject", "target_new"})
# Keys whose value is one prompt (a string) standing for a one-element prompt list.
_SINGLE_PROMPT_KEYS = frozenset({"rephrase_prompt", "locality_prompt", "rephrase", "loc"})


class _Missing:
    """Marks a required field that the record does not have."""

    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()


class EditRequestError(ValueError):
    """Lists every problem found: one line per problem, each naming the record (index and case_id when known)
    and the field, and saying how to fix it."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        return f"{len(self.problems)} problem(s) with edit requests:\n{lines}"


@dataclass(frozen=True)
class EditRequest:
    """One edit: make `prompt` with `subject` filled in complete with `target_new`.

    Targets are stored without the leading space (one given leading space is dropped); the space is added
    at tokenisation time. Prompt lists are stored as tuples. Construction validates every field and raises
    `EditRequestError` listing all problems.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: int | str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_target: str | None = None
    generation_prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        values = _normalised({item.name: getattr(self, item.name) for item in fields(self)})
        for name, value in values.items():
            object.__setattr__(self, name, value)
        problems = _field_problems(values)
        if problems:
            where = _where(None, self.case_id, prefix="EditRequest")
            raise EditRequestError([_format(where, name, message, {}) for name, message in problems])

    @property
    def prompt_with_subject(self) -> str:
        """The template with the subject in place of `{}`."""
        prefix, suffix = self.split_prompt()
        return prefix + self.subject + suffix

    def split_prompt(self) -> tuple[str, str]:
        """`(prefix, suffix)`: the template's text before and after `{}`."""
        prefix, _, suffix = self.prompt.partition("{}")
        return prefix, suffix

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that `from_record` turns back into an equal request."""
        return {
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": self.target_new,
            "target_true": self.target_true,
            "case_id": self.case_id,
            "paraphrase_prompts": list(self.paraphrase_prompts),
            "neighborhood_prompts": list(self.neighborhood_prompts),
            "neighborhood_target": self.neighborhood_target,
            "generation_prompts": list(self.generation_prompts),
        }


@dataclass
class _Draft:
    """Field values read from one record, which record key each came from, and problems found reading it."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)


def from_record(
    record: Mapping[str, Any] | EditRequest, *, index: int = 0, zsre_target: ZsreTarget = "answers"
) -> EditRequest:
    """Build an `EditRequest` from one record of any accepted shape (see the module docstring).

    `index` is the record's position in its input; it labels error messages and is the ZsRE `case_id` when
    the record has none. `zsre_target` picks the ZsRE edit target: `"answers"` (`answers[0]`, official
    AlphaEdit) or `"alt"` (EasyEdit, with `target_true = answers[0]`). Raises `EditRequestError` listing
    every problem of the record.
    """
    if zsre_target not in ZSRE_TARGETS:
        raise ValueError(f"zsre_target must be one of {ZSRE_TARGETS}, got {zsre_target!r}")
    if isinstance(record, EditRequest):
        return record
    if not isinstance(record, Mapping):
        raise EditRequestError(
            [f"record {index}: expected a mapping or an EditRequest, got {type(record).__name__}"]
        )
    where = _where(index, record.get("case_id"))
    draft = _read(record, where, index, zsre_target)
    reported = {name for name, _ in draft.problems}
    values = _normalised(draft.values)
    problems = draft.problems + [p for p in _field_problems(values) if p[0] not in reported]
    if problems:
        raise EditRequestError([_format(where, name, message, draft.sources) for name, message in problems])
    return EditRequest(**values)


def as_edit_requests(
    records: EditRequest | Mapping[str, Any] | Iterable[Mapping[str, Any] | EditRequest],
    *,
    zsre_target: ZsreTarget = "answers",
    batch_size: int | None = None,
) -> list[EditRequest]:
    """Turn one record, one request or an iterable of them into validated `EditRequest`s.

    Checks every record and, for each consecutive batch of `batch_size` requests (all of them when None),
    that no two requests of the batch conflict (`validate_batch`); then raises one `EditRequestError` with all
    problems, or returns the complete list. Conflicts across batches are sequential updates and allowed.
    """
    if isinstance(records, EditRequest | Mapping):
        records = [records]
    elif isinstance(records, str | bytes) or not isinstance(records, Iterable):
        raise EditRequestError(
            [
                f"records: expected an EditRequest, a mapping or an iterable of them, got {type(records).__name__}"
            ]
        )
    built: list[tuple[int, EditRequest]] = []
    problems: list[str] = []
    for index, record in enumerate(records):
        try:
            built.append((index, from_record(record, index=index, zsre_target=zsre_target)))
        except EditRequestError as error:
            problems.extend(error.problems)
    size = batch_size or max(len(built), 1)
    for start in range(0, len(built), size):
        problems.extend(_conflicts(built[start : start + size]))
    if problems:
        raise EditRequestError(problems)
    return [request for _, request in built]


def validate_batch(requests: Sequence[EditRequest]) -> None:
    """Raise `EditRequestError` if the batch is not a sequence of `EditRequest`s or asks for conflicting edits.

    Two requests conflict when they share the template and the subject but want different `target_new`;
    exact duplicates are allowed.
    """
    wrong = [
        f"record {index}: expected an EditRequest, got {type(request).__name__}; build it with from_record"
        for index, request in enumerate(requests)
        if not isinstance(request, EditRequest)
    ]
    if wrong:
        raise EditRequestError(wrong)
    problems = _conflicts(list(enumerate(requests)))
    if problems:
        raise EditRequestError(problems)


def load_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read raw records from a `.json` file (a list, or an object holding the list under `"data"` or
    `"requests"`) or a `.jsonl` file (one object a line; blank lines are skipped).

    Raises `EditRequestError` naming the file (and the line) of every malformed entry.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise EditRequestError([f"file {str(path)!r}: unsupported extension {suffix!r}; use .json or .jsonl"])
    try:
        return _load_jsonl(path) if suffix == ".jsonl" else _load_json(path)
    except UnicodeDecodeError as error:
        raise EditRequestError([f"file {str(path)!r}: not UTF-8 text ({error.reason} at byte {error.start}); give "
                                "a JSON or JSON-lines file of records"]) from None


def _load_jsonl(path: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(
                    f"file {str(path)!r}, line {line_number}: malformed JSON ({error.msg}); fix that line"
                )
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                problems.append(
                    f"file {str(path)!r}, line {line_number}: expected a JSON object, got {type(record).__name__}"
                )
    if problems:
        raise EditRequestError(problems)
    return records


def _load_json(path: Path) -> list[dict[str, Any]]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise EditRequestError(
            [f"file {str(path)!r}, line {error.lineno}, column {error.colno}: malformed JSON ({error.msg})"]
        ) from error
    if isinstance(content, dict):
        content = next(
            (content[key] for key in ("data", "requests") if isinstance(content.get(key), list)), content
        )
    if not isinstance(content, list):
        raise EditRequestError(
            [
                f"file {str(path)!r}: expected a JSON list of records, or an object with a list under 'data' or 'requests'"
            ]
        )
    problems = [
        f"file {str(path)!r}: item {position}: expected a JSON object, got {type(item).__name__}"
        for position, item in enumerate(content)
        if not isinstance(item, dict)
    ]
    if problems:
        raise EditRequestError(problems)
    return content


def _read(record: Mapping[str, Any], where: str, index: int, zsre_target: ZsreTarget) -> _Draft:
    """Dispatch on the record's shape."""
    if "requested_rewrite" in record:
        return _read_full_counterfact(record, where)
    if _ZSRE_KEYS & record.keys():
        return _read_zsre(record, index, zsre_target)
    if _PROMPT_STYLE_KEYS & record.keys():
        return _read_prompt_style(record)
    raise EditRequestError(
        [
            f"{where}: unrecognised record with keys {sorted(record)}; accepted shapes: "
            + "; ".join(ACCEPTED_SHAPES)
        ]
    )


def _read_prompt_style(record: Mapping[str, Any]) -> _Draft:
    """Shapes 1 and 3: our own dicts and flat CounterFact (whose names are the second of each key pair)."""
    draft = _Draft()
    target_true = _target(
        _pick(record, "target_true", ("target_true", "ground_truth"), draft, None), "target_true", draft
    )
    neighborhood_keys = ("neighborhood_target", "locality_ground_truth")
    draft.values = {
        "prompt": record.get("prompt", _MISSING),
        "subject": record.get("subject", _MISSING),
        "target_new": _target(record.get("target_new", _MISSING), "target_new", draft),
        "target_true": target_true,
        "case_id": record.get("case_id"),
        "paraphrase_prompts": _pick(
            record, "paraphrase_prompts", ("paraphrase_prompts", "rephrase_prompt"), draft, ()
        ),
        "neighborhood_prompts": _pick(
            record, "neighborhood_prompts", ("neighborhood_prompts", "locality_prompt"), draft, ()
        ),
        "neighborhood_target": _target(
            _pick(record, "neighborhood_target", neighborhood_keys, draft, target_true),
            "neighborhood_target",
            draft,
        ),
        "generation_prompts": record.get("generation_prompts", ()),
    }
    _template_from_prompt(draft)
    return draft


def _read_full_counterfact(record: Mapping[str, Any], where: str) -> _Draft:
    """Shape 2: `{case_id, requested_rewrite: {...}, paraphrase_prompts, neighborhood_prompts, ...}`."""
    rewrite = record["requested_rewrite"]
    if not isinstance(rewrite, Mapping):
        raise EditRequestError(
            [
                f"{where}: field 'requested_rewrite': expected a mapping with 'prompt', 'subject', 'target_new', "
                f"got {type(rewrite).__name__}"
            ]
        )
    draft = _Draft(
        sources={
            "prompt": "requested_rewrite.prompt",
            "subject": "requested_rewrite.subject",
            "target_new": "requested_rewrite.target_new",
            "target_true": "requested_rewrite.target_true",
            "neighborhood_target": "requested_rewrite.target_true",
        }
    )
    target_true = _target(rewrite.get("target_true"), "target_true", draft)
    draft.values = {
        "prompt": rewrite.get("prompt", _MISSING),
        "subject": rewrite.get("subject", _MISSING),
        "target_new": _target(rewrite.get("target_new", _MISSING), "target_new", draft),
        "target_true": target_true,
        "case_id": record.get("case_id"),
        "paraphrase_prompts": record.get("paraphrase_prompts", ()),
        "neighborhood_prompts": record.get("neighborhood_prompts", ()),
        "neighborhood_target": target_true,
        "generation_prompts": record.get("generation_prompts", ()),
    }
    _template_from_prompt(draft)
    return draft


def _read_zsre(record: Mapping[str, Any], index: int, zsre_target: ZsreTarget) -> _Draft:
    """Shape 4: `{subject, src, answers, alt, rephrase, loc, loc_ans}`; the `pred` and `cond` keys are unused."""
    edits_alt = zsre_target == "alt"
    draft = _Draft(
        sources={
            "prompt": "src",
            "target_new": "alt" if edits_alt else "answers[0]",
            "target_true": "answers[0]",
            "paraphrase_prompts": "rephrase",
            "neighborhood_prompts": "loc",
            "neighborhood_target": "loc_ans",
        }
    )
    answer = _first_answer(
        record.get("answers", _MISSING), "target_true" if edits_alt else "target_new", draft
    )
    draft.values = {
        "prompt": record.get("src", _MISSING),
        "subject": record.get("subject", _MISSING),
        "target_new": record.get("alt", _MISSING) if edits_alt else answer,
        "target_true": answer if edits_alt else None,
        "case_id": record.get("case_id", index),
        "paraphrase_prompts": _single_prompt("rephrase", record.get("rephrase", ())),
        "neighborhood_prompts": _single_prompt("loc", record.get("loc", ())),
        "neighborhood_target": record.get("loc_ans"),
        "generation_prompts": (),
    }
    _template_from_prompt(draft)
    return draft


def _first_answer(answers: Any, name: str, draft: _Draft) -> Any:
    """`answers[0]` of a ZsRE record, or a problem on `name` when `answers` is not a non-empty list."""
    if isinstance(answers, list | tuple) and answers:
        return answers[0]
    draft.sources[name] = "answers"
    if answers is _MISSING:
        return _MISSING
    draft.problems.append((name, f"expected a non-empty list of answer strings, got {answers!r}"))
    return None


def _pick(record: Mapping[str, Any], name: str, keys: tuple[str, ...], draft: _Draft, default: Any) -> Any:
    """The value of the one key among `keys` that the record has (a problem if it has several)."""
    present = [key for key in keys if key in record]
    if not present:
        return default
    draft.sources[name] = present[0]
    if len(present) > 1:
        draft.problems.append((name, f"both {present[0]!r} and {present[1]!r} are given; keep only one"))
    return _single_prompt(present[0], record[present[0]])


def _single_prompt(key: str, value: Any) -> Any:
    """Wrap the string value of a one-prompt key (`rephrase_prompt`, `loc`, ...) into a one-element tuple."""
    return (value,) if key in _SINGLE_PROMPT_KEYS and isinstance(value, str) else value


def _target(value: Any, name: str, draft: _Draft) -> Any:
    """Unwrap CounterFact's `{"str": ..., "id": ...}` target dicts; other values pass unchanged."""
    if not isinstance(value, Mapping):
        return value
    if "str" in value:
        return value["str"]
    draft.problems.append((name, f"a target given as a mapping needs a 'str' key, got keys {sorted(value)}"))
    return None


def _template_from_prompt(draft: _Draft) -> None:
    """Turn a prompt that contains the subject literally into a template (first occurrence -> `{}`)."""
    prompt, subject = draft.values["prompt"], draft.values["subject"]
    if not (isinstance(prompt, str) and isinstance(subject, str)):
        return
    if "{}" in prompt or not prompt.strip() or not subject.strip():
        return
    if subject in prompt:
        draft.values["prompt"] = prompt.replace(subject, "{}", 1)
        return
    draft.problems.append(
        (
            "prompt",
            f"subject {subject!r} not found in prompt {prompt!r}; put '{{}}' where the subject goes or fix 'subject'",
        )
    )


def _normalised(values: dict[str, Any]) -> dict[str, Any]:
    """Drop one leading space from string targets and turn prompt lists into tuples."""
    normal = dict(values)
    for name in TARGET_FIELDS:
        value = normal.get(name)
        if isinstance(value, str) and value.startswith(" "):
            normal[name] = value[1:]
    for name in PROMPT_LIST_FIELDS:
        if isinstance(normal.get(name), list):
            normal[name] = tuple(normal[name])
    return normal


def _field_problems(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """`(field, message)` for every problem of a normalised set of `EditRequest` field values."""
    problems = [
        (name, message)
        for name in ("prompt", "subject", "target_new")
        for message in _text_problems(values[name])
    ]
    problems += [
        (name, message)
        for name in ("target_true", "neighborhood_target")
        if values[name] is not None
        for message in _text_problems(values[name])
    ]
    problems += [(name, message) for name in TARGET_FIELDS for message in _spacing_problems(values[name])]
    problems += [
        (name, message) for name in PROMPT_LIST_FIELDS for message in _prompt_list_problems(values[name])
    ]
    problems += [("prompt", message) for message in _template_problems(values["prompt"])]
    problems += [("case_id", message) for message in _case_id_problems(values["case_id"])]
    problems += _consistency_problems(values)
    return problems


def _text_problems(value: Any) -> list[str]:
    if value is _MISSING:
        return ["missing required field; add it"]
    if not isinstance(value, str):
        return [f"expected a string, got {type(value).__name__} {value!r}"]
    if not value.strip():
        return [f"{value!r} is empty or whitespace only; give a non-empty string"]
    return []


def _spacing_problems(value: Any) -> list[str]:
    if isinstance(value, str) and value.strip() and value[0].isspace():
        return [
            f"target {value!r} still starts with whitespace after dropping one leading space; remove it "
            "(one space is added at tokenisation time)"
        ]
    return []


def _prompt_list_problems(value: Any) -> list[str]:
    if not isinstance(value, tuple):
        hint = "; wrap a single prompt in a list" if isinstance(value, str) else ""
        return [f"expected a list of strings, got {type(value).__name__}{hint}"]
    problems = []
    for position, prompt in enumerate(value):
        if not isinstance(prompt, str):
            problems.append(f"item {position}: expected a string, got {type(prompt).__name__} {prompt!r}")
        elif not prompt.strip():
            problems.append(f"item {position} is empty or whitespace only; remove it")
    return problems


def _template_problems(prompt: Any) -> list[str]:
    if not isinstance(prompt, str) or not prompt.strip():
        return []
    placeholders = prompt.count("{}")
    if placeholders == 0:
        return [f"template {prompt!r} has no '{{}}'; put '{{}}' where the subject goes"]
    if placeholders > 1:
        return [f"template {prompt!r} has {placeholders} '{{}}'; keep exactly one, where the subject goes"]
    rest = prompt.replace("{}", "", 1)
    if "{" in rest or "}" in rest:
        return [
            f"template {prompt!r} has braces besides its one '{{}}', which would break str.format; remove them"
        ]
    return []


def _case_id_problems(case_id: Any) -> list[str]:
    if case_id is None or (isinstance(case_id, int | str) and not isinstance(case_id, bool)):
        return []
    return [f"expected an int, a string or nothing, got {type(case_id).__name__} {case_id!r}"]


def _consistency_problems(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    problems = []
    target_new, target_true = values["target_new"], values["target_true"]
    if isinstance(target_new, str) and target_new.strip() and target_new == target_true:
        problems.append(
            ("target_new", f"{target_new!r} equals target_true: nothing to edit; choose another target_new")
        )
    if values["neighborhood_prompts"] and values["neighborhood_target"] is None:
        problems.append(
            (
                "neighborhood_target",
                "neighborhood prompts are given but no target to score them against; "
                "set 'neighborhood_target' (usually the true object)",
            )
        )
    return problems


def contradicts(request: EditRequest, other: EditRequest) -> bool:
    """Whether the two requests may not share a batch: the same template and subject, different `target_new`."""
    return (request.prompt, request.subject) == (other.prompt, other.subject) and request.target_new != other.target_new


def _conflicts(requests: Sequence[tuple[int, EditRequest]]) -> list[str]:
    """One line per request that contradicts the first with its template and subject."""
    first: dict[tuple[str, str], tuple[int, EditRequest]] = {}
    problems = []
    for index, request in requests:
        first_index, first_request = first.setdefault((request.prompt, request.subject), (index, request))
        if contradicts(request, first_request):
            problems.append(
                f"{_where(first_index, first_request.case_id)} and {_where(index, request.case_id)}: "
                f"field 'target_new': conflicting targets {first_request.target_new!r} and {request.target_new!r} "
                f"for subject {request.subject!r} in template {request.prompt!r}; put them in different batches "
                "or drop one"
            )
    return problems


def _where(index: int | None, case_id: Any, prefix: str = "record") -> str:
    label = prefix if index is None else f"{prefix} {index}"
    return label if case_id is None else f"{label} (case_id {case_id!r})"


def _format(where: str, name: str, message: str, sources: Mapping[str, str]) -> str:
    return f"{where}: field {sources.get(name, name)!r}: {message}"
