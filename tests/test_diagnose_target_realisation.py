"""`scripts/diagnose_target_realisation.py` on a tiny Llama: its scorer gives the CounterFact evaluation's rewrite NLLs
and shifts the z-layer exactly at the lookup token, it reads back the `h` target optimisation starts from, its edits
are the method's own and are undone bit for bit, a NAS run also gets its rescaled targets scored, and a checkpoint of
a run is diagnosed at the run's next records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_alphaedit import AlphaEditModel
from hf_alphaedit.checkpointing import run_identity, save_checkpoint
from hf_alphaedit.evaluation import load_edit_records
from hf_alphaedit.fingerprint import weights_sha256
from hf_alphaedit.requests import as_edit_requests
from tests.load_module import load_module
from tests.test_engine import _args, _scaled_model
from tests.tiny_models import tiny_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "diagnose_target_realisation.py"
METRICS = ("efficacy", "generalization", "specificity", "efficacy_magnitude")


@pytest.fixture(scope="module")
def diagnosis():
    return load_module(SCRIPT, "diagnose_target_realisation")


@pytest.fixture(scope="module")
def records(shared_data: Path) -> list[dict]:
    return load_edit_records(shared_data / "counterfact" / "counterfact-edit.json", limit=4)


@pytest.fixture(scope="module")
def anchor_records(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """20 CounterFact training records for NAS's anchor."""
    train = json.loads((shared_data / "counterfact" / "counterfact-train.json").read_text(encoding="utf-8"))
    path = tmp_path_factory.mktemp("anchor") / "train-head.json"
    path.write_text(json.dumps(train[:20]), encoding="utf-8")
    return path


def _editor(corpus_file: Path, method: str = "alphaedit", **overrides) -> AlphaEditModel:
    """AlphaEdit (or `method`) on edited layers 1 and 2 of a tiny Llama with a non-trivial null space."""
    return AlphaEditModel(_scaled_model(), tiny_tokenizer(),
                          _args(corpus_file.parent, layers=[1, 2], method=method, batch_size=2, **overrides))


def test_the_scorer_gives_the_evaluations_rewrite_nlls_and_shifts_only_the_lookup_token(diagnosis, corpus_file,
                                                                                        records):
    editor = _editor(corpus_file)
    requests = as_edit_requests(records[:3])
    nlls, outputs = diagnosis.rewrite_nlls(editor, requests)
    scored = editor.evaluate(records[:3], live=False, per_record=True, show_progress=False)["records"]
    expected = torch.tensor([[r["rewrite_new_nll"][0], r["rewrite_true_nll"][0]] for r in scored], dtype=torch.float64)
    torch.testing.assert_close(nlls, expected, rtol=0, atol=1e-4)
    assert torch.equal(diagnosis.rewrite_nlls(editor, requests, torch.zeros_like(outputs))[0], nlls)
    shifts = torch.randn(outputs.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    shifted, before_shift = diagnosis.rewrite_nlls(editor, requests, shifts)
    assert torch.equal(before_shift, outputs)  # the output is read before the shift...
    assert not torch.allclose(shifted, nlls)  # ...which reaches the logits
    # The lookup token is the subject's last: a shift there changes nothing before it.
    ids, lookup = diagnosis.lookup_encodings(editor, requests[:1])[0]
    with diagnosis.shifted_block_output(editor, lookup, shifts[0]):
        hidden = editor.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[editor.hparams.z_layer + 1]
    plain = editor.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[editor.hparams.z_layer + 1]
    assert torch.equal(hidden[0, :lookup], plain[0, :lookup])
    torch.testing.assert_close((hidden - plain)[0, lookup].double(), shifts[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("nas", [False, True], ids=["alphaedit", "alphaedit+nas"])
def test_a_diagnosis_edits_as_the_method_does_and_leaves_the_model_as_it_was(diagnosis, corpus_file, records,
                                                                            anchor_records, nas):
    settings = {"norm_anchor": True, "norm_anchor_records": str(anchor_records), "norm_anchor_samples": 20} if nas \
        else {}
    editor = _editor(corpus_file, **settings)
    editor.edit(records[:2], batch_size=2)
    before = weights_sha256(editor.model)
    result = diagnosis.diagnose(editor, records[2:4])
    assert weights_sha256(editor.model) == before and editor.state.num_edits == 2
    assert result["edits_applied"] == 2 and result["num_requests"] == 2
    # The scorer reads (and shifts) the z-layer where target optimisation starts from h and adds δ.
    assert result["hidden_read_back"] < 1e-5
    rewrite = result["rewrite"]
    assert ("edited_nas" in rewrite) is nas and ("injected_nas" in rewrite) is nas
    edited = "edited_nas" if nas else "edited"
    assert 0.0 < result[f"{edited}_realised"]["along"] <= 1.5
    if nas:
        assert result["nas_shift_norm"] != pytest.approx(result["shift_norm"])
    # The diagnosis's edit towards the run's targets is the edit the method makes.
    editor.edit(records[2:4], batch_size=2)
    metrics = editor.evaluate(records[2:4], live=False, show_progress=False)
    assert result[f"{edited}_metrics"] == pytest.approx({name: metrics[name] for name in METRICS}, abs=1e-6)


def test_methods_without_optimised_targets_are_refused(diagnosis, corpus_file, records):
    with pytest.raises(SystemExit, match="for the locate-then-edit methods"):
        diagnosis.diagnose(_editor(corpus_file, method="ft"), records[:1])


def test_main_diagnoses_the_records_after_a_checkpoint(diagnosis, corpus_file, records, shared_data, tmp_path,
                                                      monkeypatch):
    benchmark = diagnosis.benchmark_module()
    monkeypatch.setattr(benchmark, "load_method", lambda method, args, batch_size: _editor(corpus_file, method))
    monkeypatch.setattr(diagnosis, "benchmark_module", lambda: benchmark)
    flags = ["--", "--num_edits", "4", "--batch_size", "2", "--methods", "alphaedit", "--records",
             str(shared_data / "counterfact" / "counterfact-edit.json")]
    editor = _editor(corpus_file)
    editor.edit(records[:2], batch_size=2)
    resume = tmp_path / "resume"
    resume.mkdir()
    save_checkpoint(editor, resume, run_identity(editor, as_edit_requests(records, batch_size=2)))
    diagnosis.main(["--checkpoint", str(resume), "--num_requests", "2", "--output", str(tmp_path / "d.json"), *flags])
    result = json.loads((tmp_path / "d.json").read_text())
    assert (result["checkpoint"], result["edits_applied"], result["num_requests"]) == (str(resume), 2, 2)
    with pytest.raises(SystemExit, match="--num_requests 3: only 2 of the run's 4 records are left after 2 edits"):
        diagnosis.main(["--checkpoint", str(resume), "--num_requests", "3", "--output", str(tmp_path / "e.json"),
                        *flags])
    with pytest.raises(SystemExit, match="name the one method"):
        diagnosis.main(["--checkpoint", "none", "--output", str(tmp_path / "f.json"), "--", "--methods",
                        "alphaedit,memit"])
