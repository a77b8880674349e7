"""The Space demo (hf_alphaedit.demo, spaces/alphaedit-demo) in-process, driven with gradio_client on a tiny model;
its card, its publishing to the local Hub and the `demo` command line."""

from __future__ import annotations

import time
import zipfile
from importlib.metadata import version
from pathlib import Path

import gradio
import pytest
import torch
import yaml
from gradio_client import Client
from huggingface_hub import SpaceCard
from safetensors.torch import load_file

from hf_alphaedit import AlphaEditModel
from hf_alphaedit.cli import COMMANDS, DemoCommandArguments, UsageError, main, parse_command
from hf_alphaedit.demo import SPACE_FOLDER, DemoInputError, DemoLimits, EditingSession, check_space_card
from hf_alphaedit.demo.space import PACKAGE_REQUIREMENT, SPACE_FILES
from hf_alphaedit.demo.ui import build_demo
from tests.test_engine import _args, _scaled_model
from tests.tiny_models import tiny_tokenizer

EDITED_LAYERS = (1, 2)
FACT = ("{} is located in", "The tower", "Rome", "Paris", "The tower stands in", "The bridge is in")


@pytest.fixture
def tiny_session(corpus):
    """`make(**limits) -> EditingSession` on a fresh tiny model editing layers 1 and 2."""

    def make(**limits) -> EditingSession:
        model = AlphaEditModel(_scaled_model(), tiny_tokenizer(), _args(corpus, layers=list(EDITED_LAYERS)))
        return EditingSession(model, DemoLimits(**{"answer_tokens": 4, **limits}))

    return make


@pytest.fixture
def served(tiny_session):
    """`serve(**limits) -> (session, url)`: the page of a tiny-model session, served in-process until the test ends."""
    demos = []

    def serve(**limits) -> tuple[EditingSession, str]:
        session = tiny_session(**limits)
        demo = build_demo(session)
        demos.append(demo)
        _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
        return session, url

    yield serve
    for demo in demos:
        demo.close()


def _wait_until(condition, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the Space did not reach the expected state"
        time.sleep(0.1)


def _weights(model: AlphaEditModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.model.state_dict().items()}


# -- the Space folder ------------------------------------------------------------------------------------------


def test_space_card_validates_and_pins_the_tested_gradio(hub_api):
    assert check_space_card(SPACE_FOLDER) == []
    card = SpaceCard.load(SPACE_FOLDER / "README.md")
    assert card.data.sdk_version == gradio.__version__
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in card.data.models
    assert card.data.get("suggested_hardware") == "cpu-upgrade"
    card.validate(repo_type="space")  # the Hub's own YAML check (the local emulator)
    assert "The model is shared" in card.text
    assert PACKAGE_REQUIREMENT in (SPACE_FOLDER / "requirements.txt").read_text().split()
    assert all((SPACE_FOLDER / name).is_file() for name in SPACE_FILES)


def test_space_settings_file_holds_only_flags_of_the_demo_command():
    parsed = parse_command(COMMANDS["demo"], ["--config", str(SPACE_FOLDER / "demo.yaml")])
    settings = yaml.safe_load((SPACE_FOLDER / "demo.yaml").read_text())
    assert parsed[DemoLimits].max_input_tokens == settings["max_input_tokens"]
    assert parsed[DemoLimits].allow_push is False
    assert parsed[DemoCommandArguments].push_to_hub is None and parsed[DemoCommandArguments].host is None


def test_check_space_card_names_every_problem(tmp_path):
    (tmp_path / "README.md").write_text(
        "---\nsdk: streamlit\nsdk_version: latest\napp_file: main.py\nmodels: [SmolLM2]\n"
        "suggested_hardware: gpu-please\nshort_description: " + "x" * 61 + "\n---\n# broken\n")
    problems = "\n".join(check_space_card(tmp_path))
    for field in ("sdk:", "sdk_version:", "app_file:", "models:", "datasets:", "suggested_hardware:",
                  "short_description:"):
        assert field in problems
    assert "cpu-upgrade" in problems  # the error lists the hardware the Hub offers


def test_demo_publishes_the_space_to_the_hub(hub_api, unique_repo_id, capsys):
    repo_id = unique_repo_id("alphaedit-demo")
    assert main(["demo", "--push_to_hub", repo_id]) == 0
    assert repo_id in capsys.readouterr().out
    info = hub_api.space_info(repo_id)
    assert info.sdk == "gradio"
    assert info.card_data.sdk_version == gradio.__version__ and info.card_data.models
    assert sorted(hub_api.list_repo_files(repo_id, repo_type="space")) == sorted([".gitattributes", *SPACE_FILES])
    requirements = Path(hub_api.hf_hub_download(repo_id, "requirements.txt", repo_type="space")).read_text()
    assert requirements.split() == [f"{PACKAGE_REQUIREMENT}=={version('hf-alphaedit')}"]


def test_demo_command_line_errors_name_the_flag(capsys):
    assert main(["demo", "--push_to_hub", "not-a-repo-id"]) == 2
    assert "--push_to_hub 'not-a-repo-id'" in capsys.readouterr().err
    assert main(["demo", "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err
    assert main(["demo", "--max_queue_size", "0"]) == 2
    assert "DemoLimits.max_queue_size=0" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--push_to_hub"):
        DemoCommandArguments(push_to_hub=True)
    # A config file shared with `edit` (where push_to_hub is a switch) may say `push_to_hub: false`.
    assert DemoCommandArguments(push_to_hub=False).push_to_hub is None
    quickstart = parse_command(COMMANDS["demo"], ["--config", "examples/configs/quickstart.yaml"])
    assert quickstart[DemoCommandArguments].push_to_hub is None


# -- the session ----------------------------------------------------------------------------------------------


def test_input_limit_counts_tokens_and_names_the_field(tiny_session):
    session = tiny_session(max_input_tokens=8)
    assert session.input_problems({"subject": "The tower"}) == {}
    problems = session.input_problems({"subject": "The tower " * 10, "question": "word " * 100_000})
    assert problems["subject"].startswith("subject: ") and "at most 8 tokens" in problems["subject"]
    assert "tokens is too long" in problems["subject"]
    assert problems["question"].startswith("question: 500,000 characters is far too long")
    with pytest.raises(DemoInputError, match="target_new: .* at most 8 tokens"):
        session.edit("{} is in", "The tower", "a very long answer " * 5)
    assert session.model.state.num_edits == 0
    with pytest.raises(ValueError, match="DemoLimits.answer_seconds"):
        DemoLimits(answer_seconds=0)


def test_answer_seconds_stops_generation(tiny_session):
    unbounded = tiny_session(answer_tokens=8).ask("The tower is")
    bounded = tiny_session(answer_tokens=8, answer_seconds=1e-6).ask("The tower is")
    count = len(tiny_tokenizer()(unbounded, add_special_tokens=False)["input_ids"])
    assert count > 1 and unbounded.startswith(bounded) and len(bounded) < len(unbounded)


def test_undo_takes_back_only_your_own_latest_edit(tiny_session):
    session = tiny_session()
    original = _weights(session.model)
    session.edit(*FACT, owner="anna")
    after_anna = _weights(session.model)
    session.edit("{} was made by", "The phone", "Nokia", owner="ben")
    assert [row["yours"] for row in session.history("anna")] == [True, False]
    with pytest.raises(DemoInputError, match="Someone edited the shared model after your last edit"):
        session.undo("anna")
    with pytest.raises(DemoInputError, match="you have no edit"):
        session.undo("carl")
    assert session.undo("ben") == [{"prompt": FACT[0], "subject": FACT[1], "target_new": FACT[2], "yours": False}]
    for key, value in session.model.model.state_dict().items():
        torch.testing.assert_close(value, after_anna[key], rtol=0, atol=1e-6)
    assert session.undo("anna") == []
    for key, value in session.model.model.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=1e-6)


def test_edit_reports_answers_probabilities_and_room(tiny_session):
    session = tiny_session()
    outcome = session.edit(*FACT, owner="anna")
    assert [(a.kind, a.prompt) for a in outcome.answers] == [
        ("edited prompt", "The tower is located in"), ("paraphrase", "The tower stands in"),
        ("neighbour", "The bridge is in")]
    assert [(p.target, p.role) for p in outcome.probabilities] == [("Rome", "new"), ("Paris", "old")]
    assert all(0.0 < p.before < 1.0 and 0.0 < p.after < 1.0 for p in outcome.probabilities)
    assert outcome.probabilities[0].after != outcome.probabilities[0].before  # the edit moved the new answer
    assert outcome.report()["probabilities"]["Rome (new)"]["before"] == float(f"{outcome.probabilities[0].before:.3g}")
    room = session.null_space_room()
    assert [(r.layer, r.num_keys, r.used) for r in room] == [(1, 1, 1), (2, 1, 1)]
    assert all(r.left == r.null_space_dim - 1 for r in room)


# -- the page through gradio_client ----------------------------------------------------------------------------


def test_page_edits_undoes_and_resets_through_gradio_client(served):
    session, url = served(max_edits=2)
    model = session.model
    original = _weights(model)
    client = Client(url, verbose=False)
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/edit", "/ask", "/undo", "/reset", "/history", "/room", "/download_lora", "/push"} <= set(endpoints)

    answers, chart, report, room = client.predict(*FACT, api_name="/edit")
    assert [row[0] for row in answers["data"]] == ["edited prompt", "paraphrase", "neighbour"]
    assert [row[:3:2] for row in chart["data"]] == [["new: Rome, before", "before"], ["new: Rome, after", "after"],
                                                    ["old: Paris, before", "before"], ["old: Paris, after", "after"]]
    assert report["edits_applied"] == 1 and set(report["probabilities"]) == {"Rome (new)", "Paris (old)"}
    assert [row[:4] for row in room["data"]] == [[1, session.null_space_room()[0].null_space_dim, 1, 1],
                                                 [2, session.null_space_room()[1].null_space_dim, 1, 1]]
    changed = {k for k, v in model.model.state_dict().items() if not torch.equal(v, original[k])}
    assert changed == {f"model.layers.{layer}.mlp.down_proj.weight" for layer in EDITED_LAYERS}
    assert client.predict(api_name="/history") == [
        {"prompt": FACT[0], "subject": FACT[1], "target_new": FACT[2], "yours": True}]
    edited = _weights(model)

    # Bad input: the request's own error reaches the client, and nothing changes.
    with pytest.raises(Exception, match="subject"):
        client.predict("Paris is nice", "The tower", "Rome", "", "", "", api_name="/edit")
    assert all(torch.equal(v, edited[k]) for k, v in model.model.state_dict().items())
    assert isinstance(client.predict("The tower is", api_name="/ask"), str)

    client.predict("{} was made by", "The phone", "Nokia", "", "", "", api_name="/edit")
    with pytest.raises(Exception, match="carries 2 edits, the most this Space keeps"):
        client.predict("{} speaks", "Anna", "French", "", "", "", api_name="/edit")

    assert client.predict(api_name="/undo") == [
        {"prompt": FACT[0], "subject": FACT[1], "target_new": FACT[2], "yours": True}]
    for key, value in model.model.state_dict().items():
        torch.testing.assert_close(value, edited[key], rtol=0, atol=1e-6)
    assert client.predict(api_name="/reset") == []
    for key, value in model.model.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=1e-6)
    with pytest.raises(Exception, match="Nothing to undo"):
        client.predict(api_name="/undo")


def test_browser_sessions_keep_their_own_undo(served):
    session, url = served()
    anna, ben = Client(url, verbose=False), Client(url, verbose=False)
    anna.predict(*FACT, api_name="/edit")
    ben.predict("{} was made by", "The phone", "Nokia", "", "", "", api_name="/edit")
    assert [row["yours"] for row in anna.predict(api_name="/history")] == [True, False]
    with pytest.raises(Exception, match="Someone edited the shared model after your last edit"):
        anna.predict(api_name="/undo")
    assert [row["subject"] for row in ben.predict(api_name="/undo")] == ["The tower"]
    assert anna.predict(api_name="/undo") == [] and session.model.state.num_edits == 0


def test_oversized_request_is_refused_without_running_the_model(served):
    """Issue 13: a 200,000-word /ask used to keep the server busy for minutes while others waited. Now it is
    refused with a message naming the field and the limit in tokens, without tokenizing it or touching the
    model, and the next visitor's request is answered."""
    session, url = served()
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match=r"question: 1,000,003 characters is far too long.*at most 48 tokens"):
        client.submit("word " * 200_000 + "end", api_name="/ask").result(timeout=60)
    with pytest.raises(Exception, match="subject: .* tokens is too long; this Space takes at most 48 tokens"):
        client.submit("{} is in", " ".join(f"w{i}" for i in range(60)), "Rome", "", "", "",
                      api_name="/edit").result(timeout=60)
    assert session.model.state.num_edits == 0
    assert isinstance(Client(url, verbose=False).submit("The tower is", api_name="/ask").result(timeout=60), str)


def test_queue_is_bounded(served):
    from gradio_client.utils import QueueError, Status

    session, url = served(max_queue_size=2)
    client = Client(url, verbose=False)
    with session.lock:  # the first request holds the model; two may wait; the rest are turned away
        running = client.submit("The tower is", api_name="/ask")
        _wait_until(lambda: running.status().code == Status.PROCESSING)
        others = [client.submit(f"The tower {i} is", api_name="/ask") for i in range(4)]
        _wait_until(lambda: all(job.done() or job.status().code == Status.IN_QUEUE for job in others))
    answered, refused = [], []
    for job in [running, *others]:
        try:
            answered.append(job.result(timeout=60))
        except QueueError as error:
            refused.append(str(error))
    assert len(answered) == 3 and all(isinstance(answer, str) for answer in answered)
    assert len(refused) == 2 and "Queue is full" in refused[0]


def test_lora_download_is_the_models_accumulated_update(served, tmp_path):
    session, url = served()
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="Nothing to download"):
        client.predict(api_name="/download_lora")
    client.predict(*FACT, api_name="/edit")
    client.predict("{} was made by", "The phone", "Nokia", "", "", "", api_name="/edit")
    archive = client.predict(api_name="/download_lora")
    with zipfile.ZipFile(archive) as opened:
        opened.extractall(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in tmp_path.iterdir()}
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    for layer in EDITED_LAYERS:
        prefix = f"base_model.model.model.layers.{layer}.mlp.down_proj"
        update = tensors[f"{prefix}.lora_B.weight"] @ tensors[f"{prefix}.lora_A.weight"]
        torch.testing.assert_close(update, session.model.state.accumulated_delta(layer), rtol=1e-5, atol=1e-6)


def test_push_is_off_by_default_and_uses_the_visitors_token(served, hub_api, unique_repo_id):
    session, url = served()
    client = Client(url, verbose=False)
    client.predict(*FACT, api_name="/edit")
    repo_id = unique_repo_id("demo-push")
    with pytest.raises(Exception, match="Pushing is turned off on this Space"):
        client.predict(repo_id, "hf_token", api_name="/push")

    session, url = served(allow_push=True)
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="Nothing to push"):
        client.predict(repo_id, "hf_token", api_name="/push")
    client.predict(*FACT, api_name="/edit")
    with pytest.raises(Exception, match="repo_id 'no-namespace'"):
        client.predict("no-namespace", "hf_token", api_name="/push")
    with pytest.raises(Exception, match="token: paste a Hugging Face token"):
        client.predict(repo_id, " ", api_name="/push")
    assert repo_id in client.predict(repo_id, "hf_visitor_token", api_name="/push")
    files = hub_api.list_repo_files(repo_id)
    assert {"model.safetensors", "edit_log.jsonl", "README.md"} <= set(files)


@pytest.mark.slow
def test_edit_on_smollm2_moves_the_probabilities_and_spares_the_neighbour(smollm2_editor):
    """What the page shows on the real model: the new answer becomes likely, the old one unlikely, the paraphrase
    follows the edit and the unrelated neighbour's answer stays as it was."""
    session = EditingSession(smollm2_editor(), DemoLimits(answer_seconds=600))  # compare answers, not the clock
    outcome = session.edit("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris",
                           "The Eiffel Tower stands in the city of", "The Colosseum is located in the city of")
    new, old = outcome.probabilities
    assert new.before < 0.1 < 0.5 < new.after and old.after < 0.1 < 0.5 < old.before
    edited, paraphrase, neighbour = outcome.answers
    assert "Paris" in edited.before and edited.after.startswith("Rome")
    assert paraphrase.after.startswith("Rome")
    assert neighbour.after == neighbour.before
    assert [room.used for room in session.null_space_room()] == [1] * 5
    session.reset()
