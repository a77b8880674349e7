"""Keys at each edited layer and z-layer outputs on the raw prompts, for one batch of requests (ALGORITHMS.md §4, §5.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..architectures import ModelSpec, block_output_hidden
from ..errors import check_finite
from ..forward import BlockRunner, right_pad, run_until
from ..hparams import ResolvedHyperparameters
from ..requests import EditRequest
from .prompts import encode_with_subject


class LayerKeyReader:
    """Keys at each edited layer and z-layer outputs on the raw prompts, for one batch of requests (§4, §5.1).

    Layers are read in ascending order, each after the layers below it were updated. The pass for layer `l_i`
    starts at block `l_{i-1}` (the only block changed since the previous pass) from that block's input recorded
    in the previous pass, and ends at the z-layer, instead of running the model from the embeddings.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, spec: ModelSpec, hparams: ResolvedHyperparameters,
                 templates: Sequence[str], requests: Sequence[EditRequest], *, use_block_runner: bool = True) -> None:
        self.model, self.spec, self.hparams = model, spec, hparams
        self.use_block_runner = use_block_runner
        device = next(model.parameters()).device
        items, weights, owners, raw = [], [], [], []
        n_context = len(templates) - 1
        for r, request in enumerate(requests):
            prefix, suffix = request.split_prompt()
            for t, template in enumerate(templates):
                items.append((template.split("{}")[0] + prefix, request.subject, suffix))
                # Mean of the group means: the raw prompt is one group, the context templates the other.
                weights.append((1.0 if n_context == 0 else 0.5) if t == 0 else 0.5 / n_context)
                owners.append(r)
                if t == 0:
                    raw.append(len(items) - 1)
        encoded = encode_with_subject(tokenizer, items, hparams.fact_token)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.input_ids, self.attention_mask = right_pad([ids for ids, _ in encoded], pad_id, device)
        self.lookup = torch.tensor([lookup for _, lookup in encoded], device=device)
        self.rows = torch.arange(len(encoded), device=device)
        self.weights = torch.tensor(weights, device=device)
        self.owners = torch.tensor(owners, device=device)
        self.raw = torch.tensor(raw, device=device)
        self.n_requests = len(requests)
        self._runner = BlockRunner(model, spec) if use_block_runner else None
        self._resume: tuple[int, torch.Tensor] | None = None

    def read(self, layer_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys `[n, d_k]` at edited layer number `layer_position` and z-layer outputs `[n, d]` (float32)."""
        layers, z_layer = self.hparams.layers, self.hparams.z_layer
        layer = layers[layer_position]
        captured: dict[str, torch.Tensor] = {}
        key_handle = self.spec.rewrite_module(self.model, layer).register_forward_pre_hook(
            lambda _m, args: captured.__setitem__("keys", self._at_lookup(args[0])))
        try:
            if self._runner is None:
                self._forward_to_z(captured)
            elif self._resume is None:
                with _capture_block_output(self.spec.block(self.model, z_layer), captured):
                    inputs = self._runner.capture(range(layers[0], z_layer + 1), z_layer,
                                                  input_ids=self.input_ids, attention_mask=self.attention_mask)
                self._resume = (layers[0], inputs[layers[0]])
            else:
                start, hidden = self._resume
                with torch.no_grad():
                    hidden = self._runner.run(hidden, start, layer)
                    self._resume = (layer, hidden)
                    captured["z"] = self._runner.run(hidden, layer, z_layer + 1)
        finally:
            key_handle.remove()
        keys, outputs = self._reduce(captured["keys"]), captured["z"][self.raw, self.lookup[self.raw]].float()
        check_finite(keys, f"the keys at {self.spec.rewrite_module_name(layer)}",
                     "the model's activations there are not finite (check its weights); nothing was applied")
        check_finite(outputs, f"the outputs of block {z_layer}",
                     "the model's hidden states are not finite (check its weights); nothing was applied")
        return keys, outputs

    def _forward_to_z(self, captured: dict[str, torch.Tensor]) -> None:
        z_block = self.spec.block(self.model, self.hparams.z_layer)
        with _capture_block_output(z_block, captured), torch.no_grad():
            run_until(self.model, z_block, input_ids=self.input_ids, attention_mask=self.attention_mask)

    def _at_lookup(self, module_input: torch.Tensor) -> torch.Tensor:
        """The edited module's input at each sequence's lookup position, `[sequences, d_k]`."""
        tokens = module_input.reshape(len(self.rows), -1, module_input.shape[-1])  # OPT flattens tokens
        return tokens[self.rows, self.lookup].detach()

    def _reduce(self, keys: torch.Tensor) -> torch.Tensor:
        weighted = keys.float() * self.weights[:, None]
        reduced = torch.zeros(self.n_requests, keys.shape[1], device=keys.device)
        return reduced.index_add(0, self.owners, weighted)


class _capture_block_output:
    """Context manager storing a block's output hidden state as `captured["z"]`."""

    def __init__(self, block: nn.Module, captured: dict[str, torch.Tensor]) -> None:
        self.block, self.captured = block, captured

    def __enter__(self) -> None:
        self.handle = self.block.register_forward_hook(
            lambda _m, _a, out: self.captured.__setitem__("z", block_output_hidden(out).detach()))

    def __exit__(self, *_: Any) -> None:
        self.handle.remove()
