"""The gradio Space demo (spaces/alphaedit-demo) driven with gradio_client, on a tiny model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from huggingface_hub import SpaceCard

from hf_alphaedit import AlphaEditModel
from tests.test_engine import _args, _scaled_model
from tests.tiny_models import tiny_tokenizer

SPACE = Path(__file__).resolve().parents[1] / "spaces" / "alphaedit-demo"


def _load_app():
    spec = importlib.util.spec_from_file_location("alphaedit_demo_app", SPACE / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)  # defines the app; its __main__ block (loading SmolLM2) does not run
    return app


def test_space_card_names_the_app_the_model_and_a_pinned_gradio():
    card = SpaceCard.load(SPACE / "README.md")
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py" and (SPACE / "app.py").exists()
    assert card.data.sdk_version.count(".") == 2 and "HuggingFaceTB/SmolLM2-135M-Instruct" in card.data.models
    assert "hf-alphaedit" in (SPACE / "requirements.txt").read_text().split()


def test_demo_edits_undoes_and_resets_through_gradio_client(corpus, monkeypatch):
    from gradio_client import Client

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    app = _load_app()
    model = AlphaEditModel(_scaled_model(), tiny_tokenizer(), _args(corpus, layers=[1, 2]))
    original = {k: v.clone() for k, v in model.model.state_dict().items()}
    session = app.EditingSession(model, max_edits=2, answer_tokens=4)
    demo = app.build_demo(session)
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False)
        endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        assert {"/edit", "/ask", "/undo", "/reset", "/history"} <= set(endpoints)

        before, after, report = client.predict("{} is located in", "The tower", " Rome", "", api_name="/edit")
        assert isinstance(before, str) and isinstance(after, str)
        assert report["edits_applied"] == 1 and 0.0 <= report["target_probability"] <= 1.0
        changed = {k for k, v in model.model.state_dict().items() if not torch.equal(v, original[k])}
        assert changed == {f"model.layers.{layer}.mlp.down_proj.weight" for layer in (1, 2)}
        assert client.predict(api_name="/history") == [
            {"prompt": "{} is located in", "subject": "The tower", "target_new": "Rome"}]
        edited = {k: v.clone() for k, v in model.model.state_dict().items()}

        # Bad input: the request's own error reaches the client, and nothing changes.
        with pytest.raises(Exception, match="subject"):
            client.predict("Paris is nice", "The tower", "Rome", "", api_name="/edit")
        assert all(torch.equal(v, edited[k]) for k, v in model.model.state_dict().items())
        assert isinstance(client.predict("The tower is", api_name="/ask"), str)

        client.predict("{} was made by", "The phone", "Nokia", "", api_name="/edit")
        with pytest.raises(Exception, match="at most 2 edits"):
            client.predict("{} speaks", "Anna", "French", "", api_name="/edit")

        assert client.predict(api_name="/undo") == [
            {"prompt": "{} is located in", "subject": "The tower", "target_new": "Rome"}]
        for key, value in model.model.state_dict().items():
            torch.testing.assert_close(value, edited[key], rtol=0, atol=1e-6)
        assert client.predict(api_name="/reset") == []
        for key, value in model.model.state_dict().items():
            torch.testing.assert_close(value, original[key], rtol=0, atol=1e-6)
        with pytest.raises(Exception, match="Nothing to undo"):
            client.predict(api_name="/undo")
    finally:
        demo.close()
