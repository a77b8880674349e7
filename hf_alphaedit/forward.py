"""Partial forward passes: stop a forward after a module, and re-run a range of blocks.

Editing only ever changes the hidden state at one block (the z-layer) or the weights of a few edited blocks,
so everything below them can be computed once and reused. `BlockRunner` records, during one ordinary forward
pass, the exact arguments every block receives (attention masks, rotary embeddings, position ids, ...; none of
them depend on the hidden state) and can then run any range of blocks from a new hidden state. This is
architecture-agnostic because it reuses whatever the model itself passed to its blocks; `BlockRunner.verify`
checks the equivalence numerically once per model.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from torch.func import functional_call
from transformers import Cache

from .architectures import ModelSpec, block_output_hidden


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early."""


@contextlib.contextmanager
def stop_after(module: nn.Module, *, inclusive: bool = True) -> Iterator[None]:
    """Within the context, a forward pass ends right after `module` has run, or (`inclusive=False`) when its
    input is ready, after the pre-hooks registered before this one (use `run_until`)."""

    def hook(*_: Any) -> None:
        raise _StopForward

    handle = module.register_forward_hook(hook) if inclusive else module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def run_until(model: nn.Module, module: nn.Module, *, inclusive: bool = True, **inputs: Any) -> None:
    """Run `model(**inputs)` only up to (and, unless `inclusive=False`, including) `module`; outputs are read
    through hooks."""
    with stop_after(module, inclusive=inclusive), contextlib.suppress(_StopForward):
        model(**{"use_cache": False, **inputs})


def cache_argument(model: nn.Module) -> str:
    """The name under which `model.forward` takes a KV cache: `cache` (transformers >= 5.24) or `past_key_values`."""
    return _cache_argument(type(model))


@functools.cache
def _cache_argument(model_type: type) -> str:
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def right_pad(rows: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids` and `attention_mask`, both `[len(rows), longest]`."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return input_ids.to(device), attention_mask.to(device)


class BlockRunner:
    """Re-runs blocks of one recorded forward pass from modified hidden states.

    `capture` runs the model once on a batch and stores, for the requested blocks, their input hidden state
    `[batch, seq, d]` and the other arguments they were called with. `run(hidden, start, stop)` then computes
    blocks `start .. stop-1` from `hidden` (the input of block `start`) and returns the output of block
    `stop-1`, exactly as the full model would for that batch.
    """

    def __init__(self, model: nn.Module, spec: ModelSpec) -> None:
        self.model = model
        self.blocks = spec.blocks(model)
        self._calls: dict[int, tuple[bool, tuple[Any, ...], dict[str, Any]]] = {}

    def capture(self, blocks: range, stop_block: int, **inputs: Any) -> dict[int, torch.Tensor]:
        """Forward `inputs` until the output of block `stop_block`; record the calls of `blocks`.

        Returns the input hidden state `[batch, seq, d]` of every block in `blocks` (detached).
        """
        self._calls = {}
        hidden_inputs: dict[int, torch.Tensor] = {}

        def make_hook(index: int):
            def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                positional = len(args) > 0
                hidden = args[0] if positional else kwargs["hidden_states"]
                rest_kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                self._calls[index] = (positional, args[1:] if positional else args, rest_kwargs)
                hidden_inputs[index] = hidden.detach()

            return hook

        handles = [self.blocks[i].register_forward_pre_hook(make_hook(i), with_kwargs=True) for i in blocks]
        try:
            with torch.no_grad():
                run_until(self.model, self.blocks[stop_block], **inputs)
        finally:
            for handle in handles:
                handle.remove()
        return hidden_inputs

    def run(self, hidden: torch.Tensor, start: int, stop: int, cache: Cache | None = None,
            parameters: Mapping[int, Mapping[str, torch.Tensor]] | None = None, checkpoint: bool = False
            ) -> torch.Tensor:
        """Output `[batch, seq, d]` of block `stop-1` given the input `hidden` of block `start`.

        `cache` replaces the KV cache recorded in each block's call, whatever the argument is called
        (`cache`, `past_key_values`, `layer_past`) and whether it was passed by keyword or position.
        `parameters[index]` (names relative to the block, e.g. `mlp.down_proj.weight`) replace block `index`'s own
        tensors for this call (`torch.func.functional_call`: the module is not changed, gradients flow into them).
        `checkpoint=True` keeps only each block's input for the backward pass and recomputes the block there
        (`torch.utils.checkpoint`); the blocks must then not depend on forward hooks that are gone by then.
        """
        for index in range(start, stop):
            if checkpoint:
                # A block appends its keys and values to the cache: its recomputation must see the cache as the
                # first run did, so every run starts from (shallow copies of) the cache layers of that moment.
                # Reentrant: with the non-reentrant variant, every micro-batch whose last forward was not
                # backpropagated (the last step of a target optimisation) stayed in memory, gc.collect() or not.
                layers = None if cache is None else list(cache.layers)
                hidden = torch.utils.checkpoint.checkpoint(self._run_block, hidden, index, cache, parameters, layers,
                                                           use_reentrant=True)
            else:
                hidden = self._run_block(hidden, index, cache, parameters)
        return hidden

    def _run_block(self, hidden: torch.Tensor, index: int, cache: Cache | None,
                   parameters: Mapping[int, Mapping[str, torch.Tensor]] | None,
                   cache_layers: list[Any] | None = None) -> torch.Tensor:
        """Output hidden state of block `index` on `hidden` (see `run`); `cache_layers` are restored first."""
        positional, args, kwargs = self._calls[index]
        if cache is not None:
            if cache_layers is not None:
                cache.layers[:] = [copy.copy(layer) for layer in cache_layers]
            args = tuple(cache if isinstance(a, Cache) else a for a in args)
            kwargs = {k: cache if isinstance(v, Cache) else v for k, v in kwargs.items()}
        call_args, call_kwargs = ((hidden, *args), kwargs) if positional else (args, {**kwargs, "hidden_states": hidden})
        replaced = (parameters or {}).get(index)
        block = self.blocks[index]
        output = functional_call(block, dict(replaced), call_args, call_kwargs) if replaced else block(
            *call_args, **call_kwargs)
        return block_output_hidden(output)
