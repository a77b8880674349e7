"""Prompts of an edit: context templates, target token ids, and token positions of the subject (ALGORITHMS.md §3.1–3.2).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import NonFiniteError
from ..hparams import CONTEXT_SEED_WORDS, ResolvedHyperparameters


def ensure_context_templates(templates: list[str], model: nn.Module, tokenizer: Any, hparams: ResolvedHyperparameters,
                             seed: int) -> list[str]:
    """`templates`, filled in place with `generate_context_templates` under `hparams` if still empty (what the
    first edit of a model does)."""
    if not templates:
        templates.extend(generate_context_templates(model, tokenizer, hparams.context_template_length,
                                                    hparams.context_template_count, seed,
                                                    keep_special_tokens=hparams.context_template_special_tokens))
    return templates


def generate_context_templates(model: nn.Module, tokenizer: Any, length: int, count: int,
                               seed: int, keep_special_tokens: bool = False) -> list[str]:
    """`["{}"]` plus `count` seeded top-5 samples of `length` tokens, each ending in `". {}"` (§3.1).

    Samples start from the seed words "The", "Therefore", "Because", "I", "You"; special tokens are skipped
    when decoding unless `keep_special_tokens` (the reference's quirk: Llama-3 templates then start with the
    BOS text), and braces are replaced by spaces so the templates can be formatted safely.
    """
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    templates = ["{}"]
    for word in CONTEXT_SEED_WORDS[:count]:
        ids = tokenizer(word, return_tensors="pt")["input_ids"].to(device)
        with torch.no_grad():
            while ids.shape[1] < length:
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0, -1]
                logits = logits.float().cpu()
                if not bool(torch.isfinite(logits).all()):
                    raise NonFiniteError("the model's logits are not finite (while sampling context templates): its "
                                         "weights or activations hold NaN or Inf; nothing was edited.")
                top = torch.topk(logits, 5)
                choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)
                ids = torch.cat([ids, top.indices[choice].view(1, 1).to(device)], dim=1)
        text = tokenizer.decode(ids[0], skip_special_tokens=not keep_special_tokens)
        text = unicodedata.normalize("NFKD", text).replace("\n\n", " ").replace("<|endoftext|>", "")
        templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return templates


def target_token_ids(tokenizer: Any, target: str) -> list[int]:
    """Ids of `" " + target` without special tokens (a leading BOS/UNK id is dropped, as the reference does)."""
    ids = tokenizer(" " + target.lstrip(" "), add_special_tokens=False)["input_ids"]
    if ids and ids[0] in (tokenizer.bos_token_id, tokenizer.unk_token_id) and len(ids) > 1:
        ids = ids[1:]
    if not ids:
        raise ValueError(f"target {target!r} encodes to no tokens")
    return ids


def encode_with_subject(tokenizer: Any, items: Sequence[tuple[str, str, str]],
                        fact_token: str) -> list[tuple[list[int], int]]:
    """Token ids of `prefix + subject + suffix` and the lookup position of the fact, for each item.

    Positions come from the fast tokenizer's offset mapping (the last token overlapping the subject), so they
    do not rely on `enc(prefix + subject)` being a token prefix of the whole prompt.
    """
    texts = [prefix + subject + suffix for prefix, subject, suffix in items]
    encoded = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    results = []
    for (prefix, subject, suffix), ids, offsets in zip(items, encoded["input_ids"], encoded["offset_mapping"],
                                                       strict=True):
        start, end = len(prefix), len(prefix) + len(subject)
        overlapping = [j for j, (a, b) in enumerate(offsets) if b > a and b > start and a < end]
        if not overlapping:
            raise ValueError(f"subject {subject!r} is not covered by any token of {texts[len(results)]!r}")
        last_subject = overlapping[-1]
        if fact_token == "subject_last":
            lookup = last_subject
        elif fact_token == "subject_first_after_last":
            lookup = last_subject + 1 if suffix and last_subject + 1 < len(ids) else last_subject
        else:
            lookup = len(ids) - 1
        results.append((list(ids), lookup))
    return results


def model_context_length(config: Any) -> int | None:
    """The number of positions the model was built for (`n_positions`, `max_position_embeddings`, ...), if known."""
    for name in ("n_positions", "max_position_embeddings", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_request_lengths(tokenizer: Any, config: Any, requests: Sequence[Any], template_length: int) -> None:
    """Refuse, before anything runs, requests whose longest sequence (a context template of `template_length`
    tokens, the prompt with its subject, the new target) does not fit the model's context."""
    limit = model_context_length(config)
    if limit is None:
        return
    texts = [f"{request.prompt_with_subject} {request.target_new.lstrip(' ')}" for request in requests]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    too_long = [(i, n + template_length) for i, n in enumerate(lengths) if n + template_length > limit]
    if too_long:
        details = "; ".join(f"request {i} (case_id {requests[i].case_id!r}): {n} tokens" for i, n in too_long[:5])
        raise ValueError(f"edit: {len(too_long)} request(s) do not fit the model's context of {limit} positions "
                         f"(prompt + new target + a {template_length}-token context template): {details}. Shorten "
                         "the prompt or target.")
