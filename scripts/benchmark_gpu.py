"""GPU benchmark: a Llama-3-8B-shaped model with random weights, built from a config. Not a test.

    python scripts/benchmark_gpu.py                                  # CUDA, bf16, Llama-3-8B shape (~5 min)
    python scripts/benchmark_gpu.py --device cpu --shape tiny --batch_size 4 --statistics_samples 40   # the CPU path

Timings do not depend on the weights' values, so a random-weight model of the real shape times what the trained
one would (the vocabulary is SmolLM2's 49,152 tokens instead of Llama-3's 128,256: a smaller LM head, the rest
identical). `preset="reference"` on a random model runs the full 25 target steps of every request, the work of the
paper's anchor (~223 s per 100-edit batch of Llama-3-8B on an A40).

Prints and writes JSON (`--output`, default benchmark_results/gpu.json): the statistics pass in tokens/s against a
bare and a truncated forward over the same batches (one run, interleaved rounds), seconds for one batch of
`--batch_size` edits split into targets / keys / solve, and the peak CUDA memory and peak RSS of each part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import tempfile
from pathlib import Path

import torch
from benchmark_core import DATA, ROOT, benchmark_edits, benchmark_statistics
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_alphaedit import AlphaEditModel, EditingArguments
from hf_alphaedit.corpus import load_corpus_texts
from hf_alphaedit.hub import DEFAULT_MODEL, load_model_and_tokenizer

SHAPES = {
    "llama3-8b": {"config": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                             "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
                             "max_position_embeddings": 8192, "rms_norm_eps": 1e-5},
                  "layers": [4, 5, 6, 7, 8]},
    "tiny": {"config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "max_position_embeddings": 512},
             "layers": [1, 2]},
}
WORDS = ("river", "castle", "music", "engine", "garden", "planet", "letter", "winter", "market", "doctor")


def random_weight_model(shape: str, tokenizer, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A Llama of `shape` with random weights, initialised directly on `device`."""
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         **SHAPES[shape]["config"])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def synthetic_requests(count: int, seed: int = 0) -> list[dict]:
    """CounterFact-like requests (`prompt` with `{}`, `subject`, `target_new`) of CounterFact's typical lengths."""
    rng = random.Random(seed)
    prompts = ("{} is located in the city of", "The mother tongue of {} is", "{} plays the sport of",
               "{} was created by the company", "The official language of {} is")
    return [{"prompt": rng.choice(prompts), "subject": " ".join(rng.choice(WORDS) for _ in range(2)).title(),
             "target_new": rng.choice(WORDS)} for _ in range(count)]


def peak_memory() -> dict:
    """Peak CUDA memory (GiB, since the last reset) and the process's peak RSS (GiB, since it started)."""
    cuda = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"peak_cuda_gib": cuda, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--statistics_samples", type=int, default=2000)
    parser.add_argument("--statistics_rounds", type=int, default=2)
    parser.add_argument("--output", default=str(ROOT / "benchmark_results" / "gpu.json"))
    options = parser.parse_args()
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu --shape tiny to try the CPU path")
    _, tokenizer, _ = load_model_and_tokenizer(DEFAULT_MODEL)
    model = random_weight_model(options.shape, tokenizer, options.device, getattr(torch, options.dtype))
    wikitext = DATA / "wikitext-2" / "valid.txt"
    with tempfile.TemporaryDirectory() as scratch:
        if wikitext.is_file():
            corpus = str(wikitext)
        else:  # the device machine has no shared data: random words have the same cost per token
            rng = random.Random(0)
            corpus = os.path.join(scratch, "corpus.txt")
            Path(corpus).write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 400)))
                                              for _ in range(options.statistics_samples)), encoding="utf-8")
        args = EditingArguments(preset="reference", layers=SHAPES[options.shape]["layers"], statistics_corpus=corpus,
                                statistics_samples=options.statistics_samples,
                                statistics_cache_dir=os.path.join(scratch, "statistics"), projection="compute",
                                disable_tqdm=True, batch_size=options.batch_size)
        editor = AlphaEditModel(model, tokenizer, args)
        report: dict = {"machine": {"platform": platform.platform(), "device": str(editor.device),
                                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                                    "threads": torch.get_num_threads(), "load_average": os.getloadavg()},
                        "model": {"shape": options.shape, "dtype": options.dtype, "weights": "random",
                                  "parameters": sum(p.numel() for p in model.parameters()),
                                  "edited_layers": SHAPES[options.shape]["layers"]}}
        texts = load_corpus_texts(corpus, options.statistics_samples)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        report["statistics"] = {**benchmark_statistics(editor, texts, options.statistics_rounds), **peak_memory()}
        print(json.dumps(report["statistics"], indent=2), flush=True)
        editor.null_space_projector(editor.hparams.layers)  # the statistics the edit needs, outside its timing
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        edits = benchmark_edits(editor, synthetic_requests(options.batch_size), options.batch_size)
        report["edits"] = {**edits, **peak_memory(), "forward_mode": editor.forward_mode}
        print(json.dumps(report["edits"], indent=2), flush=True)
    Path(options.output).parent.mkdir(parents=True, exist_ok=True)
    Path(options.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
