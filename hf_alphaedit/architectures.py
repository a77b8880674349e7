"""Where the edited modules live in each supported model family.

This is the only module of ``hf_alphaedit`` that knows module paths. Everything else asks a
:class:`ModelSpec` (built by :func:`resolve_model_spec`) for the transformer blocks, the edited MLP output
projection ("rewrite module") of a layer, its weight in math orientation ``W: [d, d_k]``, and the
post-block computation that turns the last block's hidden state into logits.

Orientation is decided from the module type, never from shapes (``ALGORITHMS.md`` §1.3):
``nn.Linear`` stores ``[d, d_k]`` (math orientation) and GPT-2's ``Conv1D`` stores ``[d_k, d]``.

Block outputs: in transformers 5.x most decoder blocks return the hidden state tensor itself, while
GPT-J and Falcon blocks return a tuple whose element 0 is the hidden state; use
:func:`block_output_hidden` to read either.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = [
    "ModelSpec",
    "UnsupportedArchitectureError",
    "block_output_hidden",
    "known_model_types",
    "resolve_model_spec",
]

LayerStyle = Literal["gated", "gpt"]


class UnsupportedArchitectureError(ValueError):
    """The model type has no built-in module templates and none were passed."""


class _Family(NamedTuple):
    layer_module_tmp: str
    rewrite_module_tmp: str
    final_norm: str | None
    output_projection: str | None
    layer_style: LayerStyle


_LLAMA_LIKE = _Family("model.layers.{}", "model.layers.{}.mlp.down_proj", "model.norm", None, "gated")

_FAMILIES: dict[str, _Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gpt2": _Family("transformer.h.{}", "transformer.h.{}.mlp.c_proj", "transformer.ln_f", None, "gpt"),
    "gptj": _Family("transformer.h.{}", "transformer.h.{}.mlp.fc_out", "transformer.ln_f", None, "gpt"),
    "gpt_neox": _Family(
        "gpt_neox.layers.{}",
        "gpt_neox.layers.{}.mlp.dense_4h_to_h",
        "gpt_neox.final_layer_norm",
        None,
        "gpt",
    ),
    "opt": _Family(
        "model.decoder.layers.{}",
        "model.decoder.layers.{}.fc2",
        "model.decoder.final_layer_norm",
        "model.decoder.project_out",
        "gpt",
    ),
    "falcon": _Family(
        "transformer.h.{}", "transformer.h.{}.mlp.dense_4h_to_h", "transformer.ln_f", None, "gpt"
    ),
}

_REWRITE_NAMES = ("down_proj", "c_proj", "fc_out", "fc2", "dense_4h_to_h", "w2")
_MLP_PATH_MARKERS = ("mlp", "ffn", "feed_forward", "feedforward")


def known_model_types() -> list[str]:
    """The ``config.model_type`` values that resolve without explicit templates."""
    return sorted(_FAMILIES)


def block_output_hidden(output: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The hidden state ``[batch, seq, d]`` from a block's forward output (a tensor, or a tuple whose
    element 0 is the hidden state)."""
    return output if isinstance(output, torch.Tensor) else output[0]


_TEMPLATE_EXAMPLES = {
    "layer_module_tmp": "model.layers.{}",
    "rewrite_module_tmp": "model.layers.{}.mlp.down_proj",
}


def _check_template(field: str, template: str) -> None:
    valid = (
        isinstance(template, str)
        and "{}" in template
        and template.count("{") == 1
        and template.count("}") == 1
    )
    if not valid:
        raise ValueError(
            f"{field}={template!r} must be a module path with exactly one '{{}}' placeholder for the "
            f"layer index, e.g. {field}={_TEMPLATE_EXAMPLES[field]!r}"
        )


def _get_module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _closest_names(model: nn.Module, name: str) -> str:
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    if close:
        return "closest existing modules: " + ", ".join(repr(n) for n in close)
    top_level = [n for n in names if "." not in n]
    return "no similarly named module exists; top-level modules: " + ", ".join(repr(n) for n in top_level)


def _missing_module_error(
    model: nn.Module, field: str, value: str, name: str, builtin_for: str | None = None
) -> ValueError:
    origin = (
        f" (the built-in template for model_type {builtin_for!r}; pass {field}=... to override it)"
        if builtin_for is not None
        else ""
    )
    return ValueError(
        f"{field}={value!r}{origin}: module {name!r} does not exist in {type(model).__name__} "
        f"({_closest_names(model, name)})"
    )


def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _projection_shape(module: nn.Module) -> tuple[int, int]:
    """``(d, d_k)``: out and in features of a Linear or Conv1D."""
    if isinstance(module, Conv1D):
        return module.nf, module.nx
    return module.out_features, module.in_features


@dataclass(frozen=True)
class ModelSpec:
    """Module layout of one model, as module-path templates and sizes.

    Attributes:
        model_type: ``config.model_type``.
        layer_module_tmp: template of the transformer block path, e.g. ``"model.layers.{}"``.
        rewrite_module_tmp: template of the edited MLP output projection, e.g.
            ``"model.layers.{}.mlp.down_proj"``.
        final_norm: path of the norm applied to the last block's output before the LM head, or None.
        num_layers: N, the number of blocks.
        hidden_size: d, out features of the rewrite module.
        key_size: d_k, in features of the rewrite module.
        conv1d: True when the rewrite module is a GPT-2 style ``Conv1D`` (weight stored ``[d_k, d]``).
        layer_style: which default-layer rule applies (``ALGORITHMS.md`` §11.7).
        logit_softcap: ``config.final_logit_softcapping`` (Gemma-2), else None.
        output_projection: path of a projection applied after the final norm and before the LM head
            (OPT's ``project_out`` when ``word_embed_proj_dim != hidden_size``), else None.
    """

    model_type: str
    layer_module_tmp: str
    rewrite_module_tmp: str
    final_norm: str | None
    num_layers: int
    hidden_size: int
    key_size: int
    conv1d: bool
    layer_style: LayerStyle
    logit_softcap: float | None = None
    output_projection: str | None = None

    def __post_init__(self) -> None:
        _check_template("layer_module_tmp", self.layer_module_tmp)
        _check_template("rewrite_module_tmp", self.rewrite_module_tmp)
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.layer_style not in ("gated", "gpt"):
            raise ValueError(f"layer_style must be 'gated' or 'gpt', got {self.layer_style!r}")

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise IndexError(
                f"layer {layer} is out of range for a model with {self.num_layers} blocks "
                f"(valid: 0..{self.num_layers - 1})"
            )

    def block_name(self, layer: int) -> str:
        """Module path of block ``layer``."""
        self._check_layer(layer)
        return self.layer_module_tmp.format(layer)

    def block(self, model: nn.Module, layer: int) -> nn.Module:
        """Transformer block ``layer`` of ``model``."""
        return model.get_submodule(self.block_name(layer))

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """All N blocks of ``model`` in order."""
        return [self.block(model, layer) for layer in range(self.num_layers)]

    def rewrite_module_name(self, layer: int) -> str:
        """Module path of the edited projection of ``layer``."""
        self._check_layer(layer)
        return self.rewrite_module_tmp.format(layer)

    def rewrite_module(self, model: nn.Module, layer: int) -> nn.Module:
        """The edited projection (``nn.Linear`` or ``Conv1D``) of ``layer``."""
        return model.get_submodule(self.rewrite_module_name(layer))

    def mlp_matrices(self, model: nn.Module, layer: int) -> list[str]:
        """Dotted paths of every weight matrix of the MLP of ``layer``, in module order: the ``nn.Linear`` /
        ``Conv1D`` children of the module holding the rewrite module (gate/up/down for Llama, ``c_fc``/``c_proj``
        for GPT-2, ``fc1``/``fc2`` for OPT, whose MLP matrices sit in the block itself)."""
        parent = self.rewrite_module_name(layer).rpartition(".")[0]
        return [f"{parent}.{name}" for name, child in model.get_submodule(parent).named_children()
                if _is_projection(child)]

    def layer_of(self, module: str) -> int:
        """Index of the block that holds the module at the dotted path ``module``."""
        for layer in range(self.num_layers):
            if module.startswith(self.block_name(layer) + "."):
                return layer
        raise ValueError(f"module {module!r} is not inside any block {self.layer_module_tmp!r}")

    def final_norm_module(self, model: nn.Module) -> nn.Module | None:
        """The norm applied to the last block's output, or None when the model has none."""
        return None if self.final_norm is None else model.get_submodule(self.final_norm)

    def default_layers(self) -> list[int]:
        """Default edited layers (``ALGORITHMS.md`` §11.7), increasing and within ``[0, N-1]``.

        ``gated``: ``start = round(N/8)``, ``count = max(4, round(N/8)) + 1``, layers
        ``start .. start+count-1`` (N=32 -> 4..8). ``gpt``: ``round(0.27 N) .. round(0.35 N)``
        (N=48 -> 13..17). Rounding is half-up; ranges are clipped to the model's blocks.
        """
        n = self.num_layers
        if self.layer_style == "gated":
            start = round_half_up(0.125 * n)
            stop = start + max(4, start)
        else:
            start = round_half_up(0.27 * n)
            stop = round_half_up(0.35 * n)
        start = min(start, n - 1)
        stop = min(max(stop, start), n - 1)
        return list(range(start, stop + 1))

    def weight(self, model: nn.Module, layer: int) -> torch.Tensor:
        """Weight of the edited projection of ``layer`` in math orientation ``[d, d_k]``.

        The parameter itself for ``nn.Linear``; a transposed view of it for ``Conv1D``.
        """
        stored = self.rewrite_module(model, layer).weight
        return stored.T if self.conv1d else stored

    def add_to_weight(self, model: nn.Module, layer: int, delta: torch.Tensor) -> None:
        """In place ``W_layer += delta`` for ``delta: [d, d_k]`` in math orientation, any dtype/device.

        The sum is formed in at least float32 and rounded once to the weight's dtype.
        """
        expected = (self.hidden_size, self.key_size)
        if tuple(delta.shape) != expected:
            raise ValueError(
                f"delta for {self.rewrite_module_name(layer)} must have shape [d, d_k] = {list(expected)} "
                f"(math orientation, v = W k), got {list(delta.shape)}"
            )
        stored = self.rewrite_module(model, layer).weight
        compute_dtype = torch.promote_types(torch.promote_types(stored.dtype, delta.dtype), torch.float32)
        with torch.no_grad():
            update = delta.to(device=stored.device, dtype=compute_dtype)
            if self.conv1d:
                update = update.T
            stored.copy_((stored.to(compute_dtype) + update).to(stored.dtype))

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., vocab]`` from the last block's output ``hidden: [..., d]``.

        Applies the final norm (if any), the output projection (if any), the LM head (with its bias)
        and the final logit soft-cap ``tanh(x / c) * c`` (if any), exactly as the model's forward does.
        """
        norm = self.final_norm_module(model)
        if norm is not None:
            hidden = norm(hidden)
        if self.output_projection is not None:
            hidden = model.get_submodule(self.output_projection)(hidden)
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(
                f"{type(model).__name__} has no output embeddings (LM head); "
                "load it with AutoModelForCausalLM"
            )
        logits = head(hidden)
        if self.logit_softcap is not None:
            logits = logits / self.logit_softcap
            logits = torch.tanh(logits)
            logits = logits * self.logit_softcap
        return logits


def _count_blocks(model: nn.Module, layer_module_tmp: str) -> int:
    count = 0
    while _get_module(model, layer_module_tmp.format(count)) is not None:
        count += 1
    return count


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Outermost non-empty ModuleLists, longest first."""
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
    ]
    outermost = [
        (name, module)
        for name, module in lists
        if not any(name.startswith(other + ".") for other, _ in lists)
    ]
    return sorted(outermost, key=lambda item: -len(item[1]))


def _suggest_rewrite(block: nn.Module) -> str | None:
    """Relative path of the likely MLP output projection inside a block."""
    candidates = [
        (name, name.rsplit(".", 1)[-1])
        for name, module in block.named_modules()
        if _is_projection(module) and name.rsplit(".", 1)[-1] in _REWRITE_NAMES
    ]
    if not candidates:
        return None

    def rank(candidate: tuple[str, str]) -> tuple[int, int]:
        name, leaf = candidate
        in_mlp = any(marker in name.lower() for marker in _MLP_PATH_MARKERS)
        return (0 if in_mlp else 1, _REWRITE_NAMES.index(leaf))

    return min(candidates, key=rank)[0]


def _infer_final_norm(model: nn.Module, layer_module_tmp: str) -> str | None:
    """The single norm module that is a sibling of the block list, e.g. ``model.norm``."""
    list_path = layer_module_tmp.split(".{}", 1)[0]
    parent_path = list_path.rsplit(".", 1)[0] if "." in list_path else ""
    parent = _get_module(model, parent_path)
    if parent is None:
        return None
    norms = [
        name
        for name, child in parent.named_children()
        if "norm" in type(child).__name__.lower() or name in ("ln_f", "norm", "final_layer_norm")
    ]
    if len(norms) != 1:
        return None
    return f"{parent_path}.{norms[0]}" if parent_path else norms[0]


def _infer_layer_style(model: nn.Module, rewrite_name: str) -> LayerStyle:
    """``gated`` when the MLP holding the rewrite module has a gate (a ``*gate*`` projection, or two
    other projections), else ``gpt``."""
    parent = model.get_submodule(rewrite_name.rsplit(".", 1)[0]) if "." in rewrite_name else model
    leaf = rewrite_name.rsplit(".", 1)[-1]
    others = [name for name, child in parent.named_children() if name != leaf and _is_projection(child)]
    return "gated" if len(others) >= 2 or any("gate" in name for name in others) else "gpt"


def _unsupported_error(
    model: nn.Module, model_type: str | None, layer_module_tmp: str | None, rewrite_module_tmp: str | None
) -> UnsupportedArchitectureError:
    lists = _block_lists(model)
    layer_tmp = layer_module_tmp or (f"{lists[0][0]}.{{}}" if lists else None)
    suggestion = None
    if layer_tmp is not None and rewrite_module_tmp is None:
        first_block = _get_module(model, layer_tmp.format(0))
        relative = _suggest_rewrite(first_block) if first_block is not None else None
        if relative is not None:
            suggestion = (layer_tmp, f"{layer_tmp}.{relative}")
    elif layer_tmp is not None:
        suggestion = (layer_tmp, rewrite_module_tmp)
    if suggestion is not None:
        args = f"layer_module_tmp={suggestion[0]!r}, rewrite_module_tmp={suggestion[1]!r}"
        norm = _infer_final_norm(model, suggestion[0])
        if norm is not None:
            args += f", final_norm={norm!r}"
        how = (
            f"pass EditingArguments({args}) (guessed from the model's modules: the blocks and the "
            "MLP output projection that is edited; check them)"
        )
    else:
        how = (
            "pass EditingArguments(layer_module_tmp='model.layers.{}', "
            "rewrite_module_tmp='model.layers.{}.mlp.down_proj') with the paths of this model's "
            "transformer blocks and MLP output projections"
        )
        if lists:
            how += " (ModuleLists in the model: " + ", ".join(repr(n) for n, _ in lists) + ")"
    given = ""
    if (layer_module_tmp is None) != (rewrite_module_tmp is None):
        passed, missing = (
            ("layer_module_tmp", "rewrite_module_tmp")
            if rewrite_module_tmp is None
            else ("rewrite_module_tmp", "layer_module_tmp")
        )
        given = f" You passed {passed} but not {missing}; both are needed."
    described = (
        f"model_type {model_type!r}" if model_type is not None else "a model without config.model_type"
    )
    return UnsupportedArchitectureError(
        f"{described} ({type(model).__name__}) has no built-in module templates "
        f"(known: {', '.join(known_model_types())}).{given} To edit it, {how}."
    )


def resolve_model_spec(
    model: nn.Module,
    *,
    layer_module_tmp: str | None = None,
    rewrite_module_tmp: str | None = None,
    final_norm: str | None = None,
) -> ModelSpec:
    """Build the :class:`ModelSpec` of ``model``.

    Known ``config.model_type`` values use built-in templates; any argument given overrides the
    corresponding built-in value. Other model types need both ``layer_module_tmp`` and
    ``rewrite_module_tmp`` (a model without ``config.model_type`` gets its class name as model type);
    their final norm, when not given, is the single norm module next to the block
    list (e.g. ``model.norm``), and their layer style is ``gated`` when the MLP has a gate projection.

    N is the number of consecutive blocks ``layer_module_tmp.format(0), .format(1), ...`` that exist;
    d and d_k are the out and in features of the rewrite module, which must be ``nn.Linear`` or
    ``Conv1D`` with the same shape in every layer.

    Raises:
        UnsupportedArchitectureError: unknown model type without both templates.
        ValueError: a template without exactly one ``{}``, a path that does not exist, or a rewrite
            module that is not a Linear/Conv1D; the message names the offending argument.
    """
    for field, template in (
        ("layer_module_tmp", layer_module_tmp),
        ("rewrite_module_tmp", rewrite_module_tmp),
    ):
        if template is not None:
            _check_template(field, template)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = _FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None and (layer_module_tmp is None or rewrite_module_tmp is None):
        raise _unsupported_error(model, model_type, layer_module_tmp, rewrite_module_tmp)

    layer_tmp = layer_module_tmp if layer_module_tmp is not None else family.layer_module_tmp
    rewrite_tmp = rewrite_module_tmp if rewrite_module_tmp is not None else family.rewrite_module_tmp

    num_layers = _count_blocks(model, layer_tmp)
    if num_layers == 0:
        builtin_for = model_type if layer_module_tmp is None else None
        raise _missing_module_error(model, "layer_module_tmp", layer_tmp, layer_tmp.format(0), builtin_for)

    rewrite_modules = []
    for layer in range(num_layers):
        name = rewrite_tmp.format(layer)
        module = _get_module(model, name)
        if module is None:
            builtin_for = model_type if rewrite_module_tmp is None else None
            raise _missing_module_error(model, "rewrite_module_tmp", rewrite_tmp, name, builtin_for)
        if not _is_projection(module):
            raise ValueError(
                f"rewrite_module_tmp={rewrite_tmp!r}: {name!r} is a {type(module).__name__}, "
                "expected the MLP output projection (nn.Linear or transformers Conv1D)"
            )
        rewrite_modules.append(module)
    conv1d = isinstance(rewrite_modules[0], Conv1D)
    hidden_size, key_size = _projection_shape(rewrite_modules[0])
    for layer, module in enumerate(rewrite_modules):
        if isinstance(module, Conv1D) != conv1d or _projection_shape(module) != (hidden_size, key_size):
            raise ValueError(
                f"rewrite_module_tmp={rewrite_tmp!r}: layer {layer} has a "
                f"{type(module).__name__} of shape (d, d_k) = {_projection_shape(module)}, "
                f"layer 0 a {type(rewrite_modules[0]).__name__} of {(hidden_size, key_size)}; "
                "all edited projections must have the same type and shape"
            )

    if final_norm is not None:
        if _get_module(model, final_norm) is None:
            raise _missing_module_error(model, "final_norm", final_norm, final_norm)
        norm_path: str | None = final_norm
    elif family is not None:
        norm_path = family.final_norm if family.final_norm and _get_module(model, family.final_norm) else None
    else:
        norm_path = _infer_final_norm(model, layer_tmp)

    projection = family.output_projection if family is not None else None
    if projection is not None and _get_module(model, projection) is None:
        projection = None

    if family is not None:
        layer_style = family.layer_style
    else:
        layer_style = _infer_layer_style(model, rewrite_tmp.format(0))
    softcap = getattr(config, "final_logit_softcapping", None)
    return ModelSpec(
        model_type=model_type if isinstance(model_type, str) else type(model).__name__,
        layer_module_tmp=layer_tmp,
        rewrite_module_tmp=rewrite_tmp,
        final_norm=norm_path,
        num_layers=num_layers,
        hidden_size=hidden_size,
        key_size=key_size,
        conv1d=conv1d,
        layer_style=layer_style,
        logit_softcap=float(softcap) if softcap is not None else None,
        output_projection=projection,
    )
