"""Projection artifacts: bytes on disk vs a dense fp32 projector, and loading vs recomputing. Not a test.

    python scripts/benchmark_artifacts.py [--statistics_samples 1000] [--layers 4 5 6 7 8]

On the embedded SmolLM2-135M-Instruct (offline) it computes the key statistics and projector of the layers from
wikitext-2, saves them as an artifact, and reports (one run, one machine):
(a) artifact bytes (statistics, projector, total) vs the dense float32 projector P the reference code stores;
(b) seconds to compute (statistics pass + eigendecomposition) vs seconds to load the artifact;
(c) the same byte counts by formula for Llama-3-8B, Qwen2.5-7B and GPT-J-6B at the reference layers.
Writes JSON to `--output` (default benchmark_results/artifacts.json).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from hf_alphaedit import AlphaEditModel, EditingArguments, NullSpaceProjector

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
# (d_k = MLP intermediate size, edited layers) of the reference hyperparameter files (ALGORITHMS.md §11).
OTHER_MODELS = {
    "Llama-3-8B": (14336, [4, 5, 6, 7, 8]),
    "Qwen2.5-7B": (18944, [4, 5, 6, 7, 8]),
    "GPT-J-6B": (16384, [3, 4, 5, 6, 7, 8]),
}


def artifact_bytes(d_k: int, stored_basis_width: int) -> dict[str, int]:
    """Bytes of one layer: packed float64 upper triangle of Σ k kᵀ, the float64 basis `[d_k, m]` and spectrum."""
    statistics = d_k * (d_k + 1) // 2 * 8 + 8
    projector = stored_basis_width * d_k * 8 + d_k * 8
    return {"statistics": statistics, "projector": projector, "dense_fp32_projector": d_k * d_k * 4}


def formula_rows() -> dict[str, dict[str, float]]:
    """Per model: dense fp32 P of all layers vs our artifact in the best (m = 0) and worst (m = d_k/2) cases."""
    rows = {}
    for name, (d_k, layers) in OTHER_MODELS.items():
        best, worst = artifact_bytes(d_k, 0), artifact_bytes(d_k, d_k // 2)
        rows[name] = {
            "d_k": d_k, "layers": len(layers),
            "dense_fp32_projector_GB": len(layers) * best["dense_fp32_projector"] / 1e9,
            "statistics_GB": len(layers) * best["statistics"] / 1e9,
            "artifact_GB_min": len(layers) * (best["statistics"] + best["projector"]) / 1e9,
            "artifact_GB_max": len(layers) * (worst["statistics"] + worst["projector"]) / 1e9,
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--statistics_samples", type=int, default=1000)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 5, 6, 7, 8])
    parser.add_argument("--output", default=str(ROOT / "benchmark_results" / "artifacts.json"))
    options = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as scratch:
        args = EditingArguments(layers=options.layers, statistics_corpus=str(DATA / "wikitext-2" / "valid.txt"),
                                statistics_samples=options.statistics_samples, projection="compute",
                                statistics_cache_dir=str(Path(scratch) / "cache"), disable_tqdm=True)
        model = AlphaEditModel.from_pretrained(editing_args=args)
        start = time.perf_counter()
        projector = model.null_space_projector(options.layers)
        compute_seconds = time.perf_counter() - start
        folder = Path(scratch) / "artifact"
        projector.save_pretrained(folder)
        start = time.perf_counter()
        loaded = NullSpaceProjector.from_pretrained(folder, model=model)
        load_seconds = time.perf_counter() - start
        assert loaded.layers == projector.layers
        statistics = sum(p.stat().st_size for p in (folder / "statistics").iterdir())
        projector_files = sum(p.stat().st_size for p in (folder / "projector").iterdir())
    d_k = model.spec.key_size
    dense = len(options.layers) * d_k * d_k * 4
    result = {
        "model": "SmolLM2-135M-Instruct (embedded Q4_1 GGUF, dequantized)",
        "layers": options.layers, "d_k": d_k, "statistics_samples": options.statistics_samples,
        "tokens": projector.statistics.counts[options.layers[0]],
        "threshold": projector.threshold, "threshold_mode": projector.threshold_mode,
        "null_space_dims": {layer: projector.null_space_dim(layer) for layer in options.layers},
        "statistics_bytes": statistics, "projector_bytes": projector_files,
        "artifact_bytes": statistics + projector_files, "dense_fp32_projector_bytes": dense,
        "artifact_vs_dense": (statistics + projector_files) / dense,
        "projector_vs_dense": projector_files / dense,
        "compute_seconds": compute_seconds, "load_seconds": load_seconds,
        "compute_vs_load": compute_seconds / load_seconds,
        "other_models": formula_rows(),
    }
    Path(options.output).parent.mkdir(parents=True, exist_ok=True)
    Path(options.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
