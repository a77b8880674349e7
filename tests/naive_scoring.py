"""The reference's scoring, written the slow obvious way: one unpadded forward per (prompt, target) pair.

Tests compare the batched scorer against it and use it to read the real model's probabilities independently of
the package's own evaluation code.
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


def rewrite_log_probs(model: Any, tokenizer: Any, records: Sequence[dict], target_field: str) -> torch.Tensor:
    """Mean log-probability `[len(records)]` of each record's `target_field` (" " + text) after its `prompt`."""
    pairs = [(tokenizer(r["prompt"])["input_ids"], tokenizer(" " + r[target_field], add_special_tokens=False)[
        "input_ids"]) for r in records]
    return -torch.tensor(naive_scores(model, pairs)[0])
