"""The Space served as its own process (`spaces/alphaedit-demo/app.py`, i.e. `hf-alphaedit demo` with the Space's
settings) on a tiny model: driven over HTTP with gradio_client, and in headless Chromium like a visitor.

The browser test needs Debian's `chromium` and `chromium-driver` and the `selenium` package; without them it is
skipped and says which is missing (`pytest -rs` lists the reason).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from gradio_client import Client

from hf_alphaedit.evaluation import greedy_answers
from hf_alphaedit.hub import load_model_and_tokenizer
from tests.space_browser import (
    DemoPage,
    browser_unavailable,
    demo_command,
    free_port,
    headless_chromium,
    served_demo,
)
from tests.test_engine import _scaled_model
from tests.tiny_models import tiny_tokenizer

BROWSER_MISSING = browser_unavailable()
ANSWER_TOKENS = 4
FACT = {"prompt": "{} is located in", "subject": "The tower", "target_new": "Rome", "target_true": "Paris",
        "paraphrase": "The tower stands in", "neighbour": "The bridge is in"}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-space-model")
    _scaled_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served_space(tiny_model_dir, shared_data, tmp_path_factory):
    """The Space's app.py served on 127.0.0.1 (a free port) as its own process, editing layers 1-2 of the tiny
    model; yields its URL."""
    work = tmp_path_factory.mktemp("served-space")
    lines = (shared_data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()
    (work / "corpus.txt").write_text("\n".join([line for line in lines if line.strip()][:60]), encoding="utf-8")
    port = free_port()
    command = demo_command(
        "--model_name_or_path", str(tiny_model_dir), "--statistics_corpus", str(work / "corpus.txt"),
        "--statistics_samples", "60", "--statistics_cache_dir", str(work / "stats"), "--layers", "1", "2",
        "--v_num_grad_steps", "8", "--v_lr", "0.5", "--answer_tokens", str(ANSWER_TOKENS), "--quiet", "true",
        port=port)
    with served_demo(command, port, work / "demo.log", env={"HF_HUB_OFFLINE": "1"}) as url:
        yield url


def _unedited_answers(tiny_model_dir: Path, prompts: list[str]) -> list[str]:
    model, tokenizer, _ = load_model_and_tokenizer(str(tiny_model_dir))
    return greedy_answers(model, tokenizer, prompts, ANSWER_TOKENS)


def test_served_space_over_http_with_gradio_client(served_space, tiny_model_dir):
    client = Client(served_space, verbose=False)
    client.predict(api_name="/reset")
    answers, _, report, room = client.predict(*FACT.values(), api_name="/edit")
    prompts = ["The tower is located in", "The tower stands in", "The bridge is in"]
    assert [row[1] for row in answers["data"]] == prompts
    assert [row[2] for row in answers["data"]] == _unedited_answers(tiny_model_dir, prompts)
    assert report["edits_applied"] == 1
    assert [(row[0], row[2], row[3]) for row in room["data"]] == [(1, 1, 1), (2, 1, 1)]
    with pytest.raises(Exception, match="question: .* far too long; this Space takes at most 48 tokens"):
        client.predict("word " * 200_000, api_name="/ask")
    assert [row["subject"] for row in client.predict(api_name="/history")] == ["The tower"]
    assert client.predict(api_name="/undo") == []


@pytest.mark.browser
@pytest.mark.skipif(BROWSER_MISSING is not None, reason=f"browser test skipped: {BROWSER_MISSING}")
def test_space_in_headless_chromium(served_space, tiny_model_dir, tmp_path):
    Client(served_space, verbose=False).predict(api_name="/reset")
    with headless_chromium() as driver:
        page = DemoPage(driver, served_space)
        page.open()
        assert "One model is shared by everyone using this Space" in page.text("shared-notice")

        # Type a fact, press Edit, read the answers before and after from the page.
        page.fill(**FACT)
        page.click("edit")
        rows = page.wait_for(lambda: len(page.table("answers")) == 3 and page.table("answers"), "the answers")
        prompts = ["The tower is located in", "The tower stands in", "The bridge is in"]
        assert [row[:2] for row in rows] == [["edited prompt", prompts[0]], ["paraphrase", prompts[1]],
                                             ["neighbour", prompts[2]]]
        assert [row[2] for row in rows] == _unedited_answers(tiny_model_dir, prompts)
        assert all(row[3] for row in rows)
        page.wait_for(lambda: '"edits_applied":1' in "".join(page.text("report").split()), "the edit report")
        bars = page.wait_for(lambda: driver.find_elements("css selector", "#probabilities .mark-rect path"),
                             "the probability bars")
        assert len(bars) == 4  # new and old answer, before and after
        assert [row[0] for row in page.wait_for(lambda: page.table("room"), "the null-space room")] == ["1", "2"]
        page.wait_for(lambda: "The tower" in page.text("history"), "the applied edit in the history")
        page.screenshot(tmp_path / "after_edit.png")
        assert (tmp_path / "after_edit.png").stat().st_size > 10_000

        # Undo takes it back; edit again and Reset.
        page.click("undo")
        page.wait_for(lambda: "The tower" not in page.text("history"), "Undo to empty the history")
        page.click("edit")
        page.wait_for(lambda: "The tower" in page.text("history"), "the second edit")
        page.click("reset")
        page.wait_for(lambda: "The tower" not in page.text("history"), "Reset to empty the history")

        # A bad request shows its own error on the page.
        page.fill(prompt="Paris is nice")
        page.click("edit")
        page.wait_for(lambda: any("prompt" in toast and "{}" in toast for toast in page.toasts()),
                      "the bad request's error message")

        # An oversized input shows a clear message, and the page still answers the next question.
        page.fill(question="word " * 5_000)
        page.click("ask")
        page.wait_for(lambda: "question: 24,999 characters is far too long" in page.text_of_page(),
                      "the oversized question's message")
        page.fill(question="The tower is")
        page.click("ask")
        answer = page.wait_for(lambda: page.value("answer"), "the answer to a normal question")
        assert answer == _unedited_answers(tiny_model_dir, ["The tower is"])[0]
