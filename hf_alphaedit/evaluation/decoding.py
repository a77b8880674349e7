"""Batched decoding with every sampling setting explicit: fluency texts (ALGORITHMS.md §10.3), live-decoding answers
and the command line's greedy answers.

`decode` is its own token loop (one forward over the left-padded prompts into a KV cache, then one forward per new
token) and never calls `model.generate`, so nothing in a model's `generation_config` (temperature 0.6 and top-p 0.9
for Llama-3-Instruct, a repetition penalty, extra EOS ids, a length limit) can change what it produces. The
settings are the `Sampling` it is given and nothing else:

* greedy (`top_k=None`): the argmax token;
* sampled: the `top_k` most likely tokens, their probabilities renormalised at `temperature`, one draw from a
  seeded generator. `REFERENCE_SAMPLING` is the reference's sampler (top-k 5, temperature 1, no top-p, no
  repetition penalty); `generate_texts` also keeps it going to a fixed length past EOS, as the reference does.
"""

from __future__ import annotations

import functools
import inspect
import time
import unicodedata
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import DynamicCache

from ..forward import cache_argument
from .scorer import (
    encode_prompt,
    encode_target,
    inference,
    model_device,
    pack_by_tokens,
    progress,
)

# Tokens of KV cache (rows × (prompt + new tokens)) in one decoding batch. Larger than the scorer's budget, which
# bounds full-vocabulary logits at every position; decoding keeps logits for one position per row.
DEFAULT_DECODE_TOKENS = 16384
LiveMatch = Literal["prefix", "contains"]
LIVE_MATCHES: tuple[str, ...] = ("prefix", "contains")


@dataclass(frozen=True)
class Sampling:
    """How `decode` picks each next token: the argmax (`top_k=None`), or one draw from the `top_k` most likely
    tokens with probabilities `softmax(logits / temperature)` renormalised over them, from a generator seeded with
    `seed` (the same prompts, batch budget and seed give the same tokens)."""

    top_k: int | None = None
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"Sampling.top_k={self.top_k}: give a positive number of tokens, or None for greedy.")
        if not self.temperature > 0:
            raise ValueError(f"Sampling.temperature={self.temperature}: must be positive.")

    @property
    def greedy(self) -> bool:
        return self.top_k is None

    def describe(self) -> str:
        """`"greedy"` or e.g. `"sampled (top-k 5, temperature 1, seed 0)"`, for protocol cards."""
        if self.greedy:
            return "greedy"
        return f"sampled (top-k {self.top_k}, temperature {self.temperature:g}, seed {self.seed})"


GREEDY = Sampling()
REFERENCE_SAMPLING = Sampling(top_k=5)


@dataclass(frozen=True)
class LiveDecoding:
    """Settings of the live-decoding metrics (the `live_accuracy` metric card states the rules).

    For a prompt and its expected answer the model decodes at most `len(enc(" " + answer)) + extra_tokens` new
    tokens (ending early at the tokenizer's EOS) with `sampling`; the first line of the decoded continuation is
    compared with the answer under `match` (`"prefix"`: the continuation starts with the answer, `"contains"`:
    the answer occurs in it), both normalised (case, punctuation, articles). `batch_tokens` bounds the KV-cache
    tokens of one decoding batch (memory only: greedy results do not depend on it beyond float round-off ties).
    """

    match: LiveMatch = "prefix"
    extra_tokens: int = 8
    sampling: Sampling = GREEDY
    batch_tokens: int = DEFAULT_DECODE_TOKENS

    def __post_init__(self) -> None:
        if self.match not in LIVE_MATCHES:
            raise ValueError(f"LiveDecoding.match={self.match!r}: choose one of {list(LIVE_MATCHES)}.")
        if self.extra_tokens < 0:
            raise ValueError(f"LiveDecoding.extra_tokens={self.extra_tokens}: must be >= 0.")
        if self.batch_tokens < 1:
            raise ValueError(f"LiveDecoding.batch_tokens={self.batch_tokens}: must be positive.")

    @property
    def family(self) -> str:
        """Metric family name in results and protocol cards: `live_greedy` or `live_sampled`."""
        return "live_greedy" if self.sampling.greedy else "live_sampled"

    def to_dict(self) -> dict[str, Any]:
        return {"match": self.match, "extra_tokens": self.extra_tokens, "sampling": self.sampling.describe(),
                "stop": "tokenizer EOS or the token budget", "text": "first line of the decoded continuation"}


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded `input_ids` and `attention_mask`, both `[len(rows), longest]`."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    return input_ids.to(device), attention_mask.to(device)


@functools.cache
def _forward_parameters(model_type: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_type.forward).parameters)


def decode(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int],
    *,
    pad_id: int,
    sampling: Sampling = GREEDY,
    stop_ids: Collection[int] = (),
    batch_tokens: int = DEFAULT_DECODE_TOKENS,
    show_progress: bool | None = None,
    description: str = "decoding",
    max_seconds: float | None = None,
) -> list[list[int]]:
    """New token ids after each prompt (`prompts[i]` ids `[len_i]`), at most `max_new_tokens[i]` of them, in input
    order.

    Rows are grouped longest first under a KV-cache budget (`rows × (prompt + new tokens) ≤ batch_tokens`),
    left-padded, with position ids counted from each row's first real token, so padding shifts nothing. A row ends
    after its budget or at the first token in `stop_ids` (not returned). Logits are read in float32.
    `max_seconds` stops each batch after the first new token that took it past that many seconds (as transformers'
    `max_time`; its rows are then shorter), for callers that serve strangers.
    """
    if len(prompts) != len(max_new_tokens):
        raise ValueError(f"decode: {len(prompts)} prompts but {len(max_new_tokens)} token budgets")
    if any(not prompt for prompt in prompts):
        raise ValueError("decode: every prompt needs at least one token id")
    if any(budget < 0 for budget in max_new_tokens):
        raise ValueError("decode: max_new_tokens must be >= 0 for every prompt")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"decode: max_seconds={max_seconds} must be positive (or None for no time limit)")
    stops = frozenset(stop_ids)
    device = model_device(model)
    accepted = _forward_parameters(type(model))
    cache_name = cache_argument(model)
    generator = torch.Generator().manual_seed(sampling.seed)
    outputs: list[list[int]] = [[] for _ in prompts]
    batches = pack_by_tokens([len(p) + b for p, b in zip(prompts, max_new_tokens, strict=True)], batch_tokens)

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                cache: DynamicCache) -> torch.Tensor:
        extra: dict[str, Any] = {cache_name: cache}
        if "position_ids" in accepted:
            extra["position_ids"] = positions
        if "logits_to_keep" in accepted:
            extra["logits_to_keep"] = 1
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **extra).logits
        return logits[:, -1].float()

    with inference(model):
        for batch in progress(batches, total=len(batches), description=description, show=show_progress):
            budgets = [max_new_tokens[i] for i in batch]
            if max(budgets) == 0:
                continue
            started = time.perf_counter()
            input_ids, attention_mask = left_pad([prompts[i] for i in batch], pad_id, device)
            positions = (attention_mask.cumsum(1) - 1).clamp_min(0)
            cache = DynamicCache()
            logits = forward(input_ids, attention_mask, positions, cache)
            alive = [budget > 0 for budget in budgets]
            for step in range(max(budgets)):
                tokens = _next_tokens(logits, sampling, generator)
                for row, index in enumerate(batch):
                    if not alive[row]:
                        continue
                    token = int(tokens[row])
                    if token in stops:
                        alive[row] = False
                        continue
                    outputs[index].append(token)
                    alive[row] = step + 1 < budgets[row]
                if not any(alive) or (max_seconds is not None and time.perf_counter() - started >= max_seconds):
                    break
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(batch), 1)], dim=1)
                positions = positions[:, -1:] + 1
                logits = forward(tokens[:, None].to(device), attention_mask, positions, cache)
    return outputs


def _next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """One token per row of `logits` `[rows, vocab]` (float32): `[rows]` on the CPU (only the top-k values leave
    the device; the draw uses the CPU generator, so it does not depend on the device)."""
    if sampling.greedy:
        return logits.argmax(dim=-1).cpu()
    values, indices = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1)
    probabilities = torch.softmax(values / sampling.temperature, dim=-1).cpu()
    choice = torch.multinomial(probabilities, 1, generator=generator)
    return indices.cpu().gather(1, choice).squeeze(1)


def clean_generated_text(text: str) -> str:
    """The reference's post-processing of a generated text before fluency scoring (§10.3): NFKD, blank lines
    joined by a space."""
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


def generate_texts(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_length: int = 100,
    sampling: Sampling = REFERENCE_SAMPLING,
    batch_tokens: int = DEFAULT_DECODE_TOKENS,
    show_progress: bool | None = None,
) -> list[str]:
    """Each prompt continued until the sequence (prompt included) has exactly `max_length` tokens (§10.3).

    The reference's sampler by default (`REFERENCE_SAMPLING`: top-k 5, temperature 1, seeded here, unseeded there);
    like the reference it does not stop at EOS. Returns the decoded texts, prompt included, special tokens
    removed and cleaned by `clean_generated_text`.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    too_long = [i for i, ids in enumerate(encoded) if len(ids) >= max_length]
    if too_long:
        raise ValueError(f"prompts {too_long} already have >= max_length={max_length} tokens; raise max_length")
    generated = decode(model, encoded, [max_length - len(ids) for ids in encoded], pad_id=pad_id, sampling=sampling,
                       batch_tokens=batch_tokens, show_progress=show_progress, description="generating")
    return [clean_generated_text(tokenizer.decode(ids + new, skip_special_tokens=True))
            for ids, new in zip(encoded, generated, strict=True)]


def first_line(text: str) -> str:
    """The first line of a continuation that has text (leading whitespace and blank lines skipped)."""
    return text.lstrip().split("\n", 1)[0]


def continue_prompts(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: Sequence[int],
    *,
    sampling: Sampling = GREEDY,
    batch_tokens: int = DEFAULT_DECODE_TOKENS,
    show_progress: bool | None = None,
    description: str = "decoding",
    max_seconds: float | None = None,
) -> list[str]:
    """The first line of each prompt's decoded continuation (at most `max_new_tokens[i]` tokens, ending at EOS;
    `max_seconds`: see `decode`).

    Greedy continuations of the same prompt are decoded once, with the largest budget asked for it (a shorter
    greedy budget gives a prefix of the same tokens).
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    if sampling.greedy:
        budget_of: dict[str, int] = {}
        for prompt, budget in zip(prompts, max_new_tokens, strict=True):
            budget_of[prompt] = max(budget, budget_of.get(prompt, 0))
        unique = list(budget_of)
        ids = decode(model, [encode_prompt(tokenizer, p) for p in unique], [budget_of[p] for p in unique],
                     pad_id=pad_id, stop_ids=stop_ids, batch_tokens=batch_tokens, show_progress=show_progress,
                     description=description, max_seconds=max_seconds)
        generated = dict(zip(unique, ids, strict=True))
        new = [generated[prompt][:budget] for prompt, budget in zip(prompts, max_new_tokens, strict=True)]
    else:
        new = decode(model, [encode_prompt(tokenizer, p) for p in prompts], max_new_tokens, pad_id=pad_id,
                     sampling=sampling, stop_ids=stop_ids, batch_tokens=batch_tokens, show_progress=show_progress,
                     description=description, max_seconds=max_seconds)
    return [first_line(tokenizer.decode(ids, skip_special_tokens=True)) for ids in new]


def live_continuations(model: nn.Module, tokenizer: Any, items: Sequence[tuple[str, str]], settings: LiveDecoding,
                       *, show_progress: bool | None = None) -> list[str]:
    """The model's own answer (first line of its continuation) to each `(prompt, expected answer)` item, decoded
    with `settings` for up to `len(enc(" " + answer)) + settings.extra_tokens` tokens."""
    budgets = [len(encode_target(tokenizer, answer)) + settings.extra_tokens for _, answer in items]
    return continue_prompts(model, tokenizer, [prompt for prompt, _ in items], budgets, sampling=settings.sampling,
                            batch_tokens=settings.batch_tokens, show_progress=show_progress,
                            description="live decoding")


def greedy_answers(model: nn.Module, tokenizer: Any, prompts: Sequence[str], new_tokens: int = 8,
                   max_seconds: float | None = None) -> list[str]:
    """The first line of the model's greedy continuation (at most `new_tokens` tokens, ending at EOS, decoded for
    at most about `max_seconds` per batch) of each prompt, stripped."""
    if not prompts:
        return []
    return [answer.strip() for answer in continue_prompts(model, tokenizer, prompts, [new_tokens] * len(prompts),
                                                          show_progress=False, max_seconds=max_seconds)]
