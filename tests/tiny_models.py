"""Tiny random causal LMs and an offline tokenizer for tests.

Every model has hidden size 64, MLP intermediate size 128 (deliberately different from the hidden size,
so that orientation mistakes change shapes), 4 blocks, 4 attention heads, a vocabulary of 1024 and 128
positions. Token id 0 is the tokenizer's ``<|endoftext|>``, used as BOS, EOS and padding.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 4
HEADS = 4
VOCAB = 1024
POSITIONS = 128
TOKENIZER_VOCAB = 1000
WIKITEXT_VALID = Path("/work/shared/data/wikitext-2/valid.txt")
TOKENIZER_TRAINING_LINES = 400
EOS = "<|endoftext|>"

TINY_FAMILIES: list[str] = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "phi3",
    "gpt2",
    "gptj",
    "gpt_neox",
    "opt",
    "falcon",
]

_COMMON: dict[str, Any] = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
_STANDARD: dict[str, Any] = {
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "max_position_embeddings": POSITIONS,
}
_GATED: dict[str, Any] = {**_STANDARD, "num_key_value_heads": 2, "head_dim": HIDDEN // HEADS}
_GPT: dict[str, Any] = {
    "n_embd": HIDDEN,
    "n_inner": INTERMEDIATE,
    "n_layer": LAYERS,
    "n_head": HEADS,
    "n_positions": POSITIONS,
}

_FAMILY_CONFIG: dict[str, dict[str, Any]] = {
    "llama": _GATED,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "gemma": _GATED,
    "gemma2": {**_GATED, "sliding_window": 16, "final_logit_softcapping": 2.0},
    "phi3": _STANDARD,
    "gpt2": _GPT,
    "gptj": {**_GPT, "rotary_dim": 8},
    "gpt_neox": {**_STANDARD, "use_parallel_residual": True},
    "opt": {
        "hidden_size": HIDDEN,
        "ffn_dim": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "max_position_embeddings": POSITIONS,
        "word_embed_proj_dim": 32,
    },
    "falcon": {
        "hidden_size": HIDDEN,
        "ffn_hidden_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "max_position_embeddings": POSITIONS,
        "bias": True,
    },
}


def tiny_causal_lm(model_type: str, seed: int = 0) -> PreTrainedModel:
    """Build a tiny randomly initialised float32 causal LM of ``model_type`` in eval mode.

    The tiny OPT projects embeddings to 32 dimensions (``project_in``/``project_out``) and the tiny
    Gemma-2 uses a final logit soft-cap of 2, so that both post-block steps visibly change the logits.
    """
    if model_type not in _FAMILY_CONFIG:
        raise ValueError(f"no tiny config for model_type {model_type!r}; known: {TINY_FAMILIES}")
    config = AutoConfig.for_model(model_type, **_COMMON, **_FAMILY_CONFIG[model_type])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory on the first lines of WikiText-2 validation.

    ``len(tokenizer) <= 1024`` (every tiny model's vocabulary); EOS and PAD are ``<|endoftext|>`` (id 0);
    padding is on the right.
    """
    with WIKITEXT_VALID.open(encoding="utf-8") as handle:
        lines = [line.strip() for line in itertools.islice(handle, TOKENIZER_TRAINING_LINES)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([line for line in lines if line], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=EOS,
        padding_side="right",
        model_max_length=POSITIONS,
    )


def tiny_causal_lm_with_large_activations(model_type: str = "llama", seed: int = 0) -> PreTrainedModel:
    """`tiny_causal_lm` with every `nn.Linear` but the MLP output projections and the LM head scaled by 4, so that
    edits move the logits clearly and (for Llama) the reference threshold leaves a non-trivial null space."""
    model = tiny_causal_lm(model_type, seed=seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith(("down_proj", "lm_head")):
                module.weight.mul_(4.0)
    return model
