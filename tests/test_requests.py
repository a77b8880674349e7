"""Tests for `hf_alphaedit.requests`: record adapters, validation messages, batch checks and file loading."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from hf_alphaedit.requests import (
    EditRequest,
    EditRequestError,
    as_edit_requests,
    from_record,
    load_records,
    validate_batch,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COUNTERFACT = DATA / "counterfact" / "counterfact-edit.json"
ZSRE = DATA / "zsre" / "zsre_mend_train-1k.json"
needs_data = pytest.mark.skipif(
    not (COUNTERFACT.exists() and ZSRE.exists()), reason="../shared/data not present"
)

OWN = {
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
    "case_id": 7,
    "paraphrase_prompts": ["Where is the Eiffel Tower? It is in"],
    "neighborhood_prompts": ["The Louvre is located in the city of"],
    "generation_prompts": ["The Eiffel Tower is"],
}
FULL_COUNTERFACT = {
    "case_id": 3,
    "pararel_idx": 11,
    "requested_rewrite": {
        "prompt": "The native language of {} is",
        "subject": "Jean Gabin",
        "target_new": {"str": "Dutch", "id": "Q7411"},
        "target_true": {"str": "French", "id": "Q150"},
        "relation_id": "P103",
    },
    "paraphrase_prompts": ["Jean Gabin grew up speaking", "The mother tongue of Jean Gabin is"],
    "neighborhood_prompts": ["The native language of Louis Jouvet is", "Arletty is a native speaker of"],
    "attribute_prompts": ["Vincent van Gogh speaks"],
    "generation_prompts": ["Jean Gabin was born in"],
}
FLAT_COUNTERFACT = {
    "case_id": 12,
    "prompt": "The official language of Ghana is",
    "target_new": "Swedish",
    "subject": "Ghana",
    "ground_truth": "English",
    "rephrase_prompt": "In Ghana, people officially speak",
    "locality_prompt": "The official language of Nigeria is",
    "locality_ground_truth": "English",
}
ZSRE_RECORD = {
    "subject": "Acme Corp",
    "src": "What is the product made by Acme Corp?",
    "pred": "anvil",
    "rephrase": "What does Acme Corp produce?",
    "alt": " rocket skates",
    "answers": ["anvil", "dynamite"],
    "loc": "nq question: who wrote the road runner cartoons",
    "loc_ans": "Michael Maltese",
    "cond": "anvil >> rocket skates || What is the product made by Acme Corp?",
}


def problems_of(error: pytest.ExceptionInfo[EditRequestError]) -> list[str]:
    return error.value.problems


def test_own_format() -> None:
    request = from_record(OWN)
    assert request.prompt_with_subject == "The Eiffel Tower is located in the city of"
    assert request.split_prompt() == ("", " is located in the city of")
    assert (request.target_new, request.target_true, request.case_id) == ("Rome", "Paris", 7)
    assert request.paraphrase_prompts == ("Where is the Eiffel Tower? It is in",)
    assert request.neighborhood_prompts == ("The Louvre is located in the city of",)
    assert request.neighborhood_target == "Paris"
    assert request.generation_prompts == ("The Eiffel Tower is",)


def test_own_format_minimal_and_normalised() -> None:
    request = from_record({"prompt": "The capital of {} is", "subject": "Italy", "target_new": " Milan"})
    assert request.target_new == "Milan"
    assert request.split_prompt() == ("The capital of ", " is")
    assert (request.target_true, request.case_id, request.neighborhood_target) == (None, None, None)
    assert request.paraphrase_prompts == request.neighborhood_prompts == request.generation_prompts == ()


def test_own_format_target_dicts_and_literal_subject() -> None:
    request = from_record(
        {
            "prompt": "Where is Big Ben? Big Ben is in",
            "subject": "Big Ben",
            "target_new": {"str": "Berlin", "id": "Q64"},
            "target_true": {"str": "London"},
        }
    )
    assert request.prompt == "Where is {}? Big Ben is in"
    assert request.prompt_with_subject == "Where is Big Ben? Big Ben is in"
    assert (request.target_new, request.target_true) == ("Berlin", "London")


def test_full_counterfact() -> None:
    request = from_record(FULL_COUNTERFACT)
    assert request.prompt == "The native language of {} is"
    assert request.prompt_with_subject == "The native language of Jean Gabin is"
    assert (request.subject, request.target_new, request.target_true) == ("Jean Gabin", "Dutch", "French")
    assert request.case_id == 3
    assert request.paraphrase_prompts == tuple(FULL_COUNTERFACT["paraphrase_prompts"])
    assert request.neighborhood_prompts == tuple(FULL_COUNTERFACT["neighborhood_prompts"])
    assert request.neighborhood_target == "French"
    assert request.generation_prompts == ("Jean Gabin was born in",)


def test_flat_counterfact() -> None:
    request = from_record(FLAT_COUNTERFACT)
    assert request.prompt == "The official language of {} is"
    assert request.prompt_with_subject == FLAT_COUNTERFACT["prompt"]
    assert (request.target_new, request.target_true, request.case_id) == ("Swedish", "English", 12)
    assert request.paraphrase_prompts == ("In Ghana, people officially speak",)
    assert request.neighborhood_prompts == ("The official language of Nigeria is",)
    assert request.neighborhood_target == "English"


def test_flat_counterfact_replaces_only_first_occurrence() -> None:
    record = dict(FLAT_COUNTERFACT, prompt="Ghana's neighbour of Ghana speaks", subject="Ghana")
    request = from_record(record)
    assert request.prompt == "{}'s neighbour of Ghana speaks"
    assert request.prompt_with_subject == record["prompt"]


def test_zsre_answers_default() -> None:
    request = from_record(ZSRE_RECORD, index=5)
    assert request.prompt == "What is the product made by {}?"
    assert request.prompt_with_subject == ZSRE_RECORD["src"]
    assert (request.target_new, request.target_true, request.case_id) == ("anvil", None, 5)
    assert request.paraphrase_prompts == ("What does Acme Corp produce?",)
    assert request.neighborhood_prompts == ("nq question: who wrote the road runner cartoons",)
    assert request.neighborhood_target == "Michael Maltese"


def test_zsre_alt() -> None:
    request = from_record(ZSRE_RECORD, index=5, zsre_target="alt")
    assert (request.target_new, request.target_true) == ("rocket skates", "anvil")


def test_zsre_keeps_given_case_id() -> None:
    assert from_record(dict(ZSRE_RECORD, case_id="z-1"), index=5).case_id == "z-1"


def test_bad_zsre_target_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="zsre_target"):
        from_record(ZSRE_RECORD, zsre_target="pred")  # type: ignore[arg-type]


@needs_data
def test_real_counterfact_first_50() -> None:
    records = json.loads(COUNTERFACT.read_text())[:50]
    requests = as_edit_requests(records)
    for record, request in zip(records, requests, strict=True):
        assert request.prompt.count("{}") == 1
        assert request.prompt_with_subject == record["prompt"]
        assert request.subject == record["subject"]
        assert (request.target_new, request.target_true) == (record["target_new"], record["ground_truth"])
        assert request.case_id == record["case_id"]
        assert request.paraphrase_prompts == (record["rephrase_prompt"],)
        assert request.neighborhood_prompts == (record["locality_prompt"],)
        assert request.neighborhood_target == record["locality_ground_truth"]


@needs_data
def test_real_zsre_first_50_both_targets() -> None:
    records = json.loads(ZSRE.read_text())[:50]
    official = as_edit_requests(records)
    easyedit = as_edit_requests(records, zsre_target="alt")
    for index, (record, request, alt) in enumerate(zip(records, official, easyedit, strict=True)):
        assert request.prompt_with_subject == record["src"] == alt.prompt_with_subject
        assert (request.target_new, request.target_true, request.case_id) == (
            record["answers"][0],
            None,
            index,
        )
        assert (alt.target_new, alt.target_true) == (record["alt"].removeprefix(" "), record["answers"][0])
        assert request.paraphrase_prompts == (record["rephrase"],)
        assert (request.neighborhood_prompts, request.neighborhood_target) == (
            (record["loc"],),
            record["loc_ans"],
        )


@needs_data
def test_real_files_convert_record_by_record() -> None:
    counterfact = load_records(COUNTERFACT)
    assert all(
        from_record(record, index=i).prompt_with_subject == record["prompt"]
        for i, record in enumerate(counterfact)
    )
    zsre = load_records(ZSRE)
    assert all(
        from_record(record, index=i).prompt_with_subject == record["src"] for i, record in enumerate(zsre)
    )


@needs_data
def test_real_zsre_alt_flags_exactly_the_records_with_nothing_to_edit() -> None:
    records = load_records(ZSRE)
    expected = {
        i
        for i, r in enumerate(records)
        if not r["alt"].strip() or r["alt"].removeprefix(" ") == r["answers"][0]
    }
    with pytest.raises(EditRequestError) as error:
        as_edit_requests(records, zsre_target="alt")
    flagged = {int(line.split(":")[0].removeprefix("record ")) for line in problems_of(error)}
    assert flagged == expected
    assert all("field 'alt'" in line for line in problems_of(error))


@pytest.mark.parametrize(
    ("record", "zsre_target"),
    [(OWN, "answers"), (FULL_COUNTERFACT, "answers"), (FLAT_COUNTERFACT, "answers"), (ZSRE_RECORD, "alt")],
)
def test_round_trip(record: dict, zsre_target: str) -> None:
    request = from_record(record, zsre_target=zsre_target)
    data = json.loads(json.dumps(request.to_dict()))
    assert from_record(data) == request
    assert EditRequest(**data) == request


def test_round_trip_keeps_missing_neighborhood_target() -> None:
    request = EditRequest("{} plays", "Lionel Messi", "basketball", target_true="football")
    assert request.neighborhood_target is None
    assert from_record(request.to_dict()) == request


def test_edit_request_is_frozen_hashable_and_normalised() -> None:
    request = EditRequest("{} plays", "Lionel Messi", " basketball", paraphrase_prompts=["Messi plays"])
    assert request.target_new == "basketball"
    assert request.paraphrase_prompts == ("Messi plays",)
    assert hash(request) == hash(
        EditRequest("{} plays", "Lionel Messi", "basketball", paraphrase_prompts=("Messi plays",))
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.target_new = "golf"  # type: ignore[misc]


def test_from_record_passes_edit_requests_through() -> None:
    request = EditRequest("{} plays", "Lionel Messi", "basketball")
    assert from_record(request) is request


def test_edit_request_constructor_validates() -> None:
    with pytest.raises(EditRequestError) as error:
        EditRequest("plays football", "", "football", target_true="football", case_id=4)
    lines = problems_of(error)
    assert any(line.startswith("EditRequest (case_id 4): field 'subject'") for line in lines)
    assert any("field 'prompt'" in line and "has no '{}'" in line for line in lines)
    assert any("field 'target_new'" in line and "nothing to edit" in line for line in lines)


BAD_RECORDS = [
    pytest.param({**OWN, "prompt": 5}, "'prompt'", "expected a string, got int", id="prompt-type"),
    pytest.param({**OWN, "subject": ["a"]}, "'subject'", "expected a string, got list", id="subject-type"),
    pytest.param({**OWN, "target_new": 3}, "'target_new'", "expected a string, got int", id="target-type"),
    pytest.param(
        {**OWN, "target_true": 3.5}, "'target_true'", "expected a string, got float", id="true-type"
    ),
    pytest.param(
        {**OWN, "paraphrase_prompts": "one"}, "'paraphrase_prompts'", "wrap a single prompt", id="list-str"
    ),
    pytest.param(
        {**OWN, "neighborhood_prompts": {"a": 1}}, "'neighborhood_prompts'", "expected a list", id="list"
    ),
    pytest.param(
        {**OWN, "generation_prompts": ["ok", 4]},
        "'generation_prompts'",
        "item 1: expected a string",
        id="item",
    ),
    pytest.param(
        {**OWN, "paraphrase_prompts": ["ok", " "]}, "'paraphrase_prompts'", "item 1 is empty", id="blank-item"
    ),
    pytest.param({**OWN, "subject": "  "}, "'subject'", "empty or whitespace only", id="blank-subject"),
    pytest.param({**OWN, "target_new": " "}, "'target_new'", "empty or whitespace only", id="blank-target"),
    pytest.param({**OWN, "prompt": ""}, "'prompt'", "empty or whitespace only", id="blank-prompt"),
    pytest.param(
        {**OWN, "target_new": "  Rome"}, "'target_new'", "still starts with whitespace", id="two-spaces"
    ),
    pytest.param(
        {**OWN, "prompt": "{} and {} are in"}, "'prompt'", "has 2 '{}'; keep exactly one", id="two-slots"
    ),
    pytest.param(
        {**OWN, "prompt": "{} is in {city}"}, "'prompt'", "braces besides its one '{}'", id="braces"
    ),
    pytest.param({**OWN, "prompt": "{}} is in"}, "'prompt'", "braces besides its one '{}'", id="stray-brace"),
    pytest.param({**OWN, "target_new": "Paris"}, "'target_new'", "nothing to edit", id="same-target"),
    pytest.param({**OWN, "target_new": " Paris"}, "'target_new'", "nothing to edit", id="same-after-space"),
    pytest.param({**OWN, "case_id": 1.5}, "'case_id'", "expected an int, a string or nothing", id="case-id"),
    pytest.param({**OWN, "target_new": {"id": "Q1"}}, "'target_new'", "needs a 'str' key", id="target-dict"),
    pytest.param(
        {**OWN, "ground_truth": "Paris"}, "'target_true'", "both 'target_true' and 'ground_truth'", id="alias"
    ),
    pytest.param(
        {k: v for k, v in OWN.items() if k != "target_true"},
        "'neighborhood_target'",
        "no target to score them against",
        id="no-neighborhood-target",
    ),
    pytest.param(
        {k: v for k, v in OWN.items() if k != "subject"},
        "'subject'",
        "missing required field",
        id="no-subject",
    ),
    pytest.param(
        {k: v for k, v in OWN.items() if k != "prompt"}, "'prompt'", "missing required field", id="no-prompt"
    ),
    pytest.param(
        {k: v for k, v in OWN.items() if k != "target_new"},
        "'target_new'",
        "missing required",
        id="no-target",
    ),
    pytest.param(
        {**FLAT_COUNTERFACT, "ground_truth": "Swedish"},
        "'target_new'",
        "nothing to edit",
        id="flat-same-target",
    ),
    pytest.param(
        {**FLAT_COUNTERFACT, "rephrase_prompt": 3}, "'rephrase_prompt'", "expected a list", id="flat-rephrase"
    ),
    pytest.param(
        {k: v for k, v in FLAT_COUNTERFACT.items() if k != "locality_ground_truth" and k != "ground_truth"},
        "'neighborhood_target'",
        "no target to score them against",
        id="flat-no-locality-answer",
    ),
    pytest.param(
        {**FULL_COUNTERFACT, "requested_rewrite": {**FULL_COUNTERFACT["requested_rewrite"], "subject": None}},
        "'requested_rewrite.subject'",
        "expected a string, got NoneType",
        id="full-subject",
    ),
    pytest.param(
        {**FULL_COUNTERFACT, "requested_rewrite": {"subject": "Jean Gabin", "target_new": {"str": "Dutch"}}},
        "'requested_rewrite.prompt'",
        "missing required field",
        id="full-no-prompt",
    ),
    pytest.param(
        {**FULL_COUNTERFACT, "requested_rewrite": "x"}, "'requested_rewrite'", "expected a mapping", id="full"
    ),
    pytest.param(
        {**FULL_COUNTERFACT, "paraphrase_prompts": "x"},
        "'paraphrase_prompts'",
        "expected a list",
        id="full-list",
    ),
]


@pytest.mark.parametrize(("bad", "field", "fragment"), BAD_RECORDS)
def test_bad_record_messages_name_record_and_field(bad: dict, field: str, fragment: str) -> None:
    with pytest.raises(EditRequestError) as error:
        from_record(bad, index=3)
    case_id = bad.get("case_id")
    expected_where = f"record 3 (case_id {case_id!r}): field {field}: "
    assert any(line.startswith(expected_where) and fragment in line for line in problems_of(error)), (
        problems_of(error)
    )


@pytest.mark.parametrize(
    ("bad", "zsre_target", "field", "fragment"),
    [
        ({**ZSRE_RECORD, "answers": []}, "answers", "'answers'", "non-empty list of answer strings"),
        ({**ZSRE_RECORD, "answers": "anvil"}, "alt", "'answers'", "non-empty list of answer strings"),
        ({**ZSRE_RECORD, "answers": [5]}, "answers", "'answers[0]'", "expected a string, got int"),
        (
            {k: v for k, v in ZSRE_RECORD.items() if k != "answers"},
            "answers",
            "'answers'",
            "missing required",
        ),
        ({k: v for k, v in ZSRE_RECORD.items() if k != "src"}, "answers", "'src'", "missing required field"),
        ({k: v for k, v in ZSRE_RECORD.items() if k != "alt"}, "alt", "'alt'", "missing required field"),
        ({**ZSRE_RECORD, "alt": ""}, "alt", "'alt'", "empty or whitespace only"),
        ({**ZSRE_RECORD, "alt": "anvil"}, "alt", "'alt'", "nothing to edit"),
        ({**ZSRE_RECORD, "subject": "Wile E."}, "answers", "'src'", "subject 'Wile E.' not found"),
        ({**ZSRE_RECORD, "loc_ans": None}, "answers", "'loc_ans'", "no target to score them against"),
        ({**ZSRE_RECORD, "rephrase": 4}, "answers", "'rephrase'", "expected a list of strings"),
    ],
)
def test_bad_zsre_messages(bad: dict, zsre_target: str, field: str, fragment: str) -> None:
    with pytest.raises(EditRequestError) as error:
        from_record(bad, index=8, zsre_target=zsre_target)
    assert any(
        line.startswith(f"record 8: field {field}: ") and fragment in line for line in problems_of(error)
    ), problems_of(error)


def test_subject_not_found_message_is_exact() -> None:
    record = {"case_id": 17, "prompt": "The Louvre is in", "subject": "X", "target_new": "Rome"}
    with pytest.raises(EditRequestError) as error:
        from_record(record, index=3)
    assert problems_of(error) == [
        "record 3 (case_id 17): field 'prompt': subject 'X' not found in prompt 'The Louvre is in'; "
        "put '{}' where the subject goes or fix 'subject'"
    ]


def test_one_record_lists_all_its_problems() -> None:
    bad = {**OWN, "subject": "", "target_new": 4, "case_id": [1], "generation_prompts": "x"}
    with pytest.raises(EditRequestError) as error:
        from_record(bad, index=0)
    fields_named = {line.split("field '")[1].split("'")[0] for line in problems_of(error)}
    assert fields_named == {"subject", "target_new", "case_id", "generation_prompts"}
    assert str(error.value).startswith("4 problem(s) with edit requests:\n  - record 0 (case_id [1]): field ")


def test_unknown_shape_lists_accepted_shapes() -> None:
    with pytest.raises(EditRequestError) as error:
        from_record({"question": "q", "answer": "a"}, index=2)
    (line,) = problems_of(error)
    assert line.startswith("record 2: unrecognised record with keys ['answer', 'question']")
    for shape in ("'prompt'", "requested_rewrite", "flat CounterFact", "ZsRE"):
        assert shape in line


def test_non_mapping_record() -> None:
    with pytest.raises(EditRequestError, match="record 4: expected a mapping or an EditRequest, got int"):
        from_record(5, index=4)  # type: ignore[arg-type]


def test_one_bad_record_among_good_ones_lists_only_the_bad_ones() -> None:
    records = [
        OWN,
        {**FLAT_COUNTERFACT, "subject": "Togo"},
        FULL_COUNTERFACT,
        ZSRE_RECORD,
        {**OWN, "subject": "Big Ben", "prompt": "{} {} is in"},
        7,
        EditRequest("{} plays", "Lionel Messi", "basketball"),
    ]
    with pytest.raises(EditRequestError) as error:
        as_edit_requests(records)
    lines = problems_of(error)
    assert len(lines) == 3
    assert lines[0].startswith("record 1 (case_id 12): field 'prompt': subject 'Togo' not found")
    assert lines[1].startswith("record 4 (case_id 7): field 'prompt': template '{} {} is in' has 2")
    assert lines[2].startswith("record 5: expected a mapping")


def test_as_edit_requests_accepts_single_items_and_iterables() -> None:
    request = EditRequest("{} plays", "Lionel Messi", "basketball")
    assert as_edit_requests(request) == [request]
    assert as_edit_requests(OWN) == [from_record(OWN)]
    assert as_edit_requests(iter([OWN, ZSRE_RECORD])) == [from_record(OWN), from_record(ZSRE_RECORD, index=1)]
    assert as_edit_requests([]) == []


@pytest.mark.parametrize("records", ["{} plays", 5, None])
def test_as_edit_requests_rejects_non_iterables(records: object) -> None:
    with pytest.raises(EditRequestError, match="records: expected an EditRequest, a mapping or an iterable"):
        as_edit_requests(records)  # type: ignore[arg-type]


def test_batch_conflicts_name_both_positions() -> None:
    rome = from_record(OWN)
    berlin = dataclasses.replace(rome, target_new="Berlin", case_id=9)
    other_subject = dataclasses.replace(rome, subject="The Louvre", target_new="Berlin")
    validate_batch([rome, rome, other_subject])
    with pytest.raises(EditRequestError) as error:
        validate_batch([rome, other_subject, rome, berlin])
    (line,) = problems_of(error)
    assert line.startswith(
        "record 0 (case_id 7) and record 3 (case_id 9): field 'target_new': conflicting targets"
    )
    assert "'Rome' and 'Berlin'" in line and "different batches" in line


def test_as_edit_requests_reports_record_and_batch_problems_together() -> None:
    records = [OWN, {**OWN, "target_new": "Berlin", "case_id": 8}, {**OWN, "subject": ""}]
    with pytest.raises(EditRequestError) as error:
        as_edit_requests(records)
    lines = problems_of(error)
    assert len(lines) == 2
    assert lines[0].startswith("record 2 (case_id 7): field 'subject'")
    assert lines[1].startswith("record 0 (case_id 7) and record 1 (case_id 8): field 'target_new'")


def test_validate_batch_rejects_non_requests() -> None:
    with pytest.raises(EditRequestError, match="record 1: expected an EditRequest, got dict"):
        validate_batch([from_record(OWN), OWN])  # type: ignore[list-item]


@pytest.mark.parametrize("wrapper", [None, "data", "requests"])
def test_load_json(tmp_path: Path, wrapper: str | None) -> None:
    path = tmp_path / "requests.json"
    path.write_text(json.dumps([OWN, ZSRE_RECORD] if wrapper is None else {wrapper: [OWN, ZSRE_RECORD]}))
    assert load_records(path) == [OWN, ZSRE_RECORD]
    assert load_records(str(path)) == [OWN, ZSRE_RECORD]


def test_load_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_text(json.dumps(OWN) + "\n\n" + json.dumps(FLAT_COUNTERFACT) + "\n")
    assert load_records(path) == [OWN, FLAT_COUNTERFACT]
    assert as_edit_requests(load_records(path))[1].prompt_with_subject == FLAT_COUNTERFACT["prompt"]


def test_load_jsonl_malformed_lines_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(OWN) + '\n{"prompt": "{} is",\n[1, 2]\n')
    with pytest.raises(EditRequestError) as error:
        load_records(path)
    lines = problems_of(error)
    assert len(lines) == 2
    assert lines[0].startswith(f"file {str(path)!r}, line 2: malformed JSON")
    assert lines[1] == f"file {str(path)!r}, line 3: expected a JSON object, got list"


def test_load_json_errors(tmp_path: Path) -> None:
    malformed = tmp_path / "bad.json"
    malformed.write_text('[\n{"prompt": 1},\n{oops}\n]')
    with pytest.raises(EditRequestError, match=r"bad\.json', line 3, column 2: malformed JSON"):
        load_records(malformed)
    wrong_top = tmp_path / "top.json"
    wrong_top.write_text(json.dumps({"records": []}))
    with pytest.raises(EditRequestError, match="expected a JSON list of records"):
        load_records(wrong_top)
    wrong_item = tmp_path / "item.json"
    wrong_item.write_text(json.dumps([OWN, "text"]))
    with pytest.raises(EditRequestError, match="item 1: expected a JSON object, got str"):
        load_records(wrong_item)
    with pytest.raises(EditRequestError, match=r"unsupported extension '\.csv'"):
        load_records(tmp_path / "requests.csv")
