"""The `hf-alphaedit` command line and checkpointed sequential runs, on a tiny Llama saved to a folder.

The kill test runs the real console entry point (`python -m hf_alphaedit`) in a subprocess, SIGKILLs it right
after its first checkpoint and resumes it; the result must equal an uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_alphaedit import BetaEditConfig, EditingArguments
from hf_alphaedit.cli import COMMANDS, ModelArguments, UsageError, main, parse_command, read_config_file
from hf_alphaedit.methods import MemitConfig
from tests.tiny_models import tiny_causal_lm, tiny_tokenizer

RECORDS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome",
     "target_true": "Paris"},
    {"prompt": "The mother tongue of {} is", "subject": "Albert Einstein", "target_new": "Italian",
     "target_true": "German"},
    {"prompt": "{} plays the sport of", "subject": "Lionel Messi", "target_new": "basketball",
     "target_true": "football"},
]
KILL_TIMEOUT_S = 240
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data) -> dict[str, Path]:
    """A tiny Llama folder, a small corpus, an edits file and a YAML config naming them (shared statistics cache)."""
    root = tmp_path_factory.mktemp("cli")
    model = tiny_causal_lm("llama")
    with torch.no_grad():  # larger activations: edits move the logits and the null space is a proper subspace
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith(("down_proj", "lm_head")):
                module.weight.mul_(4.0)
    model.save_pretrained(root / "tiny")
    tiny_tokenizer().save_pretrained(root / "tiny")
    lines = (shared_data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()
    (root / "corpus.txt").write_text("\n".join([line.strip() for line in lines if line.strip()][:40]),
                                     encoding="utf-8")
    (root / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    # Numbers written the way YAML leaves them as strings (6e1, 5e-1): the dataclasses must convert them.
    (root / "config.yaml").write_text(
        f"model_name_or_path: {root / 'tiny'}\nstatistics_corpus: {root / 'corpus.txt'}\nstatistics_samples: 4e1\n"
        f"statistics_cache_dir: {root / 'stats'}\nlayers: [1, 2]\nv_num_grad_steps: 4\nv_lr: 5e-1\n"
        "nullspace_threshold: 1e-2\nbatch_size: 1\nsave_steps: 1\nquiet: true\n", encoding="utf-8")
    return {"root": root, "config": root / "config.yaml", "edits": root / "edits.jsonl", "model": root / "tiny"}


def _edit_argv(setup: dict[str, Path], output_dir: Path, *extra: str) -> list[str]:
    return ["edit", "--config", str(setup["config"]), "--requests", str(setup["edits"]), "--output_dir",
            str(output_dir), *extra]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# -- parsing: flags, help, config files -------------------------------------------------------------------------


def test_help_shows_every_field_as_a_flag(capsys):
    assert main(["--help"]) == 0
    overview = capsys.readouterr().out
    assert all(name in overview for name in COMMANDS)
    with pytest.raises(SystemExit) as stop:
        main(["edit", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for name in [*EditingArguments.__dataclass_fields__, "model_name_or_path", "requests", "config", "quiet",
                 "protect_previous_edits"]:
        assert f"--{name}" in text, name
    with pytest.raises(SystemExit):
        main(["edit", "--method", "memit", "--help"])
    assert "MEMIT_seq" in capsys.readouterr().out  # the selected method's config fields


def test_config_file_values_are_typed_and_flags_override_them(tmp_path):
    values = {"method": "MEMIT", "v_lr": "1e-4", "statistics_samples": "1e5", "layers": [2, 1],
              "protect_previous_edits": "yes", "batch_size": 7, "prune_alpha": 2, "resume_from_checkpoint": True,
              "requests": "facts.json", "quiet": "true"}
    (tmp_path / "run.json").write_text(json.dumps(values), encoding="utf-8")
    (tmp_path / "run.yaml").write_text("method: MEMIT\nv_lr: 1e-4\nstatistics_samples: 1e5\nlayers: [2, 1]\n"
                                       "protect_previous_edits: yes\nbatch_size: 7\nprune_alpha: 2\n"
                                       "resume_from_checkpoint: true\nrequests: facts.json\nquiet: true\n",
                                       encoding="utf-8")
    for config in ("run.json", "run.yaml"):
        parsed = parse_command(COMMANDS["edit"], ["--config", str(tmp_path / config), "--batch_size", "3"])
        args = parsed[EditingArguments]
        assert (args.method, args.v_lr, args.statistics_samples, args.layers) == ("memit", 1e-4, 100000, [1, 2])
        assert isinstance(args.statistics_samples, int) and isinstance(args.v_lr, float)
        assert args.batch_size == 3  # the flag wins over the file's 7
        assert (args.prune_alpha, args.resume_from_checkpoint) == ("2", "true")
        assert parsed[MemitConfig].protect_previous_edits is True
    with pytest.raises(UsageError, match=r"'statistics_corpuss': did you mean 'statistics_corpus'"):
        (tmp_path / "typo.yaml").write_text("statistics_corpuss: x.txt\n", encoding="utf-8")
        parse_command(COMMANDS["edit"], ["--config", str(tmp_path / "typo.yaml"), "--requests", "x.json"])



def test_none_on_the_command_line_gives_an_optional_number_its_none():
    """HfArgumentParser types `int | None` flags as int, so keeping every checkpoint or never refreshing BetaEdit's
    projector could only be said in a config file."""
    parsed = parse_command(COMMANDS["edit"], ["--requests", "x.json", "--save_total_limit", "none", "--method",
                                              "betaedit", "--projector_refresh_every", "NULL", "--save_steps", "2"])
    assert parsed[EditingArguments].save_total_limit is None and parsed[EditingArguments].save_steps == 2
    assert parsed[BetaEditConfig].projector_refresh_every is None
    defaults = parse_command(COMMANDS["edit"], ["--requests", "x.json", "--method", "betaedit"])
    assert defaults[EditingArguments].save_total_limit == 1 and defaults[BetaEditConfig].projector_refresh_every == 1000
    with pytest.raises(SystemExit):
        parse_command(COMMANDS["edit"], ["--requests", "x.json", "--save_total_limit", "all"])

EDITING_CONFIGS = [path for path in sorted((ROOT / "examples" / "configs").glob("*.yaml"))
                   if "train_files" not in read_config_file(str(path))]  # not the train-mend configs (test_mend)


@pytest.mark.parametrize("config", EDITING_CONFIGS, ids=lambda p: p.stem)
def test_example_configs_parse_for_every_subcommand(config):
    parsed = parse_command(COMMANDS["edit"], ["--config", str(config), "--requests", "examples/edits.json"])
    args = parsed[EditingArguments]
    assert args.method == "alphaedit" and isinstance(args.statistics_samples, int)
    assert isinstance(args.nullspace_threshold, float) and isinstance(args.l2, float)
    assert parsed[ModelArguments].model_name_or_path
    stats = parse_command(COMMANDS["stats"], ["--config", str(config)])[EditingArguments]
    assert stats.to_dict() == args.to_dict()
    export = parse_command(COMMANDS["export"], ["--config", str(config), "--edits", "x", "--output_dir", "y"])
    assert export[ModelArguments] == parsed[ModelArguments]


# -- bad input: one clear line, nothing edited ---------------------------------------------------------------------


def test_bad_input_is_reported_before_anything_is_edited(setup, tmp_path, capsys):
    status, _, err = _run(["edti"], capsys)
    assert status == 2 and "unknown command 'edti'" in err and "did you mean 'edit'" in err
    status, _, err = _run(_edit_argv(setup, tmp_path / "out", "--statistics_corpuss", "x"), capsys)
    assert status == 2 and "--statistics_corpuss" in err and "did you mean '--statistics_corpus'" in err
    status, _, err = _run(["edit", "--requests", str(tmp_path / "missing.jsonl")], capsys)
    assert status == 2 and "missing.jsonl" in err and "no such file" in err

    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text(json.dumps(RECORDS[0]) + "\n{\"prompt\": \"{} is\",\n", encoding="utf-8")
    status, _, err = _run(_edit_argv(setup, tmp_path / "out", "--requests", str(malformed)), capsys)
    assert status == 2 and "line 2" in err and "malformed JSON" in err

    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps([{"prompt": "no placeholder", "subject": "X", "target_new": "Y"},
                                   RECORDS[0], {"prompt": "{} is in", "subject": "Z"}]), encoding="utf-8")
    status, _, err = _run(["edit", "--requests", str(invalid), "--output_dir", str(tmp_path / "out")], capsys)
    assert status == 2 and "record 0" in err and "record 2" in err and "target_new" in err  # every problem
    assert not (tmp_path / "out").exists()  # nothing loaded, edited or written


# -- checkpointing: SIGKILL and resume --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(setup) -> Path:
    """The run every resumed run must reproduce exactly."""
    output = setup["root"] / "uninterrupted"
    assert main(_edit_argv(setup, output)) == 0
    return output


def _weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "edited_model" / "model.safetensors"))


def _assert_bitwise_equal(left: Path, right: Path) -> None:
    a, b = _weights(left), _weights(right)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a), [n for n in a if not torch.equal(a[n], b[n])]


def test_killed_run_resumes_bitwise_identical_with_every_edit_once(setup, uninterrupted, tmp_path, capsys):
    output = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "hf_alphaedit", *_edit_argv(setup, output)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while not (output / "latest").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    stderr = process.communicate()[1].decode()
    assert process.returncode == -signal.SIGKILL, f"the run ended before it was killed: {stderr[-2000:]}"
    assert not (output / "edited_model").exists()

    status, _, err = _run(_edit_argv(setup, output), capsys)  # same run, no resume: refused, nothing lost
    assert status == 2 and "already holds this run" in err and "--resume_from_checkpoint true" in err
    status, _, err = _run(_edit_argv(setup, output, "--v_num_grad_steps", "3", "--resume_from_checkpoint", "true"),
                          capsys)
    assert status == 2 and "different run" in err and "v_num_grad_steps: 4 -> 3" in err

    status, out, _ = _run(_edit_argv(setup, output, "--resume_from_checkpoint", "true"), capsys)
    assert status == 0 and "resumed after" in out and str(output / "edited_model") in out
    _assert_bitwise_equal(uninterrupted, output)
    log = [json.loads(line) for line in (output / "edited_model" / "edit_log.jsonl").read_text().splitlines()]
    assert [(line["subject"], line["target_new"]) for line in log if line["event"] == "edit"] == [
        (r["subject"], r["target_new"]) for r in RECORDS]
    assert [line["batch"] for line in log] == [0, 1, 2]


def test_resume_ignores_interrupted_writes(setup, uninterrupted, tmp_path, capsys):
    """What a kill during a checkpoint leaves (a staging folder, no `latest`) is cleared, the last complete
    checkpoint is used, and a finished run resumes to the same model."""
    output = tmp_path / "copy"
    shutil.copytree(uninterrupted, output)
    shutil.rmtree(output / "edited_model")
    (output / "latest").unlink()
    (output / ".tmp-partial").mkdir()
    (output / ".tmp-partial" / "edit_state.json").write_text("{", encoding="utf-8")
    status, out, _ = _run(_edit_argv(setup, output, "--resume_from_checkpoint", "true"), capsys)
    assert status == 0 and f"resumed after {len(RECORDS)} batches" in out
    assert not (output / ".tmp-partial").exists()
    _assert_bitwise_equal(uninterrupted, output)

    status, _, err = _run(_edit_argv(setup, output, "--batch_size", "2"), capsys)
    assert status == 2 and "different run" in err and "--overwrite_output_dir" in err


# -- the other subcommands on the finished run ------------------------------------------------------------------


def test_info_export_evaluate_push_and_stats(setup, uninterrupted, tmp_path, capsys, unique_repo_id):
    status, out, _ = _run(["info", "--path", str(uninterrupted)], capsys)
    assert status == 0 and "edit run" in out and "checkpoint-000003 (3 edits, 3 batches)" in out
    status, out, _ = _run(["info", "--path", str(uninterrupted), "--json"], capsys)
    assert status == 0 and json.loads(out)["kept checkpoints"] == "checkpoint-000003"  # save_total_limit 1
    status, out, _ = _run(["info", "--path", str(uninterrupted / "edited_model"), "--json"], capsys)
    description = json.loads(out)
    assert (description["kind"], description["edits"], description["layers"]) == ("edited model", 3, [1, 2])

    lora = tmp_path / "lora"
    # The editing config serves export too: its editing keys are flags of other subcommands and left out.
    status, _, _ = _run(["export", "--config", str(setup["config"]), "--edits", str(uninterrupted),
                         "--output_dir", str(lora)], capsys)
    assert status == 0 and json.loads((lora / "adapter_config.json").read_text())["r"] == len(RECORDS)

    results = tmp_path / "results.json"
    status, out, _ = _run(["evaluate", "--model_name_or_path", str(setup["model"]), "--edits", str(uninterrupted),
                           "--requests", str(setup["edits"]), "--baseline", "--output_file", str(results),
                           "--quiet"], capsys)
    assert status == 0
    scores = json.loads(results.read_text())
    assert scores["num_records"] == len(RECORDS) and "efficacy" in scores["pre"]
    assert "efficacy" in out and "(before:" in out

    repo_id = unique_repo_id("cli-edited")
    status, out, _ = _run(["push", "--path", str(uninterrupted), "--repo_id", repo_id, "--quiet"], capsys)
    assert status == 0 and repo_id in out
    status, out, _ = _run(["info", "--path", repo_id, "--json"], capsys)
    assert status == 0 and json.loads(out)["kind"] == "edited model"

    artifact = tmp_path / "artifact"
    status, out, _ = _run(["stats", "--config", str(setup["config"]), "--output_dir", str(artifact)], capsys)
    assert status == 0 and "null space" in out
    status, out, _ = _run(["info", "--path", str(artifact), "--json"], capsys)
    assert json.loads(out)["kind"] == "projection artifact" and json.loads(out)["layers"] == [1, 2]
