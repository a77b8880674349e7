"""What the Space does with its model: edit a fact, compare answers and probabilities, ask, undo, reset, export.

One `AlphaEditModel` is shared by every visitor and changed by one request at a time (`EditingSession.lock`).
Every edit is one AlphaEdit batch, remembered with the browser session that made it, so Undo takes back only the
visitor's own latest edit; Reset restores the original model for everyone. `DemoLimits` bounds what one request
may cost: input length in tokens (checked before the model is touched), generated tokens and seconds, the number
of edits the shared model carries; the queue bound and one-at-a-time concurrency are applied by `ui.build_demo`.
"""

from __future__ import annotations

import math
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub.errors import HfHubHTTPError

from ..evaluation.decoding import greedy_answers
from ..evaluation.scorer import encode_prompt, encode_target, score_continuations
from ..fields import validate_fields
from ..requests import EditRequestError, as_edit_requests
from ..telemetry import NullSpaceRoom, null_space_room

if TYPE_CHECKING:
    from ..modeling import AlphaEditModel

# A text longer than this many characters per allowed token is refused without tokenizing it at all.
_MAX_CHARACTERS_PER_TOKEN = 20
LORA_ARCHIVE_NAME = "alphaedit-demo-edits-lora"


class DemoInputError(ValueError):
    """A request the demo refuses; the message names the field and says what to do (shown on the page)."""


@dataclass
class DemoLimits:
    """What one visitor's request may cost, so that a public Space stays responsive for everyone."""

    _argument_group_name = "demo limits"

    max_input_tokens: int = field(default=48, metadata={"help": (
        "Longest prompt, subject, answer, paraphrase, neighbour or question a visitor may send, in tokens of the "
        "model's tokenizer; longer input is refused with a message without running the model.")})
    answer_tokens: int = field(default=12, metadata={"help": "Tokens generated for each answer."})
    answer_seconds: float = field(default=10.0, metadata={"help": (
        "Generation of one request's answers stops after this many seconds.")})
    max_edits: int = field(default=20, metadata={"help": (
        "Edits the shared model carries at most; then a visitor must Undo or Reset first.")})
    max_queue_size: int = field(default=16, metadata={"help": (
        "Requests that may wait for the model; more are turned away with 'queue is full'. Requests that touch "
        "the model run one at a time.")})
    allow_push: bool = field(default=False, metadata={"help": (
        "Let visitors push the edited model to the Hub with their own token.")})

    def __post_init__(self) -> None:
        validate_fields(self)
        for name in ("max_input_tokens", "answer_tokens", "answer_seconds", "max_edits", "max_queue_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DemoLimits.{name}={getattr(self, name)!r}: must be positive.")


@dataclass(frozen=True)
class AnswerComparison:
    """The model's greedy answer to one prompt before and after an edit."""

    kind: str  # "edited prompt", "paraphrase" or "neighbour"
    prompt: str
    before: str
    after: str


@dataclass(frozen=True)
class TargetProbability:
    """The probability of a whole target (all its tokens) after the edited prompt, before and after an edit."""

    target: str
    role: str  # "new" or "old"
    before: float
    after: float


@dataclass(frozen=True)
class EditOutcome:
    """What one edit did, as the page shows it."""

    answers: list[AnswerComparison]
    probabilities: list[TargetProbability]
    optimisation_steps: int
    seconds: float
    edits_applied: int

    def report(self) -> dict[str, Any]:
        """A JSON summary: target probabilities before and after (3 significant digits), optimisation steps, time,
        edits applied."""
        return {"probabilities": {f"{p.target} ({p.role})": {"before": float(f"{p.before:.3g}"),
                                                            "after": float(f"{p.after:.3g}")}
                                  for p in self.probabilities},
                "optimisation_steps": self.optimisation_steps, "seconds": round(self.seconds, 2),
                "edits_applied": self.edits_applied}


class EditingSession:
    """The shared model behind the Space. Every method that reads or changes the model holds `lock`.

    `owner` arguments identify the browser session making a request (Gradio's session hash); they decide which
    edits Undo may take back.
    """

    def __init__(self, model: AlphaEditModel, limits: DemoLimits | None = None) -> None:
        self.model = model
        self.limits = limits or DemoLimits()
        self.lock = threading.Lock()
        self.owners: list[str] = []  # the session that made each batch of model.state.batches, in order

    def prepare(self) -> None:
        """Build the editing method now (key statistics and projector), so the first visitor does not wait."""
        with self.lock:
            _ = self.model.method

    # -- input limits ------------------------------------------------------------------------------------------

    def input_problems(self, values: Mapping[str, str]) -> dict[str, str]:
        """`{field: message}` for every value over `limits.max_input_tokens` tokens. Text over 20 characters per
        allowed token is refused without tokenizing it, so this stays fast whatever a visitor sends."""
        limit = self.limits.max_input_tokens
        problems = {}
        for name, text in values.items():
            if len(text) > _MAX_CHARACTERS_PER_TOKEN * limit:
                problems[name] = (f"{name}: {len(text):,} characters is far too long; this Space takes at most "
                                  f"{limit} tokens (a short sentence) per field.")
                continue
            with self.lock:
                count = len(self.model.tokenizer(text, add_special_tokens=False)["input_ids"])
            if count > limit:
                problems[name] = (f"{name}: {count:,} tokens is too long; this Space takes at most {limit} tokens "
                                  "per field. Shorten it.")
        return problems

    def _check_input(self, values: Mapping[str, str]) -> None:
        problems = self.input_problems(values)
        if problems:
            raise DemoInputError("\n".join(problems.values()))

    # -- requests ----------------------------------------------------------------------------------------------

    def edit(self, prompt: str, subject: str, target_new: str, target_true: str = "", paraphrase: str = "",
             neighbour: str = "", owner: str = "") -> EditOutcome:
        """Apply one edit (`prompt` with `{}` for `subject`, completed by `target_new`) as one AlphaEdit batch.

        Before and after it: the greedy answers to the filled prompt, the `paraphrase` and the unrelated
        `neighbour` prompt (each optional), and the probabilities of `target_new` and of `target_true` (the old
        answer, optional) after the filled prompt. Bad input raises `DemoInputError` and changes nothing.
        """
        values = {"prompt": prompt, "subject": subject, "target_new": target_new, "target_true": target_true,
                  "paraphrase": paraphrase, "neighbour": neighbour}
        values = {name: value.strip() for name, value in values.items()}
        self._check_input(values)
        record: dict[str, Any] = {"prompt": values["prompt"], "subject": values["subject"],
                                  "target_new": values["target_new"]}
        if values["target_true"]:
            record["target_true"] = values["target_true"]
        if values["paraphrase"]:
            record["paraphrase_prompts"] = [values["paraphrase"]]
        if values["neighbour"]:
            record["neighborhood_prompts"] = [values["neighbour"]]
        try:
            (request,) = as_edit_requests(record)
        except EditRequestError as error:
            raise DemoInputError(str(error)) from None
        prompts = [("edited prompt", request.prompt_with_subject)]
        prompts += [("paraphrase", text) for text in request.paraphrase_prompts]
        prompts += [("neighbour", text) for text in request.neighborhood_prompts]
        targets = [(request.target_new, "new")] + ([(request.target_true, "old")] if request.target_true else [])
        with self.lock:
            if self.model.state.num_edits >= self.limits.max_edits:
                raise DemoInputError(f"The shared model carries {self.model.state.num_edits} edits, the most this "
                                     "Space keeps; Undo your own last edit or press Reset (for everyone) first.")
            answers_before = self._answers([text for _, text in prompts])
            probabilities_before = self._target_probabilities(request.prompt_with_subject, [t for t, _ in targets])
            (report,) = self.model.edit([request]).batches
            self.owners.append(owner)
            answers_after = self._answers([text for _, text in prompts])
            probabilities_after = self._target_probabilities(request.prompt_with_subject, [t for t, _ in targets])
            edits_applied = self.model.state.num_edits
        return EditOutcome(
            [AnswerComparison(kind, text, before, after) for (kind, text), before, after
             in zip(prompts, answers_before, answers_after, strict=True)],
            [TargetProbability(target, role, before, after) for (target, role), before, after
             in zip(targets, probabilities_before, probabilities_after, strict=True)],
            report.target_steps[0], report.seconds, edits_applied)

    def ask(self, question: str) -> str:
        """The current model's greedy answer to `question`."""
        question = question.strip()
        if not question:
            raise DemoInputError("question: type the beginning of a sentence for the model to complete.")
        self._check_input({"question": question})
        with self.lock:
            return self._answers([question])[0]

    def undo(self, owner: str = "") -> list[dict[str, Any]]:
        """Take back `owner`'s latest edit if it is the latest edit on the model; returns the remaining history."""
        with self.lock:
            if owner not in self.owners:
                raise DemoInputError("Nothing to undo: you have no edit on the model.")
            if self.owners[-1] != owner:
                raise DemoInputError("Someone edited the shared model after your last edit, and an AlphaEdit edit "
                                     "can only be taken back from the top; Reset restores the original model "
                                     "for everyone.")
            self.model.revert()
            self.owners.pop()
            return self._history(owner)

    def reset(self, owner: str = "") -> list[dict[str, Any]]:
        """Undo every edit on the shared model (everyone's)."""
        with self.lock:
            self.model.reset()
            self.owners.clear()
            return self._history(owner)

    def history(self, owner: str = "") -> list[dict[str, Any]]:
        """The applied edits in order, each marked `yours` when `owner` made it."""
        with self.lock:
            return self._history(owner)

    def null_space_room(self) -> list[NullSpaceRoom] | None:
        """The room left in each edited layer's null space (`telemetry.null_space_room`), or None when the method
        edits without the null-space projection."""
        with self.lock:
            if not self.model.hparams.use_projection:
                return None
            return list(null_space_room(self.model).values())

    def export_lora(self, directory: str | Path) -> Path:
        """The model's current edits (everyone's) as an exact PEFT LoRA adapter, zipped into `directory`."""
        with self.lock:
            if not self.model.state.batches:
                raise DemoInputError("Nothing to download: no edit is applied.")
            adapter = self.model.save_edits(Path(directory) / LORA_ARCHIVE_NAME, format="lora")
        return Path(shutil.make_archive(str(adapter), "zip", root_dir=adapter))

    def push_model(self, repo_id: str, token: str) -> str:
        """Push the edited model (weights, card, edit log) to `repo_id` with the visitor's `token`; returns the
        commit URL. Refused unless `limits.allow_push`."""
        if not self.limits.allow_push:
            raise DemoInputError("Pushing is turned off on this Space (its owner can launch it with "
                                 "--allow_push true); download the LoRA adapter instead.")
        repo_id, token = repo_id.strip(), token.strip()
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise DemoInputError(f"repo_id {repo_id!r}: give the model repo to push to as 'your-name/model-name'.")
        if not token:
            raise DemoInputError("token: paste a Hugging Face token with write access to push.")
        with self.lock:
            if not self.model.state.batches:
                raise DemoInputError("Nothing to push: no edit is applied.")
            try:
                return self.model.push_to_hub(repo_id, token=token).commit_url
            except HfHubHTTPError as error:
                raise DemoInputError(f"push to {repo_id} failed: {error}") from None

    # -- helpers (called with `lock` held) ---------------------------------------------------------------------

    def _answers(self, prompts: Sequence[str]) -> list[str]:
        return greedy_answers(self.model.model, self.model.tokenizer, prompts, self.limits.answer_tokens,
                              max_seconds=self.limits.answer_seconds)

    def _target_probabilities(self, prompt: str, targets: Sequence[str]) -> list[float]:
        """`P(target | prompt)` of each whole target (the product of its token probabilities)."""
        tokenizer = self.model.tokenizer
        prompt_ids = encode_prompt(tokenizer, prompt)
        target_ids = [encode_target(tokenizer, target) for target in targets]
        scores = score_continuations(self.model.model, [(prompt_ids, ids) for ids in target_ids],
                                     pad_id=tokenizer.pad_token_id)
        return [math.exp(-score.nll * len(ids)) for score, ids in zip(scores, target_ids, strict=True)]

    def _history(self, owner: str) -> list[dict[str, Any]]:
        return [{"prompt": request.prompt, "subject": request.subject, "target_new": request.target_new,
                 "yours": made_by == owner}
                for batch, made_by in zip(self.model.state.batches, self.owners, strict=True)
                for request in batch.requests]
