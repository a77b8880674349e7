"""Real edits on the embedded SmolLM2-135M-Instruct with wikitext-2 key statistics (slow: minutes on 2 cores)."""

from __future__ import annotations

import json

import pytest
import torch

from hf_alphaedit import AlphaEditModel
from hf_alphaedit.requests import as_edit_requests
from tests.naive_scoring import rewrite_log_probs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def records(shared_data) -> list[dict]:
    return json.loads((shared_data / "counterfact" / "counterfact-edit.json").read_text())[:60]


@pytest.fixture()
def editor(smollm2_editor) -> AlphaEditModel:
    return smollm2_editor()


def _efficacy(editor: AlphaEditModel, records: list[dict]) -> float:
    """Share of records whose new target is more probable than the true one on the rewrite prompt (§10.2)."""
    new, true = (rewrite_log_probs(editor.model, editor.tokenizer, records, field)
                 for field in ("target_new", "ground_truth"))
    return 100.0 * (new > true).float().mean().item()


def test_thirty_counterfact_edits_in_one_batch(editor, records):
    batch = records[:30]
    before = _efficacy(editor, batch)
    weights = {layer: editor.spec.weight(editor.model, layer).clone() for layer in range(editor.spec.num_layers)}
    result = editor.edit(batch, batch_size=30)
    after = _efficacy(editor, batch)
    print(f"efficacy {before:.1f} -> {after:.1f}; {result.seconds:.0f}s; steps {result.batches[0].target_steps}")
    assert before < 60 and after >= 95
    changed = [layer for layer, w in weights.items() if not torch.equal(w, editor.spec.weight(editor.model, layer))]
    assert changed == list(editor.hparams.layers)
    projector = editor.projector
    assert all(0 < projector.null_space_dim(layer) < editor.spec.key_size for layer in editor.hparams.layers)


def test_forty_sequential_edits_keep_the_first_batch_and_reset_exactly(editor, records):
    original = {name: p.detach().clone() for name, p in editor.model.named_parameters()}
    requests = as_edit_requests(records[:40], batch_size=20)
    result = editor.edit(requests, batch_size=20)
    assert editor.forward_mode == "prefix_cache"  # the fast path, on the installed transformers
    assert [b.num_edits for b in result.batches] == [20, 20]
    first = _efficacy(editor, records[:20])
    print(f"first-batch efficacy after 40 edits: {first:.1f}; {result.seconds:.0f}s")
    assert first >= 90
    editor.reset()
    assert all(torch.equal(p, original[name]) for name, p in editor.model.named_parameters())
