"""The reference's scoring and greedy decoding, written the slow obvious way: one unpadded forward per (prompt,
target) pair, and the whole sequence through the model for every new token.

Tests compare the batched scorer and decoder against them and use them to read the real model's probabilities
independently of the package's own evaluation code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def naive_scores(model: Any, pairs: Sequence[tuple[list[int], list[int]]]) -> tuple[list[float], list[tuple]]:
    """Mean NLL per target token and per-token top-1 correctness for each `(prompt ids, target ids)` pair."""
    nll, correct = [], []
    with torch.no_grad():
        for prompt, target in pairs:
            logits = model(torch.tensor([prompt + target])).logits[0].float()
            log_probs = torch.log_softmax(logits, dim=-1)
            positions = [len(prompt) + j - 1 for j in range(len(target))]
            nll.append(-sum(log_probs[p, t].item() for p, t in zip(positions, target, strict=True)) / len(target))
            correct.append(tuple(int(logits[p].argmax()) == t for p, t in zip(positions, target, strict=True)))
    return nll, correct


def naive_greedy(model: Any, prompt: Sequence[int], steps: int) -> list[int]:
    """The `steps` greedy (argmax) tokens after `prompt`, without padding or a KV cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def rewrite_log_probs(model: Any, tokenizer: Any, records: Sequence[dict], target_field: str) -> torch.Tensor:
    """Mean log-probability `[len(records)]` of each record's `target_field` (" " + text) after its `prompt`."""
    pairs = [(tokenizer(r["prompt"])["input_ids"], tokenizer(" " + r[target_field], add_special_tokens=False)[
        "input_ids"]) for r in records]
    return -torch.tensor(naive_scores(model, pairs)[0])
