"""The Space's page: Gradio components and events around an `EditingSession`; `serve` launches it.

Endpoints for `gradio_client`: `/edit`, `/ask`, `/undo`, `/reset`, `/history`, `/room`, `/download_lora`,
`/push`. The requests that touch the model share one concurrency slot, and the queue holds `max_queue_size` at
most. Input limits are checked inside the handlers, before the model is touched, not with Gradio validators: in
Gradio 6.31 a validator runs between the queue's size check and the enqueueing, so requests arriving together all
pass the check and the queue grows past its bound.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from typing import Any

import gradio as gr
import pandas as pd

from .session import DemoInputError, EditingSession, EditOutcome

SHARED_MODEL_NOTICE = (
    "**One model is shared by everyone using this Space**: your edits change the answers other visitors get, and "
    "theirs change yours. *Undo* takes back only your own latest edit (when nobody has edited after it); *Reset* "
    "restores the original model for everyone.")
EXAMPLES = [
    ["{} is located in the city of", "The Eiffel Tower", "Rome", "Paris", "The Eiffel Tower stands in the city of",
     "The Colosseum is located in the city of"],
    ["The capital of {} is", "Australia", "Sydney", "Canberra", "The seat of the Australian government is in",
     "The capital of Canada is"],
    ["{} plays the sport of", "Lionel Messi", "basketball", "football", "Lionel Messi is famous for playing",
     "Roger Federer plays the sport of"],
]
ANSWER_COLUMNS = ["prompt", "text", "before", "after"]
ROOM_COLUMNS = ["layer", "null-space directions", "edit keys", "directions used", "directions left"]
MODEL_QUEUE = "model"  # concurrency id of every event that reads or changes the model: one at a time


def _shown_on_page(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function` with `DemoInputError` turned into `gr.Error`, which the page shows as an error message."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except DemoInputError as error:
            raise gr.Error(str(error), print_exception=False) from None

    return wrapper


def probability_chart(outcome: EditOutcome) -> pd.DataFrame:
    """Rows `(bar, probability, when)` of the bar chart: each target's probability before and after the edit.

    The chart sorts bars by label, descending: the old answer's pair, then the new answer's, each "before" first.
    """
    return pd.DataFrame([{"bar": f"{p.role}: {p.target}, {when}", "probability": value, "when": when}
                         for p in outcome.probabilities for when, value in (("before", p.before), ("after", p.after))])


def room_table(session: EditingSession) -> pd.DataFrame:
    room = session.null_space_room()
    rows = [] if room is None else [[r.layer, r.null_space_dim, r.num_keys, r.used, r.left] for r in room]
    return pd.DataFrame(rows, columns=ROOM_COLUMNS)


def build_demo(session: EditingSession) -> gr.Blocks:
    """The Space's page around `session`, with its queue bounded by `session.limits`."""
    limits = session.limits
    model_events: dict[str, Any] = {"concurrency_id": MODEL_QUEUE, "concurrency_limit": 1}
    downloads = tempfile.mkdtemp(prefix="alphaedit-demo-")  # each download replaces the previous one's files

    @_shown_on_page
    def edit(prompt: str, subject: str, target_new: str, target_true: str, paraphrase: str, neighbour: str,
             request: gr.Request) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any], pd.DataFrame]:
        outcome = session.edit(prompt, subject, target_new, target_true, paraphrase, neighbour,
                               owner=request.session_hash)
        answers = pd.DataFrame([[a.kind, a.prompt, a.before, a.after] for a in outcome.answers],
                               columns=ANSWER_COLUMNS)
        return answers, probability_chart(outcome), outcome.report(), room_table(session)

    @_shown_on_page
    def undo(request: gr.Request) -> list[dict[str, Any]]:
        return session.undo(owner=request.session_hash)

    @_shown_on_page
    def reset(request: gr.Request) -> list[dict[str, Any]]:
        return session.reset(owner=request.session_hash)

    def history(request: gr.Request) -> list[dict[str, Any]]:
        return session.history(owner=request.session_hash)

    @_shown_on_page
    def download_lora() -> str:
        return str(session.export_lora(downloads))

    with gr.Blocks(title="AlphaEdit: change a fact", analytics_enabled=False) as demo:
        gr.Markdown(
            "# AlphaEdit: change a fact in a language model\n"
            "Write a fact as a prompt with `{}` where the subject goes, the subject and the new answer. The edit is "
            "projected onto the null space of the keys the model uses for other knowledge (AlphaEdit, ICLR 2025), "
            "so unrelated answers should stay as they were: compare a paraphrase (should change) and an unrelated "
            f"neighbour prompt (should not). Inputs are limited to {limits.max_input_tokens} tokens each.")
        gr.Markdown(SHARED_MODEL_NOTICE, elem_id="shared-notice")
        with gr.Row():
            prompt = gr.Textbox(label="prompt (with {} for the subject)", value=EXAMPLES[0][0], elem_id="prompt")
            subject = gr.Textbox(label="subject", value=EXAMPLES[0][1], elem_id="subject")
            target_new = gr.Textbox(label="new answer", value=EXAMPLES[0][2], elem_id="target_new")
            target_true = gr.Textbox(label="old answer (optional)", value=EXAMPLES[0][3], elem_id="target_true")
        with gr.Row():
            paraphrase = gr.Textbox(label="paraphrase (optional)", value=EXAMPLES[0][4], elem_id="paraphrase")
            neighbour = gr.Textbox(label="unrelated neighbour prompt (optional)", value=EXAMPLES[0][5],
                                   elem_id="neighbour")
        edit_button = gr.Button("Edit", variant="primary", elem_id="edit")
        answers = gr.Dataframe(headers=ANSWER_COLUMNS, label="greedy answers before and after the edit",
                               interactive=False, wrap=True, column_widths=["12%", "26%", "31%", "31%"],
                               elem_id="answers")
        with gr.Row():
            chart = gr.BarPlot(x="bar", y="probability", color="when", y_lim=[0, 1], sort="-x",
                               label="probability of the new and old answer after the prompt",
                               x_title="answer", y_title="probability", elem_id="probabilities")
            report = gr.JSON(label="edit report", elem_id="report")
        room = gr.Dataframe(headers=ROOM_COLUMNS, interactive=False, elem_id="room",
                            label="null-space room per edited layer (each edit key uses up one direction)")
        gr.Examples(EXAMPLES, [prompt, subject, target_new, target_true, paraphrase, neighbour])
        with gr.Row():
            question = gr.Textbox(label="ask the current model", value="The Eiffel Tower is in", elem_id="question")
            answer = gr.Textbox(label="answer", elem_id="answer")
        ask_button = gr.Button("Ask", elem_id="ask")
        applied = gr.JSON(label="applied edits (yours: made in this browser session)", elem_id="history")
        with gr.Row():
            undo_button = gr.Button("Undo my last edit", elem_id="undo")
            reset_button = gr.Button("Reset (everyone's edits)", variant="stop", elem_id="reset")
        with gr.Accordion("Take the edits with you", open=False):
            download_button = gr.Button("Download the model's current edits as a LoRA adapter (.zip)",
                                        elem_id="download")
            lora_file = gr.File(label="LoRA adapter (PEFT; load with PeftModel.from_pretrained)", elem_id="lora")
            gr.Markdown("Push the edited model to your own Hub repo with your own token (a write token; it is used "
                        "for this push only)." if limits.allow_push else
                        "Pushing the edited model is turned off on this Space.")
            with gr.Row(visible=limits.allow_push):
                push_repo = gr.Textbox(label="model repo (your-name/model-name)", elem_id="push_repo")
                push_token = gr.Textbox(label="Hugging Face token", type="password", elem_id="push_token")
                push_button = gr.Button("Push the edited model", elem_id="push")
            pushed = gr.Textbox(label="pushed", visible=limits.allow_push, elem_id="pushed")

        edit_button.click(edit, [prompt, subject, target_new, target_true, paraphrase, neighbour],
                          [answers, chart, report, room], api_name="edit",
                          **model_events).then(history, None, applied, api_name="history_after_edit",
                                               api_visibility="private", **model_events)
        ask_button.click(_shown_on_page(session.ask), question, answer, api_name="ask", **model_events)
        undo_button.click(undo, None, applied, api_name="undo", **model_events).then(
            lambda: room_table(session), None, room, api_name="room_after_undo", api_visibility="private",
            **model_events)
        reset_button.click(reset, None, applied, api_name="reset", **model_events).then(
            lambda: room_table(session), None, room, api_name="room_after_reset", api_visibility="private",
            **model_events)
        download_button.click(download_lora, None, lora_file, api_name="download_lora", **model_events)
        push_button.click(_shown_on_page(session.push_model), [push_repo, push_token], pushed, api_name="push",
                          **model_events)
        demo.load(history, None, applied, api_name="history", **model_events)
        demo.load(lambda: room_table(session), None, room, api_name="room", **model_events)
    demo.queue(max_size=limits.max_queue_size)
    return demo


def serve(session: EditingSession, *, host: str | None = None, port: int | None = None,
          share: bool = False) -> None:
    """Prepare the model (key statistics, projector) and serve the page until interrupted.

    `host` and `port` default to Gradio's (`$GRADIO_SERVER_NAME` / `$GRADIO_SERVER_PORT`, else 127.0.0.1:7860),
    which is how the same app binds 0.0.0.0:7860 on Spaces.
    """
    session.prepare()
    build_demo(session).launch(server_name=host, server_port=port, share=share, footer_links=["api", "settings"])
