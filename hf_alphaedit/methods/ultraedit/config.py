"""`UltraEditConfig`: UltraEdit's settings (Gu et al., 2025, the reference's `config/editor/ultraedit.yaml`).

The edited matrices are `edit_modules` (the reference's `model.edit_modules`); unset, the MLP output projection
(`down_proj` / `c_proj` / `fc_out` / `fc2`, the rewrite module of `ModelSpec`) of every block in
`EditingArguments.layers`, whose default (`UltraEdit.default_layers`) is the nine blocks ending at the second-to-last:
the blocks of the reference's GPT-J, Phi-4, Qwen2.5-7B and Gemma-3-27B configs (Mistral-7B's two also end there).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...fields import setting
from ...registry import MethodConfig


@dataclass
class UltraEditConfig(MethodConfig):
    """Settings of UltraEdit."""

    lr: float = setting("Step size of the pseudo-values v = −lr·‖k̂‖²·ĝ (the reference's editor.lr).", default=1e-6,
                        low=0, low_open=True)
    chunk_size: int = setting(
        "Requests per forward/backward pass: each chunk's loss is the mean cross-entropy over its answer tokens, and "
        "the running normaliser is updated once per chunk and matrix (the reference's dataset.batch_size; requests "
        "are sorted longest first before chunking, as its collate_fn does).", default=10, low=1)
    edit_modules: list[str] | None = setting(
        "Dotted paths of the edited nn.Linear / Conv1D matrices, e.g. model.layers.18.mlp.up_proj (the reference's "
        "model.edit_modules; the Llama-3 / Qwen2.5 / Gemma-3 configs edit gate_proj and up_proj). Default: the MLP "
        "output projection of every block in EditingArguments.layers.", default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.edit_modules is not None:
            if not self.edit_modules or not all(isinstance(name, str) and name for name in self.edit_modules):
                raise ValueError(f"UltraEditConfig.edit_modules={self.edit_modules!r}: give a non-empty list of "
                                 "dotted module paths (e.g. ['model.layers.18.mlp.up_proj']), or None for the "
                                 "default.")
            repeated = sorted({name for name in self.edit_modules if self.edit_modules.count(name) > 1})
            if repeated:
                raise ValueError(f"UltraEditConfig.edit_modules: {repeated} appear more than once; list each "
                                 "matrix once.")
