"""AlphaEdit demo Space: change a fact in a language model and compare its answers before and after.

One shared model (SmolLM2-135M-Instruct unless `ALPHAEDIT_DEMO_MODEL` names another causal LM) is edited in place;
every edit is one AlphaEdit batch, so "Undo" takes the last one back exactly and "Reset" restores the original.
The null-space projection comes from `ALPHAEDIT_DEMO_PROJECTION` ("auto": the published key-statistics artifact if
there is one, else computed once at start-up from `ALPHAEDIT_DEMO_CORPUS`, `ALPHAEDIT_DEMO_STATISTICS_SAMPLES`
lines). Endpoints for `gradio_client`: `/edit`, `/ask`, `/undo`, `/reset`, `/history`.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import gradio as gr

from hf_alphaedit import AlphaEditModel, EditingArguments, EditRequestError
from hf_alphaedit.evaluation import greedy_answers
from hf_alphaedit.requests import as_edit_requests

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
EXAMPLES = [
    ["{} is located in the city of", "The Eiffel Tower", "Rome", "The Eiffel Tower is located in the city of"],
    ["The capital of {} is", "Australia", "Sydney", "The seat of the Australian government is in"],
    ["{} plays the sport of", "Lionel Messi", "basketball", "Lionel Messi is famous for playing"],
]


def load_model() -> AlphaEditModel:
    """The model the Space edits, configured from the environment."""
    args = EditingArguments(
        projection=os.environ.get("ALPHAEDIT_DEMO_PROJECTION", "auto"),
        statistics_corpus=os.environ.get("ALPHAEDIT_DEMO_CORPUS", "Salesforce/wikitext:wikitext-103-raw-v1"),
        statistics_samples=int(os.environ.get("ALPHAEDIT_DEMO_STATISTICS_SAMPLES", "2000")),
        disable_tqdm=True)
    return AlphaEditModel.from_pretrained(os.environ.get("ALPHAEDIT_DEMO_MODEL", DEFAULT_MODEL), editing_args=args)


class EditingSession:
    """The shared model behind the Space; one request at a time changes or reads it."""

    def __init__(self, model: AlphaEditModel, max_edits: int = 50, answer_tokens: int = 12) -> None:
        self.model = model
        self.max_edits = max_edits
        self.answer_tokens = answer_tokens
        self.lock = threading.Lock()

    def _answer(self, question: str) -> str:
        return greedy_answers(self.model.model, self.model.tokenizer, [question], self.answer_tokens)[0]

    def edit(self, prompt: str, subject: str, target_new: str, question: str) -> tuple[str, str, dict[str, Any]]:
        """Apply one edit; returns the greedy answer to `question` (default: the filled prompt) before and after,
        and a report. Bad input raises `gr.Error` and changes nothing."""
        try:
            (request,) = as_edit_requests(
                {"prompt": prompt.strip(), "subject": subject.strip(), "target_new": target_new.strip()})
        except EditRequestError as error:
            raise gr.Error(str(error)) from None
        with self.lock:
            if self.model.state.num_edits >= self.max_edits:
                raise gr.Error(f"This demo keeps at most {self.max_edits} edits; press Reset (or Undo) first.")
            question = question.strip() or request.prompt_with_subject
            before = self._answer(question)
            (report,) = self.model.edit([request]).batches
            after = self._answer(question)
            return before, after, {
                "target_probability": round(report.target_probabilities[0], 4),
                "optimisation_steps": report.target_steps[0], "seconds": round(report.seconds, 2),
                "edits_applied": self.model.state.num_edits}

    def ask(self, question: str) -> str:
        """The current model's greedy answer."""
        if not question.strip():
            raise gr.Error("question: type the beginning of a sentence for the model to complete.")
        with self.lock:
            return self._answer(question.strip())

    def undo(self) -> list[dict[str, Any]]:
        """Take the last edit back; returns the remaining history."""
        with self.lock:
            if not self.model.state.batches:
                raise gr.Error("Nothing to undo: no edit is applied.")
            self.model.revert()
            return self._history()

    def reset(self) -> list[dict[str, Any]]:
        """Undo every edit."""
        with self.lock:
            self.model.reset()
            return self._history()

    def history(self) -> list[dict[str, Any]]:
        with self.lock:
            return self._history()

    def _history(self) -> list[dict[str, Any]]:
        return [{"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new}
                for batch in self.model.state.batches for r in batch.requests]


def build_demo(session: EditingSession) -> gr.Blocks:
    with gr.Blocks(title="AlphaEdit: change a fact", analytics_enabled=False) as demo:
        gr.Markdown(
            "# AlphaEdit: change a fact in a language model\n"
            "Write a fact as a prompt with `{}` where the subject goes, the subject, and the new answer. The edit is "
            "projected onto the null space of the keys the model uses for other knowledge (AlphaEdit, ICLR 2025), "
            "so unrelated answers should stay as they were; ask anything to check. The model is shared by "
            "everyone using this Space.")
        with gr.Row():
            prompt = gr.Textbox(label="prompt (with {} for the subject)", value=EXAMPLES[0][0])
            subject = gr.Textbox(label="subject", value=EXAMPLES[0][1])
            target = gr.Textbox(label="new answer", value=EXAMPLES[0][2])
        question = gr.Textbox(label="question to compare (empty: the prompt itself)", value=EXAMPLES[0][3])
        edit_button = gr.Button("Edit", variant="primary")
        with gr.Row():
            before = gr.Textbox(label="answer before the edit")
            after = gr.Textbox(label="answer after the edit")
        report = gr.JSON(label="edit report")
        gr.Examples(EXAMPLES, [prompt, subject, target, question])
        with gr.Row():
            probe = gr.Textbox(label="ask the current model", value="The Eiffel Tower is in")
            answer = gr.Textbox(label="answer")
        ask_button = gr.Button("Ask")
        history = gr.JSON(label="applied edits", value=session.history)
        with gr.Row():
            undo_button = gr.Button("Undo last edit")
            reset_button = gr.Button("Reset")
        edit_button.click(session.edit, [prompt, subject, target, question], [before, after, report],
                          api_name="edit").then(session.history, None, history, api_name=False)
        ask_button.click(session.ask, probe, answer, api_name="ask")
        undo_button.click(session.undo, None, history, api_name="undo")
        reset_button.click(session.reset, None, history, api_name="reset")
        demo.load(session.history, None, history, api_name="history")
    return demo


if __name__ == "__main__":
    build_demo(EditingSession(load_model())).launch()
