"""`scripts/benchmark_sequential.py`: the `--methods` variants of the calibration runs reach the right dataclass,
typed, and a typo stops the run before any editing; every protocol card of a checkpoint names the same model; a
resumed run completes the evaluation it resumes at."""

from __future__ import annotations

import argparse
import functools
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from hf_alphaedit import AlphaEditModel, EditingArguments
from hf_alphaedit.evaluation import load_edit_records
from hf_alphaedit.fingerprint import file_sha256, records_sha256
from hf_alphaedit.hub import ModelSource
from hf_alphaedit.methods.ultraedit import UltraEditConfig
from hf_alphaedit.requests import EditRequestError, as_edit_requests
from tests.load_module import load_module
from tests.test_engine import _args, _scaled_model
from tests.tiny_models import tiny_causal_lm, tiny_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_sequential.py"


def _tiny_editor(corpus: Path, method: str, batch_size: int) -> AlphaEditModel:
    """What the benchmark's `load_method` gives, on a tiny Llama instead of SmolLM2."""
    return AlphaEditModel(_scaled_model(), tiny_tokenizer(),
                          _args(corpus, layers=[1, 2], method=method, batch_size=batch_size))


def _write_evaluations(benchmark_script, runs: dict[str, list[dict]], output_dir: Path, *,
                       leave_out: tuple[str, int] | None = None) -> None:
    """The evaluations of a committed `results.json` as a run's output folder (without `leave_out`'s)."""
    for method, results in runs.items():
        for result in results:
            if (method, result["num_edits"]) != leave_out:
                benchmark_script.write_json(benchmark_script.checkpoint_path(output_dir, method, result["num_edits"]),
                                            result)


@pytest.fixture(scope="module")
def benchmark_script():
    return load_module(SCRIPT, "benchmark_sequential")


def test_settings_go_to_editing_arguments_or_the_method_config(benchmark_script):
    fields, config = benchmark_script.variant_arguments("alphaedit+v_lr_rms_factor=0.5+clamp_norm_factor=0.5")
    assert fields == {"method": "alphaedit", "v_lr_rms_factor": "0.5", "clamp_norm_factor": "0.5"} and config is None
    fields, config = benchmark_script.variant_arguments("ultraedit+lr=1e-4+chunk_size=20+seed=3")
    assert fields == {"method": "ultraedit", "seed": "3"}
    assert isinstance(config, UltraEditConfig) and config.lr == 1e-4 and config.chunk_size == 20
    fields, _ = benchmark_script.variant_arguments("alphaedit+layers=2,3,4,5,6,7,8")  # more room (issue 17, lead 2)
    assert fields == {"method": "alphaedit", "layers": ["2", "3", "4", "5", "6", "7", "8"]}
    assert EditingArguments(**fields).layers == [2, 3, 4, 5, 6, 7, 8]
    fields, config = benchmark_script.variant_arguments("memit+prune+mom2_update_weight=2000")
    assert fields == {"method": "memit", "prune": True, "mom2_update_weight": "2000"} and config is None


def test_the_memory_budget_flag_reaches_every_run_unless_the_variant_sets_its_own(benchmark_script):
    args = benchmark_script.parse_args(["--target_memory_budget", "4GiB"])
    editing_args, _ = benchmark_script.run_arguments("alphaedit", args, 100)
    assert (editing_args.target_memory_budget, editing_args.batch_size) == (str(4 * 2**30), 100)
    editing_args, _ = benchmark_script.run_arguments("alphaedit+target_memory_budget=1GiB", args, 100)
    assert editing_args.target_memory_budget == str(2**30)
    editing_args, _ = benchmark_script.run_arguments("memit", benchmark_script.parse_args([]), 100)
    assert editing_args.target_memory_budget == "auto"


@pytest.mark.parametrize(("name", "message"), [
    ("ultraedit+learning_rate=1e-4", r"unknown option\(s\) \['learning_rate='\].*EditingArguments and UltraEditConfig"),
    ("ultraedit+lr=-1", r"UltraEditConfig\.lr"),
    ("alphaedit+sparkle", r"unknown option\(s\) \['sparkle'\]"),
    ("alphaedt", r"unknown method"),
])
def test_a_bad_variant_stops_before_editing_and_names_the_field(benchmark_script, name, message):
    with pytest.raises(SystemExit, match=message):
        benchmark_script.variant_arguments(name)


def test_the_general_suites_card_names_the_model_as_the_edit_metrics_card_does(benchmark_script, shared_data,
                                                                                tmp_path):
    """The embedded SmolLM2 is loaded from a local folder (its config's `name_or_path`), which the general suite's
    card used to name instead of the Hub model and its edit history."""
    model = tiny_causal_lm("llama")
    model.config._name_or_path = str(tmp_path / "local-copy")
    source = ModelSource("tester/tiny-llama", None, "0" * 40, "hub")
    editor = AlphaEditModel(model, tiny_tokenizer(), EditingArguments(disable_tqdm=True), source)
    args = argparse.Namespace(records=str(shared_data / "counterfact" / "counterfact-edit.json"), live=False,
                              general_examples=2, general_dir=str(shared_data / "general"), batch_size=2)
    records = load_edit_records(args.records, limit=3)
    result = benchmark_script.evaluate_checkpoint(editor, records, args, general=True, protocol={})
    edit_card, general_card = result["edit_metrics"]["protocol"], result["general"]["protocol"]
    assert general_card["model"]["id"] == edit_card["model"]["id"] == "tester/tiny-llama"
    assert general_card["model"]["revision"] == "0" * 40 and general_card["editing"] == edit_card["editing"]
    assert general_card["model"]["weights_sha256"] == edit_card["model"]["weights_sha256"]
    assert str(tmp_path) not in str(general_card)
    # Per-batch retention: the records of each batch (2, then 1) scored alone, consistent with the whole.
    retention, metrics = result["retention"], result["edit_metrics"]
    assert [entry["records"] for entry in retention] == [[0, 2], [2, 3]] and "records" not in metrics
    for name in ("efficacy", "generalization", "specificity"):
        weighted = sum(entry[name] * entry["num_records"] for entry in retention) / 3
        assert weighted == pytest.approx(metrics[name]), name
    alone = editor.evaluate(args.records, limit=2)
    assert retention[0]["specificity_magnitude"] == pytest.approx(alone["specificity_magnitude"])
    table = "\n".join(benchmark_script.retention_table(
        {"base": [], "alphaedit": [result]}, argparse.Namespace(dataset="counterfact", methods=["alphaedit"])))
    first = " / ".join(f"{retention[0][name]:.0f}" for name in ("efficacy", "generalization", "specificity"))
    assert f"| alphaedit | 0 | {first} (records 0–1) |" in table


def test_the_tables_protocol_sentence_names_the_unedited_weights_not_the_first_methods(benchmark_script):
    """Every method's result card names its own edited weights; the one sentence under the table holds for all rows,
    so it names the weights they were all edited from."""
    def result(weights: str) -> dict:
        card = {"model": {"id": "tester/tiny-llama", "origin": "hub", "weights_sha256": weights},
                "dataset": {"records": [0, 2], "source": "counterfact-edit.json", "file_sha256": "f" * 64},
                "editing": {"num_edits": 2, "num_batches": 1, "batch_sizes": [2]},
                "schedule": {"timing": "after all batches"}, "metric_families": {"teacher_forced": ["efficacy"]},
                "package_version": "0.1.0"}
        return {"edit_metrics": {"protocol": card}}

    sentence = benchmark_script.protocol_summary(result("b" * 64), result("a" * 64))
    assert "unedited weights `aaaaaaaaaaaa…`" in sentence and "bbbb" not in sentence
    assert "weights" not in benchmark_script.protocol_summary(result("b" * 64), None).split(";")[0]


def test_the_goal_table_marks_each_metric_against_the_unedited_model_on_the_same_records(benchmark_script,
                                                                                        shared_data, tmp_path):
    """`--report_only` on the 10,000-edit runs' evaluations (docs/benchmarks): specificity is held against the
    unedited model's on the records edited so far (65.0 on the first 500, 67.2 on 1,000, 68.65 on 2,000; 68.4 on all
    10,000), the general suite's accuracy against the unedited 47.25, and a point without the suite has no general
    cell; the plot has the general suite's panel beside the three edit metrics."""
    docs = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "lifelong_10000"
    runs = json.loads((docs / "results.json").read_text())["runs"]
    _write_evaluations(benchmark_script, runs, tmp_path)
    benchmark_script.main(["--report_only", "--num_edits", "10000", "--no_live", "--methods", "alphaedit,alphaedit+nas",
                           "--output_dir", str(tmp_path),
                           "--records", str(shared_data / "counterfact" / "counterfact-edit.json")])
    table = (tmp_path / "results.md").read_text()
    assert "| alphaedit | 500 | 96.0 ✓ | 78.8 ✗ | 64.60 (−0.40) ✓ | – |" in table
    assert "| alphaedit | 2000 | 90.2 ✗ | 78.6 ✗ | 60.30 (−8.35) ✗ | 45.88 (−1.38) ✓ |" in table
    assert "| alphaedit+nas | 1000 | 95.5 ✓ | 79.8 ✗ | 61.90 (−5.30) ✗ | 46.88 (−0.38) ✓ |" in table
    assert Image.open(tmp_path / "metrics_vs_edits.png").size == (2112, 456)  # four panels of 4.4 in at 120 dpi
    without_retention = {**runs, "base": [{k: v for k, v in runs["base"][0].items() if k != "retention"}]}
    assert benchmark_script.goal_table(
        without_retention, argparse.Namespace(dataset="counterfact", methods=["alphaedit"])) == []


def test_report_only_tables_a_run_in_progress_at_its_latest_evaluation(benchmark_script, shared_data, tmp_path,
                                                                     request):
    """`--report_only` on the evaluations of the 1,500-edit MEMIT run (docs/benchmarks) with MEMIT's last one removed,
    as while the run goes on: no model is loaded, MEMIT's row is its 1,000-edit point, AlphaEdit's its final one.
    hf_alphaedit logs at the CLI's default level (info), so a long run's log shows what the library reports."""
    library_logger = logging.getLogger("hf_alphaedit")
    # setLevel, not an attribute patch, both ways: it also clears the loggers' cached isEnabledFor answers
    request.addfinalizer(functools.partial(library_logger.setLevel, library_logger.level))
    library_logger.setLevel(logging.WARNING)  # as in a fresh process
    docs = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "lifelong_1500_memit"
    saved = json.loads((docs / "results.json").read_text())
    memit = "memit+mom2_update_weight=2000+clamp_norm_factor=0.5"
    _write_evaluations(benchmark_script, saved["runs"], tmp_path, leave_out=(memit, 1500))
    (tmp_path / memit / "telemetry.json").write_text((docs / "memit_telemetry.json").read_text())
    benchmark_script.main(["--report_only", "--num_edits", "1500", "--no_live", "--methods", f"alphaedit,{memit}",
                           "--output_dir", str(tmp_path),
                           "--records", str(shared_data / "counterfact" / "counterfact-edit.json")])
    table = (tmp_path / "results.md").read_text()
    assert "| alphaedit | 1500 | 93.0 / – | 80.1 / – | 61.4 / – |" in table
    assert f"| {memit} | 1000 | 88.1 / – | 79.7 / – | 59.4 / – |" in table
    assert f"| {memit} | 1500 |" not in table and "| unedited (all 1500 records) | 0 | 31.8 / – |" in table
    assert {"results.json", "metrics_vs_edits.png", "comparison.png", "telemetry.png", "retention.png"} <= {
        path.name for path in tmp_path.iterdir()}
    assert library_logger.getEffectiveLevel() == logging.INFO


def test_a_record_that_contradicts_its_batch_trades_places_with_the_next_batchs_first(benchmark_script, shared_data):
    """CounterFact's edit records ask twice, within one batch of 100, for another twin city of Warsaw and of Algiers:
    the engine refuses such a batch, so the benchmark moves the later record to the next batch and nothing else."""
    records = load_edit_records(shared_data / "counterfact" / "counterfact-edit.json")
    with pytest.raises(EditRequestError, match="conflicting targets 'Valencia' and 'Cairo' for subject 'Warsaw'"):
        as_edit_requests(records, batch_size=100)
    reordered, moves = benchmark_script.separate_conflicts(records, 100)
    as_edit_requests(reordered, batch_size=100)  # no batch contradicts itself any more
    changed = {index for index, (old, new) in enumerate(zip(records, reordered, strict=True)) if old is not new}
    assert changed == {3044, 3100, 9675, 9700} and len(moves) == 2
    assert (reordered[3044], reordered[3100]) == (records[3100], records[3044])
    assert reordered[:1500] == records[:1500]  # the runs extended from 1,500 edits keep their batches


def test_evaluations_score_the_records_edited_so_far_in_batch_order(benchmark_script, shared_data, corpus, tmp_path,
                                                                     monkeypatch, capsys):
    """Record 1 asks for another target of record 0's subject, so it trades places with record 2: the evaluation after
    the first batch scores records 0 and 2 of the file (the edited ones, not the file's first two), and an unedited
    evaluation of the file's order (its per-batch scores attributed to the wrong batches) is redone."""
    file_records = load_edit_records(shared_data / "counterfact" / "counterfact-edit.json", limit=4)
    file_records[1] = {**file_records[0], "case_id": -1, "target_new": {"str": "Atlantis"}}
    records_file = tmp_path / "records.json"
    records_file.write_text(json.dumps(file_records))
    batch_order = [file_records[0], file_records[2], file_records[1], file_records[3]]
    unedited = _tiny_editor(corpus, "alphaedit", 2)
    monkeypatch.setattr(benchmark_script, "AlphaEditModel", argparse.Namespace(from_pretrained=lambda: unedited))
    monkeypatch.setattr(benchmark_script, "load_method",
                        lambda method, args, batch_size: _tiny_editor(corpus, method, batch_size))
    flags = ["--num_edits", "4", "--batch_size", "2", "--eval_every", "1", "--no_live", "--general_examples", "0",
             "--records", str(records_file), "--output_dir", str(tmp_path / "run"), "--methods", "alphaedit"]
    args = benchmark_script.parse_args(flags)
    base_path = benchmark_script.checkpoint_path(args.output_dir, "base", 0)
    benchmark_script.write_json(base_path, benchmark_script.evaluate_checkpoint(
        unedited, file_records, args, general=False, protocol={}))  # as before batch order was evaluated

    benchmark_script.main(flags)
    assert f"{base_path}: the unedited evaluation scored other records or another order" in capsys.readouterr().out

    def dataset(path: Path) -> dict:
        return json.loads(path.read_text())["edit_metrics"]["protocol"]["dataset"]

    assert dataset(base_path)["records_sha256"] == records_sha256(batch_order)
    after_first_batch = dataset(benchmark_script.checkpoint_path(args.output_dir, "alphaedit", 2))
    assert after_first_batch["records_sha256"] == records_sha256(batch_order[:2]) != records_sha256(file_records[:2])
    assert after_first_batch["source"] == "records.json"
    assert after_first_batch["file_sha256"] == file_sha256(records_file)
    assert benchmark_script.unedited_evaluation_covers(base_path, batch_order)


def test_a_run_resumed_at_an_evaluation_without_the_general_suite_adds_it_as_if_run_then(benchmark_script, shared_data,
                                                                                          corpus, tmp_path,
                                                                                          monkeypatch):
    """The 10,000-edit runs evaluate the general suite only at the end; `--general_every_eval` on a resumed run adds
    it to the evaluation point the run resumes at (from that point's checkpoint), with the scores a run that had the
    flag from the start wrote there, and leaves the edit metrics as they were."""
    class Interrupted(Exception):
        pass

    def loader(stop_after: int | None):
        def load_method(method, args, batch_size):
            editor = _tiny_editor(corpus, method, batch_size)
            edit, done = editor.edit, []

            def edit_until_interrupted(*args, **kwargs):
                if stop_after is not None and len(done) == stop_after:
                    raise Interrupted
                done.append(True)
                return edit(*args, **kwargs)

            editor.edit = edit_until_interrupted
            return editor
        return load_method

    records = load_edit_records(shared_data / "counterfact" / "counterfact-edit.json", limit=4)

    def run(output_dir: Path, *flags: str) -> None:
        args = benchmark_script.parse_args(["--num_edits", "4", "--batch_size", "2", "--eval_every", "1", "--no_live",
                                            "--general_examples", "4", "--general_dir", str(shared_data / "general"),
                                            "--records", str(shared_data / "counterfact" / "counterfact-edit.json"),
                                            "--output_dir", str(output_dir), "--methods", "alphaedit", *flags])
        benchmark_script.run_method("alphaedit", records, args)

    def point(output_dir: Path, edits: int) -> dict:
        return json.loads(benchmark_script.checkpoint_path(output_dir, "alphaedit", edits).read_text())

    monkeypatch.setattr(benchmark_script, "load_method", loader(stop_after=1))
    with pytest.raises(Interrupted):
        run(tmp_path / "resumed")
    before = point(tmp_path / "resumed", 2)
    assert "general" not in before
    monkeypatch.setattr(benchmark_script, "load_method", loader(stop_after=None))
    run(tmp_path / "resumed", "--general_every_eval")
    run(tmp_path / "from_the_start", "--general_every_eval")
    resumed, reference = point(tmp_path / "resumed", 2), point(tmp_path / "from_the_start", 2)
    assert resumed["edit_metrics"] == before["edit_metrics"]
    for task in benchmark_script.general_tasks(reference):
        assert resumed["general"][task]["f1"] == reference["general"][task]["f1"], task
    assert resumed["general"]["protocol"]["editing"] == reference["general"]["protocol"]["editing"]
    assert "general" in point(tmp_path / "resumed", 4)


def test_a_run_stopped_at_a_number_of_edits_goes_on_from_there_to_the_same_result(benchmark_script, shared_data,
                                                                                   corpus, tmp_path, monkeypatch):
    """`--stop_at_edits` ends a method's turn after the batch that reaches it (its evaluation and checkpoint
    written), the same command again stops at once, and without it the run goes on to the result of a run straight
    through."""
    monkeypatch.setattr(benchmark_script, "load_method",
                        lambda method, args, batch_size: _tiny_editor(corpus, method, batch_size))
    records = load_edit_records(shared_data / "counterfact" / "counterfact-edit.json", limit=6)

    def run(output_dir: Path, *flags: str) -> None:
        args = benchmark_script.parse_args(["--num_edits", "6", "--batch_size", "2", "--eval_every", "1", "--no_live",
                                            "--general_examples", "0", "--output_dir", str(output_dir),
                                            "--records", str(shared_data / "counterfact" / "counterfact-edit.json"),
                                            "--methods", "alphaedit", *flags])
        benchmark_script.run_method("alphaedit", records, args)

    def evaluated(output_dir: Path) -> list[str]:
        return sorted(path.name for path in (output_dir / "alphaedit").glob("edits_*.json"))

    run(tmp_path / "in_turns", "--stop_at_edits", "3")
    assert evaluated(tmp_path / "in_turns") == ["edits_0002.json", "edits_0004.json"]
    assert (tmp_path / "in_turns" / "alphaedit" / "resume" / "latest").read_text().strip() == "checkpoint-000002"
    run(tmp_path / "in_turns", "--stop_at_edits", "4")
    assert evaluated(tmp_path / "in_turns") == ["edits_0002.json", "edits_0004.json"]
    run(tmp_path / "in_turns")
    run(tmp_path / "straight")
    last = [json.loads((folder / "alphaedit" / "edits_0006.json").read_text())
            for folder in (tmp_path / "in_turns", tmp_path / "straight")]
    weights = [result["edit_metrics"]["protocol"]["model"]["weights_sha256"] for result in last]
    assert weights[0] == weights[1]  # the edited weights, bit for bit
    for name in ("efficacy", "generalization", "specificity"):
        assert [b[name] for b in last[0]["retention"]] == [b[name] for b in last[1]["retention"]], name
    with pytest.raises(SystemExit, match="--stop_at_edits 0: give a positive number"):
        benchmark_script.parse_args(["--stop_at_edits", "0"])
