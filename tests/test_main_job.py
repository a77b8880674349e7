"""The README's main job, end to end on the real SmolLM2 (with a small statistics sample so it stays fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from hf_alphaedit.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_config_edits_evaluates_and_saves_offline(smollm2, smollm2_cache, smollm2_statistics_dir,
                                                            smollm2_statistics_samples, tmp_path, monkeypatch, capsys,
                                                            caplog):
    # `smollm2` has converted the embedded GGUF into `smollm2_cache`; the CLI loads it from there. No network: the
    # Hub's name does not resolve, as on a machine without internet (and without HF_HUB_OFFLINE set).
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://hub-unreachable.invalid")
    monkeypatch.setenv("HF_ALPHAEDIT_CACHE", str(smollm2_cache))
    monkeypatch.chdir(ROOT)
    output_dir = tmp_path / "quickstart"
    status = main(["edit", "--config", "examples/configs/quickstart.yaml",
                   "--statistics_samples", str(smollm2_statistics_samples), "--output_dir", str(output_dir),
                   "--statistics_cache_dir", str(smollm2_statistics_dir), "--quiet"])
    out = capsys.readouterr().out
    assert status == 0, out
    unreachable = [r.getMessage() for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(unreachable) == 1 and "cannot resolve hub-unreachable.invalid" in unreachable[0], unreachable
    requests = json.loads((ROOT / "examples" / "edits.json").read_text())
    answers = out[out.index("answers (greedy)"):]
    assert answers.count("\n      before: ") == answers.count("\n      after:  ") == len(requests)
    assert "efficacy" in out and "edited model" in out
    saved = output_dir / "edited_model"
    log = [json.loads(line) for line in (saved / "edit_log.jsonl").read_text().splitlines() if line.strip()]
    assert [entry["subject"] for entry in log if "subject" in entry] == [r["subject"] for r in requests]
    card = ModelCard.load(saved / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "Eiffel Tower" in card.text
    metrics = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert metrics["efficacy"] >= 80, metrics  # percent, after the edits
