"""Core-engine benchmark on the embedded SmolLM2-135M-Instruct (CPU by default). Not a test.

    python scripts/benchmark_core.py [--statistics_samples 1000] [--batch_sizes 20 100] [--target_requests 10]
                                     [--parts statistics edits targets] [--target_batch_tokens 8192]
                                     [--target_memory_budget auto] [--statistics_memory_budget auto]
                                     [--preset reference]

Prints and writes JSON (`--output`, default benchmark_results/core.json) with
(a) statistics-pass tokens/s vs a bare full forward and vs a forward truncated after the deepest edited module
    over the same batches;
(b) seconds per edit for one batch at each batch size, split into targets / keys / solve;
(c) target optimisation: batched vs one request at a time (same fast forward), and vs one request at a time
    through the whole model as the reference code runs it;
(d) the process's peak RSS and the load average (one process per configuration for memory figures: e.g.
    `--parts edits --batch_sizes 100 --target_memory_budget 1GiB --statistics_memory_budget 1GiB` against
    `none` for both).
All ratios come from one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

from hf_alphaedit import AlphaEditModel, EditingArguments
from hf_alphaedit.corpus import load_corpus_texts
from hf_alphaedit.forward import right_pad, run_until
from hf_alphaedit.methods.prompts import ensure_context_templates
from hf_alphaedit.methods.targets import TargetOptimizer
from hf_alphaedit.requests import as_edit_requests
from hf_alphaedit.statistics import collect_key_statistics, pack_by_token_budget

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def _timed(fn) -> float:
    """Seconds `fn()` takes, GPU work included."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def benchmark_statistics(model: AlphaEditModel, texts: list[str], rounds: int) -> dict:
    """Tokens/s of the statistics pass over `texts`, of a bare full forward and of a forward truncated after the
    deepest edited module over the same packed batches (fastest of `rounds` interleaved rounds)."""
    layers, spec, args = list(model.hparams.layers), model.spec, model.editing_args
    max_length = model.provider.statistics_max_length()
    encoded = model.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    batches = pack_by_token_budget(sorted((e for e in encoded if e), key=len, reverse=True),
                                    args.statistics_batch_tokens)
    tokens = sum(len(s) for b in batches for s in b)
    padded = sum(len(b) * len(b[0]) for b in batches)
    pad_id = model.tokenizer.pad_token_id
    padded_batches = [right_pad(b, pad_id, model.device) for b in batches]
    deepest = spec.rewrite_module(model.model, layers[-1])

    def forward(truncated: bool) -> None:
        with torch.inference_mode():
            for ids, mask in padded_batches:
                if truncated:
                    run_until(model.model, deepest, input_ids=ids, attention_mask=mask)
                else:
                    model.model(input_ids=ids, attention_mask=mask, use_cache=False)

    def statistics_pass() -> None:
        collect_key_statistics(model.model, model.tokenizer, spec, layers, texts, max_length=max_length,
                               batch_tokens=args.statistics_batch_tokens, show_progress=False)

    # Interleaved rounds, fastest of each: the three see the same machine load.
    full, truncated, ours = (min(times) for times in zip(*[
        (_timed(lambda: forward(False)), _timed(lambda: forward(True)), _timed(statistics_pass))
        for _ in range(rounds)], strict=True))
    return {"samples": len(texts), "layers": layers, "tokens": tokens, "padding_fraction": 1 - tokens / padded,
            "rounds": rounds, "load_average": os.getloadavg(),
            "tokens_per_s": {"statistics_pass": tokens / ours, "bare_full_forward": tokens / full,
                             "truncated_forward": tokens / truncated},
            "ratio_vs_truncated_forward": truncated / ours, "ratio_vs_full_forward": full / ours}


def benchmark_edits(model: AlphaEditModel, records: list[dict], batch_size: int) -> dict:
    result = model.edit(records[:batch_size], batch_size=batch_size)
    batch = result.batches[0]
    model.reset()
    return {"batch_size": batch_size, "seconds": batch.seconds, "seconds_per_edit": batch.seconds / batch_size,
            "split_seconds": batch.timings, "mean_target_steps": sum(batch.target_steps) / batch_size,
            "min_target_probability": min(batch.target_probabilities)}


def benchmark_targets(model: AlphaEditModel, records: list[dict], count: int) -> dict:
    requests = as_edit_requests(records[:count])
    ensure_context_templates(model.state.context_templates, model.model, model.tokenizer, model.hparams,
                             model.editing_args.seed)
    common = (model.model, model.tokenizer, model.spec, model.hparams, model.state.context_templates)
    timings = {}
    for name, kwargs in {"batched": {}, "per_request": {"batch_tokens": 1},
                         "per_request_full_model": {"batch_tokens": 1, "mode": "full"}}.items():
        optimizer = TargetOptimizer(*common, **kwargs)
        with model.engine.editing_mode():
            timings[name] = _timed(lambda optimizer=optimizer: optimizer.optimize(requests))
    return {"requests": count, "seconds": timings,
            "speedup_batched_vs_per_request": timings["per_request"] / timings["batched"],
            "speedup_batched_vs_per_request_full_model": timings["per_request_full_model"] / timings["batched"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--statistics_samples", type=int, default=1000)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--target_requests", type=int, default=10)
    parser.add_argument("--preset", choices=("auto", "reference"), default="auto",
                        help="'reference': the official hyperparameters (25 steps, no large first step) on both sides")
    parser.add_argument("--statistics_rounds", type=int, default=3)
    parser.add_argument("--v_num_grad_steps", type=int, default=None,
                        help="cap on target-optimisation steps (equal work on both sides of a memory comparison)")
    parser.add_argument("--target_batch_tokens", type=int, default=EditingArguments.target_batch_tokens,
                        help="token budget of one target micro-batch (peak memory: run one process per value)")
    parser.add_argument("--target_memory_budget", default=EditingArguments.target_memory_budget,
                        help="memory budget of one target micro-batch ('1.5GiB', 'auto', 'none')")
    parser.add_argument("--statistics_memory_budget", default=EditingArguments.statistics_memory_budget,
                        help="memory budget of one statistics batch of the edits part ('1GiB', 'auto', 'none')")
    parser.add_argument("--parts", nargs="+", choices=("statistics", "edits", "targets"),
                        default=["statistics", "edits", "targets"])
    parser.add_argument("--output", default=str(ROOT / "benchmark_results" / "core.json"))
    options = parser.parse_args()
    args = EditingArguments(statistics_corpus=str(DATA / "wikitext-2" / "valid.txt"),
                            statistics_samples=options.statistics_samples, disable_tqdm=True,
                            target_batch_tokens=options.target_batch_tokens,
                            target_memory_budget=options.target_memory_budget,
                            statistics_memory_budget=options.statistics_memory_budget, preset=options.preset,
                            v_num_grad_steps=options.v_num_grad_steps)
    model = AlphaEditModel.from_pretrained(editing_args=args)
    records = json.loads((DATA / "counterfact" / "counterfact-edit.json").read_text())[:max(options.batch_sizes)]
    report: dict = {"machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                                "device": str(model.device)},
                    "settings": {"target_batch_tokens": options.target_batch_tokens,
                                 "target_memory_budget": options.target_memory_budget,
                                 "statistics_memory_budget": options.statistics_memory_budget,
                                 "v_num_grad_steps": options.v_num_grad_steps}}
    if "statistics" in options.parts:
        texts = load_corpus_texts(str(DATA / "wikitext-2" / "valid.txt"), options.statistics_samples)
        report["statistics"] = benchmark_statistics(model, texts, options.statistics_rounds)
        print(json.dumps(report["statistics"], indent=2), flush=True)
    if "edits" in options.parts:
        report["edits"] = [benchmark_edits(model, records, size) for size in options.batch_sizes]
        print(json.dumps(report["edits"], indent=2), flush=True)
    if "targets" in options.parts:
        report["targets"] = benchmark_targets(model, records, options.target_requests)
        print(json.dumps(report["targets"], indent=2), flush=True)
    report["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    report["load_average_at_end"] = os.getloadavg()
    print(json.dumps({key: report[key] for key in ("peak_rss_gib", "load_average_at_end")}), flush=True)
    Path(options.output).parent.mkdir(parents=True, exist_ok=True)
    Path(options.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
