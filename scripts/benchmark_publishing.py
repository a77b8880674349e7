"""Bytes of a published edited model: full checkpoint vs PEFT LoRA adapter vs delta files. Not a test.

    python scripts/benchmark_publishing.py [--num_edits 100 1000] [--batch_size 100] [--output FILE]

For SmolLM2-135M (architecture of the default model, randomly initialised: sizes depend on shapes only) it
synthesises batches of factors of the shapes AlphaEdit produces (`left` `[d, n]`, `right` and keys `[n, d_k]` per
edited layer and batch, with `n` requests per batch), writes them with `save_edits(format="lora")` and
`save_edits(format="delta")`, and reports the folder sizes (weights, config, edit log and card included). The
full checkpoint's weights are counted from the parameter shapes (safetensors stores raw tensors plus a small JSON
header); a published checkpoint also carries the delta files (the edit state), so they are added to it.
Llama-3-8B is given by the same formulas, from its parameter count on the meta device:

    checkpoint ≈ P · b          LoRA ≈ 4 · L · N · (d + d_k)          delta ≈ 4 · L · N · (d + 2 d_k)

(`P` parameters of `b` bytes, `L` edited layers, `N` edits, `d` hidden size, `d_k` MLP size; factors in float32;
the delta files also keep each edit's keys so that editing and revert can continue after loading.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_alphaedit import AlphaEditModel, EditingArguments
from hf_alphaedit.architectures import resolve_model_spec
from hf_alphaedit.methods import LayerUpdate
from hf_alphaedit.requests import EditRequest
from hf_alphaedit.state import BatchRecord

# Published configs (config.json of HuggingFaceTB/SmolLM2-135M-Instruct and meta-llama/Meta-Llama-3-8B).
SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
                "tie_word_embeddings": True}
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "tie_word_embeddings": False}
FLOAT32_BYTES = 4


def _parameter_count(config: dict) -> int:
    """Parameters of the model as saved (tied embeddings once), counted on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**config))
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def _edited_shape(config: dict) -> tuple[list[int], int, int]:
    """(default edited layers, d, d_k) of a Llama-type model."""
    with torch.device("meta"):
        spec = resolve_model_spec(AutoModelForCausalLM.from_config(LlamaConfig(**config)))
    return spec.default_layers(), spec.hidden_size, spec.key_size


def _synthetic_editor(num_edits: int, batch_size: int) -> AlphaEditModel:
    """SmolLM2-135M (random weights) carrying `num_edits` synthetic edits in batches of `batch_size`."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_135M), dtype=torch.float32)
    args = EditingArguments(statistics_corpus="Salesforce/wikitext:wikitext-2-raw-v1")
    editor = AlphaEditModel(model, None, args)
    d, d_k = editor.spec.hidden_size, editor.spec.key_size
    for index, start in enumerate(range(0, num_edits, batch_size)):
        n = min(batch_size, num_edits - start)
        requests = [EditRequest(prompt="{} is located in the city of", subject=f"Landmark number {start + i}",
                                target_new="Rome", target_true="Paris", case_id=start + i) for i in range(n)]
        updates = [LayerUpdate(layer, torch.randn(d, n) * 1e-3, torch.randn(n, d_k), torch.randn(n, d_k))
                   for layer in editor.hparams.layers]
        editor.state.batches.append(BatchRecord(index, requests, updates, [0.01] * n, [20] * n, [0.9] * n, {},
                                                time.time()))
    return editor


def _folder_bytes(folder: Path) -> dict[str, int]:
    sizes = {path.name: path.stat().st_size for path in sorted(folder.iterdir())}
    return {**sizes, "total": sum(sizes.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_edits", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--output", default=None, help="also write the report as JSON here")
    options = parser.parse_args()

    report: dict = {"smollm2_135m": {}, "llama3_8b": {}}
    parameters = _parameter_count(SMOLLM2_135M)
    layers, d, d_k = _edited_shape(SMOLLM2_135M)
    report["smollm2_135m"]["model"] = {"parameters": parameters, "edited_layers": layers, "d": d, "d_k": d_k,
                                       "checkpoint_weights_float32": parameters * FLOAT32_BYTES,
                                       "checkpoint_weights_bfloat16": parameters * 2}
    for num_edits in options.num_edits:
        editor = _synthetic_editor(num_edits, options.batch_size)
        row: dict = {}
        with tempfile.TemporaryDirectory() as folder:
            for file_format in ("lora", "delta"):
                written = editor.save_edits(Path(folder) / file_format, format=file_format)
                row[file_format] = _folder_bytes(written)
        row["checkpoint_float32"] = parameters * FLOAT32_BYTES + row["delta"]["total"]
        row["formula"] = {"lora": FLOAT32_BYTES * len(layers) * num_edits * (d + d_k),
                          "delta": FLOAT32_BYTES * len(layers) * num_edits * (d + 2 * d_k)}
        report["smollm2_135m"][str(num_edits)] = row
        print(f"SmolLM2-135M, {num_edits} edits: checkpoint (fp32 weights + edit state) "
              f"{row['checkpoint_float32'] / 1e6:.1f} MB, LoRA {row['lora']['total'] / 1e6:.2f} MB "
              f"(formula {row['formula']['lora'] / 1e6:.2f}), delta {row['delta']['total'] / 1e6:.2f} MB "
              f"(formula {row['formula']['delta'] / 1e6:.2f})", flush=True)

    parameters = _parameter_count(LLAMA3_8B)
    layers, d, d_k = _edited_shape(LLAMA3_8B)
    per_edit = {"lora": FLOAT32_BYTES * len(layers) * (d + d_k),
                "delta": FLOAT32_BYTES * len(layers) * (d + 2 * d_k)}
    report["llama3_8b"] = {"parameters": parameters, "edited_layers": layers, "d": d, "d_k": d_k,
                           "checkpoint_weights_bfloat16": parameters * 2, "bytes_per_edit": per_edit,
                           **{str(n): {k: v * n for k, v in per_edit.items()} for n in options.num_edits}}
    print(f"Llama-3-8B: checkpoint {parameters * 2 / 1e9:.2f} GB (bf16, {parameters:,} parameters); per edit "
          f"LoRA {per_edit['lora'] / 1e3:.1f} kB, delta {per_edit['delta'] / 1e3:.1f} kB "
          f"(layers {layers[0]}-{layers[-1]}, d={d}, d_k={d_k})", flush=True)
    if options.output:
        Path(options.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
