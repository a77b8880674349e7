"""Batched teacher-forced scoring of continuations (ALGORITHMS.md §10.2–10.4, §10.7); generation is in `decoding`.

Every metric of the references reduces to one question asked of many `(prompt, continuation)` pairs: how likely
is each continuation token given the prompt and the continuation tokens before it, and is it the argmax? The
references ask it one record (or one example, one candidate) at a time; `score_continuations` asks it for a whole
prompt set at once:

* sequences are built by token-id concatenation `enc(prompt) ++ enc(" " + target)` (the [PROPOSAL] of §10.2 and
  the default of §10.4), so the prompt/target boundary is exact by construction and BOS never sits inside a
  target; BOS insertion is detected from the tokenizer (`leading_special_ids`), never from the model name;
* pairs whose forward inputs coincide (e.g. the single-token options of a multiple-choice question, which all
  need only the prompt) share one row;
* rows are sorted by length and packed under a padded-token budget, right-padded (the reference convention);
* the model computes logits only from the first needed position onwards (`logits_to_keep`), and the
  log-softmax is taken only at the positions that predict a continuation token.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..forward import right_pad

DEFAULT_BATCH_TOKENS = 4096
_BOS_PROBE = "Paris is a city"


@dataclass(frozen=True)
class ContinuationScore:
    """Teacher-forced score of one continuation.

    `nll` is the mean negative log-likelihood per continuation token (the reference's "prob"); `token_correct`
    has one flag per continuation token: whether the argmax prediction at the preceding position is that token.
    """

    nll: float
    token_correct: tuple[bool, ...]

    @property
    def all_correct(self) -> bool:
        """The reference's teacher-forced exact match: every continuation token is the argmax."""
        return all(self.token_correct)


@functools.lru_cache(maxsize=16)
def _leading_special_ids(tokenizer: Any) -> tuple[int, ...]:
    with_special = tokenizer(_BOS_PROBE)["input_ids"]
    without = tokenizer(_BOS_PROBE, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start : start + len(without)] == without:
            return tuple(with_special[:start])
    return ()


def leading_special_ids(tokenizer: Any) -> tuple[int, ...]:
    """Ids the tokenizer puts before any text (BOS for Llama-3 style tokenizers, nothing for GPT-2 style).

    Found by encoding a probe string with and without special tokens (ALGORITHMS.md §1.5 [PROPOSAL]); special
    tokens the tokenizer appends (EOS) are deliberately not included.
    """
    return _leading_special_ids(tokenizer)


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Ids of a prompt as the model sees it at the start of a sequence: leading special ids + the text's ids."""
    return list(leading_special_ids(tokenizer)) + tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_target(tokenizer: Any, target: str) -> list[int]:
    """Ids of a continuation, scored with one leading space and without special tokens (§1.5)."""
    ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} encodes to no tokens; give a non-empty target")
    return ids


def progress(iterable: Any, *, total: int | None, description: str, show: bool | None) -> Any:
    """A tqdm bar over `iterable`; `show=None` shows it only on a terminal, False never."""
    return tqdm(iterable, total=total, desc=description, disable=None if show is None else not show, leave=False)


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode (restored afterwards) and no autograd."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pack_by_tokens(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices of rows grouped into batches whose padded size `rows × longest` stays within `batch_tokens`
    (a single longer row gets a batch of its own); rows are taken longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def score_continuations(
    model: nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_id: int,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    show_progress: bool | None = None,
    description: str = "scoring",
) -> list[ContinuationScore]:
    """Teacher-forced scores of `pairs = [(prompt_ids, continuation_ids), ...]`, in input order.

    The forward input of a pair is `prompt_ids ++ continuation_ids[:-1]` (`[len]`); the continuation token `j`
    is predicted from position `len(prompt_ids) + j - 1`. Works for any device and dtype (log-probabilities are
    computed in float32). `batch_tokens` bounds the padded tokens `[rows, longest]` of one forward pass.
    """
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    for index, (prompt, continuation) in enumerate(pairs):
        if not prompt or not continuation:
            raise ValueError(f"pair {index}: prompt and continuation ids must both be non-empty")
    row_of_input: dict[tuple[int, ...], int] = {}
    pair_rows = []
    for prompt, continuation in pairs:
        row_input = tuple(prompt) + tuple(continuation[:-1])
        pair_rows.append(row_of_input.setdefault(row_input, len(row_of_input)))
    rows = list(row_of_input)
    pairs_of_row: list[list[int]] = [[] for _ in rows]
    for pair_index, row in enumerate(pair_rows):
        pairs_of_row[row].append(pair_index)

    scores: list[ContinuationScore | None] = [None] * len(pairs)
    device = model_device(model)
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    batches = pack_by_tokens([len(row) for row in rows], batch_tokens)
    with inference(model):
        for batch in progress(batches, total=len(batches), description=description, show=show_progress):
            input_ids, attention_mask = right_pad([list(rows[i]) for i in batch], pad_id, device)
            # The first position any pair of the batch needs; logits before it are never computed.
            first = min(len(pairs[p][0]) - 1 for i in batch for p in pairs_of_row[i])
            width = input_ids.shape[1]
            extra = {"logits_to_keep": width - first} if keeps_logits else {}
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).logits
            offset = first if keeps_logits else 0
            for position_in_batch, row in enumerate(batch):
                for pair_index in pairs_of_row[row]:
                    prompt, continuation = pairs[pair_index]
                    start = len(prompt) - 1 - offset
                    row_logits = logits[position_in_batch, start : start + len(continuation)].float()
                    targets = torch.tensor(continuation, device=row_logits.device)
                    log_probs = torch.log_softmax(row_logits, dim=-1)
                    nll = -log_probs.gather(1, targets[:, None]).mean()
                    correct = (row_logits.argmax(dim=-1) == targets).tolist()
                    scores[pair_index] = ContinuationScore(float(nll), tuple(bool(c) for c in correct))
    return scores  # type: ignore[return-value]
