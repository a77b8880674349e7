#!/usr/bin/env python
"""Where a batch's edit falls short of its targets: in the targets themselves, in NAS's rescaling of them, or in the
layer loop's solve.

On a checkpoint of a `benchmark_sequential.py` run (or on the unedited model, `--checkpoint none`) this takes the next
`--num_requests` records of the run's batch order and optimises their targets `z = h + δ` `[n, d]` on the model as it
is, unscaled (`h`: the z-layer block's output at the lookup token of the bare prompt; ALGORITHMS.md §3). A run with
NAS also gets its rescaled targets `z' = h + δ'` (`methods.nas`). Then it scores the records' rewrite prompts
(CounterFact efficacy: the new target's per-token NLL below the true one's; and the new target's mean NLL):

- `unedited`: the model as it is;
- `injected`, `injected_nas`: `δ` (`δ'`) added to the z-layer block's output at the lookup token, as target
  optimisation adds it: the efficacy of a target that an edit wrote perfectly;
- `edited`, `edited_nas`: the method's layer loop (keys, residual spread, solve, null-space projection) applied
  towards `z` (`z'`), scored with the full CounterFact metrics, together with how much of the shift the edit
  realises at the z-layer, medians over the requests: `along` = ⟨z_edit − h, z − h⟩ / ‖z − h‖² (1: all of it) and
  `miss` = ‖z_edit − z‖ / ‖z − h‖ (0: exactly the target). Each edit is undone bit for bit before the next.

Nothing is written to the run. The run's own flags select it, after `--`:

    python scripts/diagnose_target_realisation.py --checkpoint outputs/lifelong_10000/alphaedit+nas/resume/latest \
        --output nas_4200.json -- --num_edits 10000 --methods alphaedit+nas --target_memory_budget 4GiB
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from hf_alphaedit import AlphaEditModel
from hf_alphaedit.architectures import block_output_hidden
from hf_alphaedit.checkpointing import latest_checkpoint, load_checkpoint, restore_checkpoint
from hf_alphaedit.evaluation import load_edit_records
from hf_alphaedit.evaluation.scorer import encode_target, inference
from hf_alphaedit.methods.locate_then_edit import LocateThenEditMethod
from hf_alphaedit.methods.prompts import encode_with_subject
from hf_alphaedit.methods.targets import TargetOptimizer
from hf_alphaedit.requests import EditRequest, as_edit_requests

BENCHMARK = Path(__file__).resolve().parent / "benchmark_sequential.py"


def benchmark_module() -> Any:
    """`benchmark_sequential.py`, for the run's flags, batch order and model loading."""
    spec = importlib.util.spec_from_file_location("benchmark_sequential", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """This script's flags, and the benchmark flags of the run (everything after `--`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="A checkpoint folder of the run, its resume/ folder (the latest checkpoint), or 'none' "
                             "for the unedited model (the run's first batch).")
    parser.add_argument("--num_requests", type=int, default=100, help="Records diagnosed (default: one batch).")
    parser.add_argument("--output", type=Path, required=True, help="JSON file the figures are written to.")
    args = parser.parse_args(argv[:split])
    if args.num_requests < 1:
        parser.error(f"--num_requests {args.num_requests}: give a positive number of records")
    return args, argv[split + 1:]


def lookup_encodings(model: AlphaEditModel, requests: Sequence[EditRequest]) -> list[tuple[list[int], int]]:
    """`(ids, lookup position)` of each request's bare rewrite prompt (where target optimisation reads `h`)."""
    items = [(prompt[0], request.subject, prompt[1]) for request in requests
             for prompt in [request.split_prompt()]]
    return encode_with_subject(model.tokenizer, items, model.hparams.fact_token)


@contextlib.contextmanager
def shifted_block_output(model: AlphaEditModel, lookup: int, shift: torch.Tensor | None) -> Iterator[dict[str, Any]]:
    """Within the block, the z-layer block's output of a single sequence gets `shift` `[d]` at position `lookup`
    (none if None); the output there before the shift is kept as `captured["z"]` `[d]`."""
    captured: dict[str, Any] = {}

    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
        hidden = block_output_hidden(output)
        captured["z"] = hidden[0, lookup].detach().double()
        if shift is None:
            return output
        hidden = hidden.clone()
        hidden[0, lookup] += shift.to(hidden)
        return (hidden, *output[1:]) if isinstance(output, tuple | list) else hidden

    handle = model.spec.block(model.model, model.hparams.z_layer).register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def rewrite_nlls(model: AlphaEditModel, requests: Sequence[EditRequest],
                 shifts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of the new and the true target after each request's bare rewrite prompt, `[n, 2]`, with
    `shifts` `[n, d]` added at the z-layer's lookup token (none if None); and the z-layer block's output there before
    the shift, `[n, d]` (float64)."""
    device = next(model.model.parameters()).device
    nlls, outputs = [], []
    with inference(model.model):
        for index, ((ids, lookup), request) in enumerate(zip(lookup_encodings(model, requests), requests,
                                                            strict=True)):
            shift = None if shifts is None else shifts[index]
            row = []
            for target in (request.target_new, request.target_true):
                candidate = encode_target(model.tokenizer, target)
                with shifted_block_output(model, lookup, shift) as captured:
                    logits = model.model(torch.tensor([ids + candidate], device=device)).logits[0]
                log_probs = logits[len(ids) - 1 : len(ids) - 1 + len(candidate)].float().log_softmax(-1)
                row.append(-float(log_probs.gather(1, torch.tensor(candidate, device=device)[:, None]).mean()))
            nlls.append(row)
            outputs.append(captured["z"].cpu())
    return torch.tensor(nlls, dtype=torch.float64), torch.stack(outputs)


def rewrite_scores(nlls: torch.Tensor) -> dict[str, float]:
    """CounterFact efficacy of `[n, 2]` (new, true) NLLs, the share (×100) with the new target more likely, and the
    mean NLL of the new target."""
    return {"efficacy": float((nlls[:, 1] > nlls[:, 0]).double().mean() * 100), "new_nll": float(nlls[:, 0].mean())}


def realisation(outputs: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Medians over the requests of `along` = ⟨z_edit − h, z − h⟩ / ‖z − h‖² and `miss` = ‖z_edit − z‖ / ‖z − h‖ for
    z-layer outputs `z_edit`, initial `h` and targets `z`, each `[n, d]`."""
    want = targets.double() - hidden.double()
    along = ((outputs.double() - hidden.double()) * want).sum(1) / want.norm(dim=1) ** 2
    miss = (outputs.double() - targets.double()).norm(dim=1) / want.norm(dim=1)
    return {"along": statistics.median(along.tolist()), "miss": statistics.median(miss.tolist())}


class _Undo(Exception):
    """Raised inside `EditEngine.atomic` to take back what the block applied."""


@contextlib.contextmanager
def undone_afterwards(model: AlphaEditModel) -> Iterator[None]:
    """What the block applies to the weights (and the method's state) is undone bit for bit when it ends."""
    with contextlib.suppress(_Undo), model.engine.atomic():
        yield
        raise _Undo


def diagnose(model: AlphaEditModel, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The figures of the module docstring for `records` (the next records of the run) on `model` as it is."""
    method = model.method
    if not isinstance(method, LocateThenEditMethod):
        raise SystemExit(f"method {model.editing_args.method!r} does not edit towards optimised targets; this "
                         "diagnosis is for the locate-then-edit methods (AlphaEdit, MEMIT and their variants)")
    context, requests = method.context, as_edit_requests(records)
    start = time.perf_counter()
    with model.engine.editing_mode():
        context.forward_mode = model.provider.prepare_target_optimisation(requests)  # as AlphaEditModel.edit does
        targets = TargetOptimizer(model.model, model.tokenizer, model.spec, model.hparams, context.context_templates,
                                  batch_tokens=context.target_batch_tokens,
                                  memory_budget=context.target_memory_budget,
                                  mode=context.forward_mode).optimize(requests)
    hidden = targets.initial_hidden.double()
    shifts = targets.values.double() - hidden
    unedited, outputs = rewrite_nlls(model, requests)
    result: dict[str, Any] = {
        "edits_applied": model.state.num_edits, "num_requests": len(requests),
        "target_seconds": time.perf_counter() - start,
        "target_probability": statistics.median(targets.target_probabilities),
        "hidden_norm": statistics.median(hidden.norm(dim=1).tolist()),
        "shift_norm": statistics.median(shifts.norm(dim=1).tolist()),
        "hidden_read_back": float((outputs - hidden).norm(dim=1).max() / hidden.norm(dim=1).min()),
        "rewrite": {"unedited": rewrite_scores(unedited),
                    "injected": rewrite_scores(rewrite_nlls(model, requests, shifts)[0])}}
    variants = {"edited": targets.values}
    if context.rescale_targets is not None:
        nas = context.rescale_targets(requests, targets).values
        nas_shifts = nas.double() - hidden
        result["nas_shift_norm"] = statistics.median(nas_shifts.norm(dim=1).tolist())
        result["nas_shift_cosine"] = statistics.median(
            torch.nn.functional.cosine_similarity(shifts, nas_shifts, dim=1).tolist())
        result["rewrite"]["injected_nas"] = rewrite_scores(rewrite_nlls(model, requests, nas_shifts)[0])
        variants["edited_nas"] = nas
    for name, values in variants.items():
        with undone_afterwards(model):
            with model.engine.editing_mode():
                method.edit_layers(requests, values, {"targets": 0.0, "keys": 0.0, "solve": 0.0})
            nlls, outputs = rewrite_nlls(model, requests)
            result["rewrite"][name] = rewrite_scores(nlls)
            result[f"{name}_realised"] = realisation(outputs, hidden, values)
            metrics = model.evaluate(records, live=False, show_progress=False)
            result[f"{name}_metrics"] = {key: metrics[key] for key in ("efficacy", "generalization", "specificity",
                                                                        "efficacy_magnitude")}
    return result


def main(argv: Sequence[str] | None = None) -> None:
    args, run_flags = parse_args(argv)
    benchmark = benchmark_module()
    run = benchmark.parse_args(run_flags)
    if len(run.methods) != 1:
        raise SystemExit(f"--methods {','.join(run.methods)}: name the one method of the run to diagnose")
    records, _ = benchmark.separate_conflicts(load_edit_records(run.records, limit=run.num_edits), run.batch_size)
    model = benchmark.load_method(run.methods[0], run, run.batch_size)
    if args.checkpoint != "none":
        folder = Path(args.checkpoint)
        saved = latest_checkpoint(folder) if (folder / "latest").is_file() else folder
        restore_checkpoint(model, load_checkpoint(saved))
    done = model.state.num_edits
    if done + args.num_requests > len(records):
        raise SystemExit(f"--num_requests {args.num_requests}: only {len(records) - done} of the run's "
                         f"{len(records)} records are left after {done} edits")
    result = {"method": run.methods[0], "checkpoint": args.checkpoint,
              **diagnose(model, records[done : done + args.num_requests])}
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
