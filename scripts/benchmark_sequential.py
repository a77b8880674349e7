"""Sequential-editing benchmark on the embedded SmolLM2-135M-Instruct (the paper's protocol, ALGORITHMS.md §10.1).

    python scripts/benchmark_sequential.py [--quick] [--num_edits 1000] [--batch_size 100] [--dataset zsre]
        [--methods alphaedit,memit | all] [--eval_every 0] [--no_live] [--general_examples 100] [--output_dir DIR]
        [--figures_dir docs/benchmarks] [--mend_editor DIR_OR_REPO] [--single_edits 100]
        [--target_memory_budget auto] [--report_only] [--general_every_eval] [--stop_at_edits N]
    python scripts/benchmark_sequential.py --scorer_speedup [--speedup_records 200] [--full_evaluation]

A method is a registered name with optional `+projection` (AlphaEdit's null-space projection of every update,
`use_projection=True`), `+prune` (the PRUNE restraint, `prune=True`), `+nas` (NAS's norm-anchor scaling of the
targets, `norm_anchor=True`, for the locate-then-edit methods alphaedit, betaedit, memit and nse) and, for FT,
`+unconstrained` (no L∞ box, so FT's default layer is `round(0.66·N)`, as the reference's Llama-3-8B file):
`memit+projection`, `alphaedit+prune`, `alphaedit+nas`. NAS's anchor comes from the first 100 records of the training file
`../shared/data/counterfact/counterfact-train.json`, never from the evaluated records; it is computed once per model
(one target optimisation per record, on the fast forward path: 9–15 s each on one core beside two other runs, 43 s
in full forward passes) and cached next to the key statistics.
`+field=value` sets any field of EditingArguments or of the method's config for that run
(`alphaedit+v_lr_rms_factor=0.5+clamp_norm_factor=0.5`, `memit+mom2_update_weight=2000`, `ultraedit+lr=1e-4`):
calibration points, run on the training records with `--records`.
`--methods all` compares alphaedit, memit, memit+projection, memit+prune, alphaedit+prune, rome, ft+unconstrained
and nse (and any other registered method; `mend` only with `--mend_editor`). `mend` needs a trained editor
(`--mend_editor`, e.g. the folder `hf-alphaedit train-mend` wrote); `mend+projection` and `mend+prune` are its
boosted variants.

Editing: the first `num_edits` records of `--dataset` (CounterFact, or ZsRE edited towards `answers[0]` as the
official code does), in file order and consecutive batches of `batch_size` (except that a record asking for another
target for a subject and template its batch already has trades places with the next batch's first record, which the
run prints and `results.md` names: the engine refuses a contradictory batch), applied sequentially to one model per
method, with key statistics from WikiText-2. After all batches (and every `eval_every` batches) the records edited
so far (in the batches' order, so an evaluation between the two records of a move covers the one edited) are
evaluated with `AlphaEditModel.evaluate`: the teacher-forced metrics (CounterFact efficacy /
generalization / specificity §10.2, or ZsRE token accuracy §10.4) and, beside them, the live-decoding ones (the
model generates the answer greedily; `live_accuracy` metric card); the general-capability suite (§10.7) runs on
the unedited model and after the last batch (`--general_every_eval`: at every evaluation). Every result carries its
protocol card (model and the SHA-256 of its weights, records and their hash, edit history, when it was measured,
metric families, package version).
Writes into the output folder: `base/edits_0000.json`, `<method>/edits_NNNN.json` (one atomic file per evaluation;
existing ones are skipped on a rerun, and `<method>/resume/` holds a `hf_alphaedit.checkpointing` checkpoint after
the last finished batch, so a run continues there; `--keep_checkpoints` keeps every batch's, to restore and evaluate
any point of the run afterwards; `--extend_from` continues a shorter run's checkpoint with more records;
`--stop_at_edits N` ends a method's turn after N edits, so long runs can take turns one at a time),
`results.json`, `results.md` and `metrics_vs_edits.png`, `comparison.png`, `general.png`, `trade_off.png` (efficacy
and generalization against specificity and the general suite, one point per method or variant with its seconds per
edit: the calibration curve), and per method `<method>/telemetry.json` (every batch's collapse telemetry:
`‖W‖/‖W₀‖`, `‖ΔW‖`, the condition number of each solve, the null-space room left, the target norms) plotted in
`telemetry.png`. Every evaluation also scores each batch's records alone (`retention` in its JSON, from the same
per-record scores, so it costs nothing extra): the oldest batches show what is forgotten, the newest how well new
edits are written; tabled in `results.md` and plotted in `retention.png`. `results.md` also marks each CounterFact
evaluation met or missed per metric against the lifelong-editing goal (`GOAL_FLOORS`, `GOAL_MAX_LOSS`; specificity
against the unedited model on the same records).

`--single_edits N` also edits each of the first N records alone into the unedited model (edit, evaluate that
record, revert), per method, so the collapse of sequential editing shows against what one edit achieves; written to
`<method>/single_edits_NNNN.json` and as a second table in `results.md`.

`--scorer_speedup` instead times the batched scorer against the reference's one-forward-per-record loop on the
same records and writes `scorer_speedup.json`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hf_alphaedit import AlphaEditModel, EditingArguments, list_methods
from hf_alphaedit.checkpointing import (
    latest_checkpoint,
    load_checkpoint,
    restore_checkpoint,
    run_identity,
    save_checkpoint,
)
from hf_alphaedit.cli import LOG_LEVELS, CommonArguments, configure_logging
from hf_alphaedit.evaluation import (
    editor_protocol,
    evaluate_edits,
    evaluate_general,
    load_edit_records,
    summarize_record_scores,
)
from hf_alphaedit.evaluation.scorer import encode_prompt, encode_target, inference
from hf_alphaedit.fingerprint import file_sha256, records_sha256
from hf_alphaedit.forward import right_pad
from hf_alphaedit.methods import MethodConfig, get_method_classes
from hf_alphaedit.metrics.summaries import harmonic_mean
from hf_alphaedit.requests import EditRequest, as_edit_requests, contradicts

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DATASETS = {"counterfact": DATA / "counterfact" / "counterfact-edit.json",
            "zsre": DATA / "zsre" / "zsre_mend_train-1k.json"}
EDIT_METRICS = ("efficacy", "generalization", "specificity")
# The lifelong-editing goal (README, "Lifelong editing"): floors on CounterFact's edit metrics, and the most points
# specificity and the general suite's mean accuracy may lose against the unedited model on the same records.
GOAL_FLOORS = {"efficacy": 95.0, "generalization": 80.0}
GOAL_MAX_LOSS = {"specificity": 5.0, "general accuracy": 2.0}
COMPARISON = ("alphaedit", "memit", "memit+projection", "memit+prune", "alphaedit+prune", "rome", "ft+unconstrained",
              "nse")
# option -> (EditingArguments fields, method config fields)
VARIANT_OPTIONS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "projection": ({"use_projection": True}, {}), "prune": ({"prune": True}, {}),
    "nas": ({"norm_anchor": True, "norm_anchor_records": str(DATA / "counterfact" / "counterfact-train.json")}, {}),
    "unconstrained": ({}, {"norm_constraint": None})}


def _is_list_field(name: str) -> bool:
    spec = EditingArguments.__dataclass_fields__.get(name)
    return spec is not None and str(spec.type).startswith("list[")


def variant_arguments(name: str, mend_editor: str | None = None) -> tuple[dict[str, Any], MethodConfig | None]:
    """EditingArguments fields and method config of a method name with `+option` suffixes, e.g. 'memit+prune', or
    `+field=value` settings of EditingArguments or of the method's config, e.g. 'alphaedit+v_lr_rms_factor=0.5' or
    'ultraedit+lr=1e-4' (calibration runs), lists comma-separated ('alphaedit+layers=2,4,6,8'); `mend_editor`: the
    trained editor the MEND variants use."""
    method, *options = name.split("+")
    settings = dict(option.split("=", 1) for option in options if "=" in option)
    settings = {field: value.split(",") if _is_list_field(field) else value for field, value in settings.items()}
    options = [option for option in options if "=" not in option]
    try:
        config_cls = get_method_classes(method)[0]
    except ValueError as error:
        raise SystemExit(f"--methods: {name!r}: {error}") from None
    config_settings = {field: value for field, value in settings.items()
                       if field in config_cls.__dataclass_fields__ and field not in EditingArguments.__dataclass_fields__}
    unknown = [option for option in options if option not in VARIANT_OPTIONS]
    unknown += [f"{field}=" for field in settings
                if field not in EditingArguments.__dataclass_fields__ and field not in config_settings]
    if unknown:
        raise SystemExit(f"--methods: {name!r} has unknown option(s) {unknown}; options are "
                         f"{['+' + option for option in VARIANT_OPTIONS]} and +field=value for the fields of "
                         f"EditingArguments and {config_cls.__name__}.")
    fields: dict[str, Any] = {"method": method}
    if method == "mend":
        if not mend_editor:
            raise SystemExit(f"--methods: {name!r} needs --mend_editor (a trained editor: the folder "
                             "`hf-alphaedit train-mend` wrote, or a Hub repo).")
        fields["mend_editor"] = mend_editor
    config_fields: dict[str, Any] = {}
    for option in options:
        fields.update(VARIANT_OPTIONS[option][0])
        config_fields.update(VARIANT_OPTIONS[option][1])
    fields.update({field: value for field, value in settings.items() if field not in config_settings})
    config_fields.update(config_settings)
    try:  # fail now, not after an hour of editing
        EditingArguments(**fields)
        config = config_cls(**config_fields) if config_fields else None
    except (ValueError, TypeError) as error:
        raise SystemExit(f"--methods: {name!r}: {error}") from None
    return fields, config


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 edits (unless --num_edits is given).")
    parser.add_argument("--num_edits", type=int, default=None, help="Default 1000 (200 with --quick).")
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--methods", default="alphaedit,memit",
                        help="Comma-separated method names, each optionally with +projection / +prune / +nas; "
                             "'all' for the comparison of the registered methods and the boosted variants.")
    parser.add_argument("--eval_every", type=int, default=0,
                        help="Also evaluate every k batches (0: only after all edits, as the paper).")
    parser.add_argument("--general_examples", type=int, default=100,
                        help="Examples per general task (the reference uses 100; 0 skips the suite).")
    parser.add_argument("--general_every_eval", action="store_true",
                        help="Run the general suite at every evaluation, not only after the last batch; a run "
                             "resumed at an evaluation point whose result lacks the suite adds it there.")
    parser.add_argument("--statistics_samples", type=int, default=100000)
    parser.add_argument("--target_memory_budget", default=EditingArguments.target_memory_budget,
                        help="EditingArguments.target_memory_budget of every run ('auto': half the free memory "
                             "when a batch starts, so give a size such as 4GiB to run two benchmarks side by side).")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="counterfact",
                        help="CounterFact (probability comparisons, §10.2) or ZsRE (token accuracy, §10.4).")
    parser.add_argument("--records", default=None, help="Records file (default: the --dataset file in ../shared).")
    parser.add_argument("--no_live", dest="live", action="store_false",
                        help="Skip the live-decoding metrics (greedy generation of every answer).")
    parser.add_argument("--extend_from", type=Path, default=None,
                        help="Output folder of a shorter run on the same records: a method with no checkpoint of its "
                             "own here starts from that run's latest checkpoint (its batches must be this run's first).")
    parser.add_argument("--report_only", action="store_true",
                        help="Only write results.md, results.json and the plots from the evaluations in --output_dir so "
                             "far (a long run's progress, also while it runs): no editing, no evaluation.")
    parser.add_argument("--stop_at_edits", type=int, default=None,
                        help="Stop each method once this many edits are applied (after that batch's evaluation and "
                             "checkpoint); the same command without it, or with a larger number, goes on from there. "
                             "For long runs taken in turns, one at a time.")
    parser.add_argument("--keep_checkpoints", action="store_true",
                        help="Keep every batch's checkpoint in <method>/resume/ (default: the latest only).")
    parser.add_argument("--general_dir", default=str(DATA / "general"))
    parser.add_argument("--statistics_corpus", default=str(DATA / "wikitext-2" / "valid.txt"))
    parser.add_argument("--output_dir", default=None,
                        help="Default outputs/benchmark_sequential (outputs/benchmark_sequential_quick with --quick).")
    parser.add_argument("--figures_dir", default=None,
                        help="Also copy results.md and the plots here (e.g. docs/benchmarks, where the README's are).")
    parser.add_argument("--mend_editor", default=None,
                        help="The trained MEND editor of the mend variants (folder or Hub repo).")
    parser.add_argument("--single_edits", type=int, default=0,
                        help="Also edit each of the first N records alone (and revert), per method.")
    parser.add_argument("--log_level", choices=LOG_LEVELS, default="info",
                        help="Logging level of hf_alphaedit, as the CLI's (info: resumes, checkpoints and the "
                             "targets NAS keeps at v0, which a long run's log should show).")
    parser.add_argument("--scorer_speedup", action="store_true", help="Time the batched scorer instead.")
    parser.add_argument("--speedup_records", type=int, default=200)
    parser.add_argument("--full_evaluation", action="store_true",
                        help="With --scorer_speedup: also time the batched evaluation of every record in --records.")
    args = parser.parse_args(argv)
    args.num_edits = args.num_edits or (200 if args.quick else 1000)
    args.records = args.records or str(DATASETS[args.dataset])
    suffix = ("_quick" if args.quick else "") + ("_zsre" if args.dataset == "zsre" else "")
    args.output_dir = Path(args.output_dir or ROOT / "outputs" / f"benchmark_sequential{suffix}")
    if args.methods == "all":
        compared = {name.split("+")[0] for name in COMPARISON}
        args.methods = [*COMPARISON, *(m for m in list_methods() if m not in compared
                                       and (m != "mend" or args.mend_editor))]
    else:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in args.methods:
        variant_arguments(name, args.mend_editor)
    if args.stop_at_edits is not None and args.stop_at_edits <= 0:
        raise SystemExit(f"--stop_at_edits {args.stop_at_edits}: give a positive number of edits, or leave it out to "
                         "run to --num_edits.")
    if args.single_edits and args.dataset != "counterfact":
        raise SystemExit("--single_edits scores CounterFact's efficacy/generalization/specificity; drop it or use "
                         "--dataset counterfact.")
    return args


def write_json(path: Path, content: Any) -> None:
    """Write atomically (a rename), so an interrupted run never leaves a half-written result behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as file:
        json.dump(content, file, indent=2)
    os.replace(tmp, path)


def portable(value: Any) -> str:
    """A setting as text, with paths on this machine written relative to the project root."""
    text = str(value)
    for folder, replacement in ((ROOT, ""), (ROOT.parent, "../")):
        if text.startswith(f"{folder}/"):
            return replacement + text[len(str(folder)) + 1:]
    return text


def checkpoint_path(output_dir: Path, name: str, edits: int) -> Path:
    return output_dir / name / f"edits_{edits:04d}.json"


def telemetry_path(output_dir: Path, name: str) -> Path:
    """Every batch's collapse telemetry of a method (`BatchTelemetry.to_dict()` with its batch and edit count)."""
    return output_dir / name / "telemetry.json"


def metric_names(dataset: str, family: str) -> list[str]:
    """Result keys of efficacy, generalization, specificity for a dataset and a family ('teacher_forced' or
    'live'): e.g. 'efficacy', 'live_efficacy', 'zsre_efficacy', 'zsre_live_efficacy'."""
    prefix = ("zsre_" if dataset == "zsre" else "") + ("live_" if family == "live" else "")
    return [prefix + metric for metric in EDIT_METRICS]


def schedule(args: argparse.Namespace, num_batches: int, edited: int) -> dict[str, Any]:
    """The `schedule` part of a checkpoint's protocol card."""
    timing = {0: "after all batches (the paper's protocol)", 1: "after every batch"}.get(
        args.eval_every, f"after every {args.eval_every} batches and after the last")
    return {"of_batches": num_batches, "timing": timing, "records": f"the first {edited} records in batch order "
            f"(the file's, but for `batch_order_moves` in results.json): every record edited so far"}


def evaluate_checkpoint(model: AlphaEditModel, records: list[dict], args: argparse.Namespace, *, general: bool,
                        protocol: dict[str, Any]) -> dict[str, Any]:
    """Edit metrics (teacher-forced and live, with their protocol card) of `records` (the records edited so far, in
    batch order), each batch's alone (`retention`), and the general suite when `general`."""
    result: dict[str, Any] = {"num_edits": model.state.num_edits}
    source = {"dataset": {"source": Path(args.records).name, "file_sha256": file_sha256(args.records)}}
    result["edit_metrics"] = model.evaluate(records, live=args.live, show_progress=False, per_record=True,
                                            protocol={**protocol, **source})
    scores = result["edit_metrics"].pop("records")
    result["retention"] = [{"records": [start, min(start + args.batch_size, len(records))],
                            **summarize_record_scores(scores[start : start + args.batch_size])}
                           for start in range(0, len(records), args.batch_size)]
    if general and args.general_examples > 0:
        result.update(general_suite(model, args))
    return result


def general_suite(model: AlphaEditModel, args: argparse.Namespace) -> dict[str, Any]:
    """`{"general": scores with their protocol card, "general_seconds": …}` of the model as it is now."""
    start = time.perf_counter()
    scores = evaluate_general(model.model, model.tokenizer, args.general_dir, num_examples=args.general_examples,
                              protocol=editor_protocol(model.source, model.state))
    return {"general": scores, "general_seconds": time.perf_counter() - start}


def run_method(method: str, records: list[dict], args: argparse.Namespace) -> None:
    num_batches = -(-len(records) // args.batch_size)
    checkpoints = {b for b in range(1, num_batches + 1) if args.eval_every and b % args.eval_every == 0}
    checkpoints.add(num_batches)
    final = checkpoint_path(args.output_dir, method, len(records))
    if final.exists():
        print(f"[{method}] done already ({final})")
        return
    model = load_method(method, args, args.batch_size)
    resume = args.output_dir / method / "resume"
    resume.mkdir(parents=True, exist_ok=True)
    requests = as_edit_requests(records, batch_size=args.batch_size)
    run = run_identity(model, requests)
    saved = latest_checkpoint(resume)
    if saved is None and args.extend_from is not None:
        saved = latest_checkpoint(args.extend_from / method / "resume")
    if saved is not None:
        restore_checkpoint(model, load_checkpoint(saved), run, requests)
        print(f"[{method}] resuming after {model.state.num_edits} edits ({saved})")
    edit_seconds = sum(sum(b.timings.values()) for b in model.state.batches)
    if model.state.batches and len(model.state.batches) in checkpoints:
        evaluate_point(model, method, len(model.state.batches), num_batches, records, edit_seconds, args)
    for batch in range(len(model.state.batches) + 1, num_batches + 1):
        if args.stop_at_edits is not None and model.state.num_edits >= args.stop_at_edits:
            print(f"[{method}] stopped after {model.state.num_edits} edits (--stop_at_edits {args.stop_at_edits}); "
                  "run again without it to go on", flush=True)
            return
        chunk = records[(batch - 1) * args.batch_size : batch * args.batch_size]
        result = model.edit(chunk, batch_size=args.batch_size)
        edit_seconds += result.seconds
        print(f"[{method}] batch {batch}/{num_batches}: {result.seconds:.0f}s ({edit_seconds:.0f}s so far)", flush=True)
        if batch in checkpoints:
            evaluate_point(model, method, batch, num_batches, records, edit_seconds, args)
        edits_after = itertools.accumulate(len(record.requests) for record in model.state.batches)
        write_json(telemetry_path(args.output_dir, method), [
            {"batch": record.index, "num_edits": edits, **record.telemetry}
            for record, edits in zip(model.state.batches, edits_after, strict=True)])
        if batch != num_batches or args.keep_checkpoints:
            save_checkpoint(model, resume, run, keep=None if args.keep_checkpoints else 1)


def evaluate_point(model: AlphaEditModel, method: str, batch: int, num_batches: int, records: list[dict],
                   edit_seconds: float, args: argparse.Namespace) -> None:
    """Write the evaluation after `batch` batches unless it exists; the general suite after the last batch (or at
    every evaluation with `--general_every_eval`), added to an existing evaluation that lacks it."""
    edited = min(batch * args.batch_size, len(records))
    path = checkpoint_path(args.output_dir, method, edited)
    general = (batch == num_batches or args.general_every_eval) and args.general_examples > 0
    if path.exists():
        existing = json.loads(path.read_text())
        if general and "general" not in existing:
            existing.update(general_suite(model, args))
            write_json(path, existing)
            print(f"[{method}] {edited} edits: general suite added, mean accuracy "
                  f"{existing['general']['average']['accuracy']:.2f}", flush=True)
        return
    result = evaluate_checkpoint(model, records[:edited], args, general=general,
                                 protocol={"schedule": schedule(args, num_batches, edited)})
    result.update(method=method, batch_size=args.batch_size, edit_seconds=edit_seconds)
    write_json(path, result)
    metrics = result["edit_metrics"]
    print(f"[{method}] {edited} edits: " + ", ".join(
        f"{m} {metrics[m]:.1f}" for m in metric_names(args.dataset, "teacher_forced")
        + (metric_names(args.dataset, "live") if args.live else [])), flush=True)


def run_arguments(method: str, args: argparse.Namespace, batch_size: int) -> tuple[EditingArguments, Any]:
    """`(EditingArguments, method config or None)` of one run of `method` (a name with `+option` suffixes); an
    option of the variant wins over the command line's `--target_memory_budget`."""
    fields, method_config = variant_arguments(method, args.mend_editor)
    editing_args = EditingArguments(**{"target_memory_budget": args.target_memory_budget, **fields},
                                    statistics_corpus=args.statistics_corpus,
                                    statistics_samples=args.statistics_samples, batch_size=batch_size,
                                    disable_tqdm=True)
    return editing_args, method_config


def separate_conflicts(records: list[dict], batch_size: int) -> tuple[list[dict], list[str]]:
    """`records` in file order, except that a record wanting another target for a subject and template that its batch
    already has (a batch the engine refuses as contradictory; CounterFact has two such pairs in its first 10,000
    edit records) trades places with the first record of a later batch that fits; and one line per such move."""
    def fits(request: EditRequest, placed: Sequence[EditRequest]) -> bool:
        return not any(contradicts(request, other) for other in placed)

    records = list(records)
    requests = as_edit_requests(records, batch_size=1)
    moves = []
    for start in range(0, len(records), batch_size):
        end = min(start + batch_size, len(records))
        for index in range(start, end):
            placed = requests[start:index]
            if not fits(requests[index], placed):
                partner = next((j for j in range(end, len(records)) if fits(requests[j], placed)), None)
                if partner is None:
                    raise SystemExit(f"record {index} (case_id {requests[index].case_id}) conflicts with another "
                                     "record of its batch and no later record can take its place; drop one of them.")
                moves.append(f"case_id {requests[index].case_id} (conflicting target for subject "
                             f"{requests[index].subject!r}) moved from position {index} to {partner}, case_id "
                             f"{requests[partner].case_id} from {partner} to {index}")
                for sequence in (records, requests):
                    sequence[index], sequence[partner] = sequence[partner], sequence[index]
    return records, moves


def unedited_evaluation_covers(path: Path, records: list[dict]) -> bool:
    """Whether the unedited model's evaluation at `path` scored `records` in this order (its per-batch `retention`
    is the batches' own); one of other records, or of these in file order before a move, is redone."""
    if not path.exists():
        return False
    card = json.loads(path.read_text())["edit_metrics"]["protocol"]["dataset"]
    if card["records_sha256"] == records_sha256(records):
        return True
    print(f"{path}: the unedited evaluation scored other records or another order than these batches'; redoing it",
          flush=True)
    return False


def load_method(method: str, args: argparse.Namespace, batch_size: int) -> AlphaEditModel:
    """The embedded SmolLM2, set up to edit with `method` (a name with `+option` suffixes)."""
    editing_args, method_config = run_arguments(method, args, batch_size)
    return AlphaEditModel.from_pretrained(editing_args=editing_args, method_config=method_config)


def run_single_edits(method: str, records: list[dict], args: argparse.Namespace) -> None:
    """Edit each record alone into the unedited model, evaluate it, revert; the means over records."""
    path = args.output_dir / method / f"single_edits_{len(records):04d}.json"
    if path.exists():
        print(f"[{method}] single edits done already ({path})")
        return
    model = load_method(method, args, batch_size=1)
    scores: list[dict[str, float]] = []
    edit_seconds = 0.0
    for index, record in enumerate(records):
        edit_seconds += model.edit([record]).seconds
        metrics = evaluate_edits(model.model, model.tokenizer, [record])
        scores.append({name: metrics[name] for name in EDIT_METRICS})
        model.revert()
        if (index + 1) % 20 == 0:
            print(f"[{method}] single edits: {index + 1}/{len(records)}", flush=True)
    means = {name: sum(score[name] for score in scores) / len(scores) for name in EDIT_METRICS}
    means["score"] = harmonic_mean(list(means.values()))
    write_json(path, {"method": method, "num_records": len(records), "edit_seconds": edit_seconds,
                      "mean": means, "records": scores})
    print(f"[{method}] {len(records)} single edits: " + ", ".join(f"{m} {means[m]:.1f}" for m in EDIT_METRICS),
          flush=True)


def collect(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for name in ["base", *args.methods]:
        files = sorted((args.output_dir / name).glob("edits_*.json"))
        runs[name] = [json.loads(f.read_text()) for f in files if int(f.stem.split("_")[1]) <= args.num_edits]
    return runs


def last_results(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """`(method, its latest evaluation)` per method that has one: the final one of a finished run, the latest so far
    of a run still going (`--report_only`)."""
    return [(method, max(runs[method], key=lambda r: r["num_edits"])) for method in args.methods if runs[method]]


def general_tasks(result: dict[str, Any]) -> list[str]:
    """The task names of a result's general-capability scores (not the average or the protocol card)."""
    return [t for t in result["general"] if t not in ("average", "protocol")]


def protocol_summary(result: dict[str, Any], base: dict[str, Any] | None) -> str:
    """One sentence from the protocol card of a method's `result` that holds for every method of the table: the
    weights named are the unedited model's (`base`, its result), each method's edited weights are in its JSON."""
    card = result["edit_metrics"]["protocol"]
    model, dataset, editing = card["model"], card["dataset"], card.get("editing") or {}
    sizes = sorted(set(editing.get("batch_sizes") or []))
    weights = (f", unedited weights `{base['edit_metrics']['protocol']['model']['weights_sha256'][:12]}…`"
               if base else "")
    return (f"Protocol card: {model['id']} ({model.get('origin')}{weights}; each method's edited weights in its "
            "result JSON), "
            f"records {dataset['records'][0]}–{dataset['records'][1]} of `{dataset['source']}` "
            f"(`{dataset.get('file_sha256', '')[:19]}…`) in batch order, {editing.get('num_edits')} edits in "
            f"{editing.get('num_batches')} batch(es) of {', '.join(map(str, sizes))}, evaluated "
            f"{card['schedule']['timing']} on every record edited so far, metric families "
            f"{', '.join(card['metric_families'])}, hf_alphaedit {card['package_version']}.")


def markdown_table(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    base = runs["base"][0] if runs["base"] else None
    name = {"counterfact": "CounterFact", "zsre": "ZsRE"}[args.dataset]
    teacher, live = metric_names(args.dataset, "teacher_forced"), metric_names(args.dataset, "live")
    has_score = args.dataset == "counterfact"
    headers = [f"{m} (TF / live)" for m in EDIT_METRICS] + (["score (TF / live)"] if has_score else [])
    lines = [f"Sequential editing of SmolLM2-135M-Instruct: {args.num_edits} {name} edits in batches of "
             f"{args.batch_size}; metrics on every record edited so far after each method's last evaluated batch (the "
             "edits column; percent, mean over records): "
             "teacher-forced (TF) / live decoding (greedy generation).", "",
             "| method | edits | " + " | ".join(headers) + " | general F1 (avg) | edit time |",
             "|---" * (len(headers) + 4) + "|"]

    def pair(metrics: dict[str, Any], tf_key: str, live_key: str) -> str:
        live_value = metrics.get(live_key)
        return f"{metrics[tf_key]:.1f} / " + (f"{live_value:.1f}" if live_value is not None else "–")

    def row(label: str, result: dict[str, Any]) -> str:
        m = result["edit_metrics"]
        cells = [pair(m, t, v) for t, v in zip(teacher, live, strict=True)]
        if has_score:
            cells.append(pair(m, "score", "live_score"))
        general = result.get("general", {}).get("average", {}).get("f1")
        general_cell = f"{general:.3f}" if general is not None else "–"
        seconds = result.get("edit_seconds")
        return (f"| {label} | {result['num_edits']} | " + " | ".join(cells) + f" | {general_cell} | "
                + (f"{seconds:.0f} s ({seconds / result['num_edits']:.2f} s/edit) |" if seconds else "– |"))

    finals = last_results(runs, args)
    if base:  # the unedited model is scored on every record of the run, a run still going on fewer so far
        partial = any(result["num_edits"] != args.num_edits for _, result in finals)
        lines.append(row(f"unedited (all {args.num_edits} records)" if partial else "unedited", base))
    lines += [row(method, result) for method, result in finals]
    if finals:
        lines += ["", protocol_summary(finals[0][1], base)]
    singles = [(method, json.loads(path.read_text())) for method in args.methods
               for path in sorted((args.output_dir / method).glob("single_edits_*.json"))]
    if singles:
        lines += ["", "Single edits (each record edited alone into the unedited model, evaluated, reverted; percent):",
                  "", "| method | records | efficacy | generalization | specificity | score | time per edit |",
                  "|---|---|---|---|---|---|---|"]
        for method, single in singles:
            mean = single["mean"]
            lines.append(f"| {method} | {single['num_records']} | " + " | ".join(f"{mean[m]:.1f}" for m in EDIT_METRICS)
                         + f" | {mean['score']:.1f} | {single['edit_seconds'] / single['num_records']:.2f} s |")
    lines += goal_table(runs, args)
    lines += retention_table(runs, args)
    if base and "general" in base:
        tasks = general_tasks(base)
        lines += ["", "General capability (weighted F1 of the log-likelihood answers, "
                  f"{args.general_examples} examples per task):", "",
                  "| model | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        for label, result in [("unedited", base)] + [(m, r) for m, r in finals if "general" in r]:
            lines.append(f"| {label} | " + " | ".join(f"{result['general'][t]['f1']:.3f}" for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def unedited_on_first(base: dict[str, Any], edited: int, metric: str) -> float | None:
    """The unedited model's `metric` on the first `edited` records (the mean of its per-batch scores, weighted by
    records), or None when its per-batch scores do not cover exactly those records."""
    entries = [entry for entry in base.get("retention", []) if entry["records"][1] <= edited]
    if not entries or sum(entry["num_records"] for entry in entries) != edited:
        return None
    return sum(entry[metric] * entry["num_records"] for entry in entries) / edited


def general_accuracy(result: dict[str, Any]) -> float | None:
    """The general suite's mean accuracy of an evaluation, None where it did not run."""
    return result.get("general", {}).get("average", {}).get("accuracy")


def goal_table(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> list[str]:
    """Markdown lines: every CounterFact evaluation of every method against the lifelong-editing goal (`GOAL_FLOORS`,
    `GOAL_MAX_LOSS`), each metric marked met or missed; specificity is compared with the unedited model's on the same
    records (from the unedited evaluation's per-batch scores), the general suite's mean accuracy with the unedited
    model's. Empty without an unedited evaluation that has per-batch scores."""
    base = next((result for result in runs["base"] if "retention" in result), None)
    if args.dataset != "counterfact" or base is None:
        return []

    def mark(met: bool) -> str:
        return "✓" if met else "✗"

    def loss_cell(value: float, unedited: float, max_loss: float) -> str:
        change = f"{value - unedited:+.2f}".replace("-", "−")
        return f"{value:.2f} ({change}) {mark(value - unedited >= -max_loss)}"

    unedited_accuracy = general_accuracy(base)
    columns = ([f"{name} ≥ {floor:g}" for name, floor in GOAL_FLOORS.items()]
               + [f"{name} within {loss:g}" for name, loss in GOAL_MAX_LOSS.items()])
    lines = ["", f"Against the lifelong-editing goal ({' · '.join(columns)} points of the unedited model; ✓ met, ✗ "
             "missed; specificity against the unedited model on the same records, general mean accuracy against the "
             "unedited model's):", "",
             "| method | edits | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for method in args.methods:
        for result in sorted(runs[method], key=lambda r: r["num_edits"]):
            metrics = result["edit_metrics"]
            edited = metrics["num_records"]
            cells = [f"{metrics[name]:.1f} {mark(metrics[name] >= floor)}" for name, floor in GOAL_FLOORS.items()]
            specificity = unedited_on_first(base, edited, "specificity")
            cells.append("–" if specificity is None else
                         loss_cell(metrics["specificity"], specificity, GOAL_MAX_LOSS["specificity"]))
            accuracy = general_accuracy(result)
            cells.append("–" if accuracy is None or unedited_accuracy is None else
                         loss_cell(accuracy, unedited_accuracy, GOAL_MAX_LOSS["general accuracy"]))
            lines.append(f"| {method} | {result['num_edits']} | " + " | ".join(cells) + " |")
    return lines


def retention_groups(retention: list[dict[str, Any]], groups: int = 10) -> list[list[dict[str, Any]]]:
    """A checkpoint's per-batch entries (oldest first) in at most `groups` runs of consecutive batches."""
    size = -(-len(retention) // groups)
    return [retention[start : start + size] for start in range(0, len(retention), size)]


def retention_table(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> list[str]:
    """Markdown lines: per method and checkpoint the metrics of the oldest and the newest batch's records and the
    efficacy of at most ten groups of consecutive batches, oldest first (what is forgotten and what is written);
    empty when no checkpoint has per-batch results."""
    teacher = metric_names(args.dataset, "teacher_forced")
    rows = [(method, result) for method in ["base", *args.methods] for result in runs[method] if "retention" in result]
    if not any(method != "base" for method, _ in rows):
        return []

    def metrics(entries: list[dict[str, Any]]) -> list[float]:
        count = sum(entry["num_records"] for entry in entries)
        return [sum(entry[key] * entry["num_records"] for entry in entries) / count for key in teacher]

    def cell(entry: dict[str, Any]) -> str:
        first, last = entry["records"]
        return f"{' / '.join(f'{value:.0f}' for value in metrics([entry]))} (records {first}–{last - 1})"

    lines = ["", "Retention: each batch's records scored alone at each evaluation (" + " / ".join(EDIT_METRICS)
             + ", percent): the oldest batch shows what is forgotten, the newest how well new edits are written; "
             "the last column is the efficacy of the edited records in at most ten groups of consecutive batches, "
             "oldest first (the unedited row: of every record the run edits).", "",
             "| method | edits | oldest batch | newest batch | efficacy by group of batches, oldest first |",
             "|---|---|---|---|---|"]
    for method, result in rows:
        retention = result["retention"]
        groups = retention_groups(retention)
        tenths = " · ".join(f"{metrics(group)[0]:.0f}" for group in groups) + (
            f" ({len(groups[0])} batches each)" if len(groups[0]) > 1 else "")
        lines.append(f"| {'unedited' if method == 'base' else method} | {result['num_edits']} | "
                     f"{cell(retention[0])} | {cell(retention[-1])} | {tenths} |")
    return lines


def plot_retention(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    """`retention.png`: per method (rows) and metric (columns) each batch's records' score against the batch's
    place in the edit order, one line per evaluation (lighter: earlier), the unedited model's scores of the same
    records in grey: the drop from right (just written) to left (oldest) is forgetting."""
    import matplotlib.pyplot as plt

    teacher = metric_names(args.dataset, "teacher_forced")
    methods = [m for m in args.methods if any("retention" in r for r in runs[m])]
    if not methods:
        return
    base = next((r for r in runs["base"] if "retention" in r), None)
    figure, axes = plt.subplots(len(methods), len(teacher), figsize=(4.4 * len(teacher), 3.2 * len(methods)),
                                squeeze=False)
    for row, method in zip(axes, methods, strict=True):
        results = sorted((r for r in runs[method] if "retention" in r), key=lambda r: r["num_edits"])
        for axis, metric, key in zip(row, EDIT_METRICS, teacher, strict=True):
            for index, result in enumerate(results):
                points = [(entry["records"][0], entry[key]) for entry in result["retention"]]
                axis.plot(*zip(*points, strict=True), marker=".", label=f"after {result['num_edits']} edits",
                          color=plt.cm.viridis(0.85 * (1 - (index + 1) / len(results))))
            if base:
                points = [(entry["records"][0], entry[key]) for entry in base["retention"]
                          if entry["records"][0] < results[-1]["num_edits"]]
                axis.plot(*zip(*points, strict=True), color="grey", linestyle="--", label="unedited")
            axis.set(title=metric, xlabel="first record of the batch (edit order)", ylim=(0, 100))
        row[0].set_ylabel(method.replace("+", "\n+") + "\n(percent)", fontsize="small")
        row[0].legend(fontsize="x-small")
    figure.tight_layout()
    figure.savefig(args.output_dir / "retention.png", dpi=120)
    plt.close(figure)


def plot(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher, live = metric_names(args.dataset, "teacher_forced"), metric_names(args.dataset, "live")
    base = runs["base"][0] if runs["base"] else None
    with_general = base is not None and general_accuracy(base) is not None
    goal = args.dataset == "counterfact"  # the lifelong goal's lines (GOAL_FLOORS, GOAL_MAX_LOSS), dotted green
    figure, axes = plt.subplots(1, 3 + with_general, figsize=(4.4 * (3 + with_general), 3.8), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    evaluated = sorted({r["num_edits"] for method in args.methods for r in runs[method]})
    for axis, metric, tf_key, live_key in zip(axes[:3], EDIT_METRICS, teacher, live, strict=True):
        for index, method in enumerate(args.methods):
            color = colors[index % len(colors)]
            for key, style, marker, label in ((tf_key, "-", "o", method), (live_key, "--", "s", f"{method} (live)")):
                points = sorted((r["num_edits"], r["edit_metrics"][key]) for r in runs[method]
                                if key in r["edit_metrics"])
                if points:
                    axis.plot(*zip(*points, strict=True), marker=marker, linestyle=style, color=color, label=label)
        if base:
            for key, style in ((tf_key, "--"), (live_key, ":")):
                if key in base["edit_metrics"]:
                    axis.axhline(base["edit_metrics"][key], color="grey", linestyle=style,
                                 label="unedited" + (" (live)" if key == live_key else ""))
            same_records = [(edits, value) for edits in evaluated
                            if (value := unedited_on_first(base, edits, tf_key)) is not None]
            if same_records:
                axis.plot(*zip(*same_records, strict=True), color="grey", marker=".",
                          label="unedited, on the records edited so far")
            if goal and metric in GOAL_MAX_LOSS and same_records:
                axis.plot(*zip(*[(edits, value - GOAL_MAX_LOSS[metric]) for edits, value in same_records],
                               strict=True), color="green", linestyle=":", label="goal")
        if goal and metric in GOAL_FLOORS:
            axis.axhline(GOAL_FLOORS[metric], color="green", linestyle=":", label="goal")
        axis.set(title=f"{metric} (solid: teacher-forced, dashed: live)", xlabel="number of edits",
                 ylabel="percent", ylim=(0, 100))
        axis.title.set_fontsize("small")
    if with_general:
        axis = axes[3]
        for index, method in enumerate(args.methods):
            points = sorted((r["num_edits"], general_accuracy(r)) for r in runs[method] if "general" in r)
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", color=colors[index % len(colors)], label=method)
        axis.axhline(general_accuracy(base), color="grey", linestyle="--", label="unedited")
        if goal:
            axis.axhline(general_accuracy(base) - GOAL_MAX_LOSS["general accuracy"], color="green", linestyle=":",
                         label="goal")
        axis.set(title="general suite (mean accuracy)", xlabel="number of edits", ylabel="percent", ylim=(0, 100))
        axis.title.set_fontsize("small")
    axes[0].legend(fontsize="x-small")
    figure.tight_layout()
    figure.savefig(args.output_dir / "metrics_vs_edits.png", dpi=120)
    plt.close(figure)

    finals = [("unedited", base)] if base else []
    finals += [(m if r["num_edits"] == args.num_edits else f"{m} ({r['num_edits']} edits)", r)
               for m, r in last_results(runs, args)]
    bars = [(f"{metric}{suffix}", lambda r, key=key: r["edit_metrics"].get(key, 0.0))
            for keys, suffix in ((teacher, ""), (live, " (live)")) for metric, key in zip(EDIT_METRICS, keys,
                                                                                       strict=True)]
    if all("general" in r for _, r in finals):
        bars.append(("general (mean accuracy)", general_accuracy))
    figure, axis = plt.subplots(figsize=(max(8.0, 1.6 * len(finals)), 4.2))
    width = 0.8 / len(bars)
    for i, (label, value) in enumerate(bars):
        axis.bar([m + i * width for m in range(len(finals))], [value(r) for _, r in finals], width, label=label,
                 hatch="//" if label.endswith("(live)") else None)
    axis.set_xticks([m + width * (len(bars) - 1) / 2 for m in range(len(finals))], [n for n, _ in finals],
                    rotation=20)
    axis.set(ylabel="percent", ylim=(0, 125), yticks=range(0, 101, 20),
             title=f"after {args.num_edits} sequential edits (batches of {args.batch_size})")
    axis.legend(fontsize="x-small", ncols=4, loc="upper center")
    figure.tight_layout()
    figure.savefig(args.output_dir / "comparison.png", dpi=120)
    plt.close(figure)

    plot_trade_off(finals, teacher, args)
    plot_telemetry(args)
    plot_retention(runs, args)
    if not (base and "general" in base):
        return
    tasks = general_tasks(base)
    models = [("unedited", base)] + [(m, r) for m in args.methods for r in runs[m]
                                      if r["num_edits"] == args.num_edits and "general" in r]
    figure, axis = plt.subplots(figsize=(11, 3.8))
    width = 0.8 / len(models)
    for i, (name, result) in enumerate(models):
        axis.bar([t + i * width for t in range(len(tasks))], [result["general"][t]["f1"] for t in tasks],
                 width, label=name)
    axis.set_xticks([t + width * (len(models) - 1) / 2 for t in range(len(tasks))], tasks)
    axis.set(ylabel="weighted F1", title=f"general capability after {args.num_edits} edits")
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.output_dir / "general.png", dpi=120)
    plt.close(figure)


def plot_trade_off(finals: list[tuple[str, dict[str, Any]]], teacher: list[str], args: argparse.Namespace) -> None:
    """`trade_off.png`, the calibration curve: efficacy and generalization (teacher-forced) after the last batch
    against specificity and against the general suite's mean F1, one point per method or variant, labelled with its
    seconds per edit; the unedited model's values as grey lines."""
    import matplotlib.pyplot as plt

    efficacy, generalization, specificity = teacher
    panels = [("specificity (percent)", lambda r: r["edit_metrics"][specificity])]
    if all("general" in r for _, r in finals):
        panels.append(("general suite, mean weighted F1", lambda r: r["general"]["average"]["f1"]))
    figure, axes = plt.subplots(1, len(panels), figsize=(9.0 * len(panels), 5.0), squeeze=False)
    for axis, (xlabel, x_of) in zip(axes[0], panels, strict=True):
        labels: dict[float, list[tuple[float, str]]] = {}  # x -> (efficacy, label) of the points there
        for name, result in finals:
            x = x_of(result)
            if name == "unedited":
                axis.axvline(x, color="grey", linestyle="--", linewidth=1)
                continue
            axis.plot([x, x], [result["edit_metrics"][generalization], result["edit_metrics"][efficacy]],
                      color="lightgrey", linewidth=1, zorder=1)
            axis.scatter(x, result["edit_metrics"][efficacy], marker="o", color="C0", zorder=2)
            axis.scatter(x, result["edit_metrics"][generalization], marker="^", color="C1", zorder=2)
            seconds = result.get("edit_seconds")
            labels.setdefault(x, []).append((result["edit_metrics"][efficacy], name + (
                f" ({seconds / result['num_edits']:.2f} s/edit)" if seconds else "")))
        axis.margins(x=0.6)  # room for the labels right of the points
        axis.set(xlabel=xlabel + " (grey: unedited)", ylabel="percent (o efficacy, ^ generalization)")
        low, high = axis.get_ylim()
        points_per_unit = axis.get_window_extent().height * 72 / figure.dpi / (high - low)
        for x, entries in labels.items():  # labels of one x go down a column, 11 points apart at least
            below = math.inf
            for y, text in sorted(entries, reverse=True):
                offset = min(-4.0, below - y * points_per_unit)
                axis.annotate(text, (x, y), textcoords="offset points", xytext=(6, offset), fontsize="x-small")
                below = y * points_per_unit + offset - 11
    figure.suptitle(f"trade-off after {args.num_edits} edits (batches of {args.batch_size})", fontsize="medium")
    figure.tight_layout()
    figure.savefig(args.output_dir / "trade_off.png", dpi=120)
    plt.close(figure)


def plot_telemetry(args: argparse.Namespace) -> None:
    """`telemetry.png`: per method against the number of edits, the largest `‖W‖/‖W₀‖` and the mean `‖ΔW‖` of the
    edited matrices, the largest condition number of a solve, the smallest null-space room left and the mean
    relative target shift `‖z − h‖ / ‖h‖`, which the clamp bounds by `clamp_norm_factor` (batches recorded before
    the telemetry existed have none and are left out)."""
    import matplotlib.pyplot as plt

    panels = [("largest ‖W‖/‖W₀‖", lambda t: max(layer["weight_growth"] for layer in t["layers"]), "linear"),
              ("mean ‖ΔW‖ of the batch", lambda t: sum(layer["update_norm"] for layer in t["layers"])
               / len(t["layers"]), "linear"),
              ("largest condition number of a solve", lambda t: max(
                  (layer["condition_number"] for layer in t["layers"] if layer["condition_number"] is not None),
                  default=None), "log"),
              ("smallest null-space room left", lambda t: min(
                  (layer["null_space_left"] for layer in t["layers"] if layer["null_space_left"] is not None),
                  default=None), "linear"),
              ("mean target shift ‖z − h‖ / ‖h‖", lambda t: sum(
                  shift / hidden for shift, hidden in zip(t["target_shift_norms"], t["hidden_norms"], strict=True))
               / len(t["hidden_norms"]) if t.get("hidden_norms") else None, "from zero")]
    series = {}
    for method in args.methods:
        path = telemetry_path(args.output_dir, method)
        if path.exists():
            series[method] = [entry for entry in json.loads(path.read_text()) if entry.get("layers")]
    if not any(series.values()):
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for axis, (title, value, scale) in zip(axes, panels, strict=True):
        for method, entries in series.items():
            points = [(entry["num_edits"], value(entry)) for entry in entries]
            points = [point for point in points if point[1] is not None]
            if points:
                axis.plot(*zip(*points, strict=True), marker=".", label=method)
        axis.set(title=title, xlabel="number of edits", yscale="log" if scale == "log" else "linear")
        if scale == "from zero":  # a ratio the clamp holds constant: round-off would otherwise fill the axis
            axis.set_ylim(0, axis.get_ylim()[1] * 1.1)
        axis.title.set_fontsize("small")
    axes[0].legend(fontsize="x-small")
    figure.tight_layout()
    figure.savefig(args.output_dir / "telemetry.png", dpi=120)
    plt.close(figure)


def reference_loop_nll(model: torch.nn.Module, tokenizer: Any, records: list[dict]) -> list[float]:
    """The reference's way (§10.2, §13.1 #14): one right-padded forward per record over all its strings, full
    logits, then a Python loop over target tokens."""
    pad_id = tokenizer.pad_token_id
    nlls = []
    with inference(model):
        for request in as_edit_requests(records, batch_size=1):
            items = []
            for prompt, true in [(request.prompt_with_subject, request.target_true),
                                 *((p, request.target_true) for p in request.paraphrase_prompts),
                                 *((p, request.neighborhood_target) for p in request.neighborhood_prompts)]:
                for target in (request.target_new, true):
                    items.append((encode_prompt(tokenizer, prompt), encode_target(tokenizer, target)))
            input_ids, mask = right_pad([p + t for p, t in items], pad_id, model.device)
            log_probs = torch.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits.float(), dim=-1)
            for row, (prompt, target) in enumerate(items):
                total = sum(-log_probs[row, len(prompt) + j - 1, token].item() for j, token in enumerate(target))
                nlls.append(total / len(target))
    return nlls


def scorer_speedup(args: argparse.Namespace) -> None:
    model = AlphaEditModel.from_pretrained()
    records = load_edit_records(args.records, limit=args.speedup_records)
    evaluate_edits(model.model, model.tokenizer, records[:8])  # warm-up (metric modules, allocator)
    batched = evaluate_edits(model.model, model.tokenizer, records, per_record=True)
    batched_seconds = batched["seconds"]  # scoring and summaries; the protocol card (weight hashing) comes after
    start = time.perf_counter()
    loop_nll = reference_loop_nll(model.model, model.tokenizer, records)
    loop_seconds = time.perf_counter() - start
    batched_nll = [nll for record in batched["records"]
                   for kind in ("rewrite", "paraphrase", "neighborhood")
                   for pair in zip(record[f"{kind}_new_nll"], record[f"{kind}_true_nll"], strict=True)
                   for nll in pair]
    result: dict[str, Any] = {
        "records": len(records), "torch_threads": torch.get_num_threads(), "device": str(model.device),
        "batched_seconds": batched_seconds, "loop_seconds": loop_seconds,
        "batched_records_per_second": len(records) / batched_seconds,
        "loop_records_per_second": len(records) / loop_seconds, "speedup": loop_seconds / batched_seconds,
        "max_abs_nll_difference": max(abs(a - b) for a, b in zip(batched_nll, loop_nll, strict=True)),
        "protocol": batched["protocol"]}
    if args.full_evaluation:
        everything = load_edit_records(args.records)
        full = evaluate_edits(model.model, model.tokenizer, everything, show_progress=True)
        # The loop costs the same per record while the batched scorer's rate grows with the number of records,
        # so the speedup at full scale is rate over rate.
        result["full_evaluation"] = {
            **{k: full[k] for k in ("num_records", "seconds", "records_per_second", *EDIT_METRICS)},
            "speedup_over_loop_rate": full["records_per_second"] / result["loop_records_per_second"]}
    write_json(args.output_dir / "scorer_speedup.json", result)
    print(json.dumps(result, indent=2))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(CommonArguments(log_level=args.log_level))
    if args.scorer_speedup:
        scorer_speedup(args)
        return
    records, moves = separate_conflicts(load_edit_records(args.records, limit=args.num_edits), args.batch_size)
    for move in moves:
        print(f"batches: {move}", flush=True)
    base_path = checkpoint_path(args.output_dir, "base", 0)
    if not args.report_only and not unedited_evaluation_covers(base_path, records):
        model = AlphaEditModel.from_pretrained()
        before = {"schedule": {"timing": "before editing", "records": f"the first {len(records)} records in batch "
                               "order: every record the methods edit"}}
        write_json(base_path, {"method": "unedited", **evaluate_checkpoint(model, records, args, general=True,
                                                                           protocol=before)})
        del model
    for method in [] if args.report_only else args.methods:
        run_method(method, records, args)
        if args.single_edits:
            run_single_edits(method, records[:args.single_edits], args)
    runs = collect(args)
    write_json(args.output_dir / "results.json", {"args": {k: portable(v) for k, v in vars(args).items()},
                                                  "batch_order_moves": moves, "runs": runs})
    table = markdown_table(runs, args)
    if moves:
        table += ("\nBatch order: file order except " + "; ".join(moves) + " (a batch with two targets for one subject "
                  "and template is refused by the engine).\n")
    (args.output_dir / "results.md").write_text(table)
    plot(runs, args)
    if args.figures_dir:
        figures = Path(args.figures_dir)
        figures.mkdir(parents=True, exist_ok=True)
        for name in ("results.md", "results.json", "metrics_vs_edits.png", "comparison.png", "general.png",
                     "trade_off.png", "telemetry.png", "retention.png"):
            if (args.output_dir / name).exists():
                shutil.copy2(args.output_dir / name, figures / name)
    print(table)


if __name__ == "__main__":
    sys.exit(main())
