"""Real edits on the embedded SmolLM2-135M-Instruct with wikitext-2 key statistics (slow: minutes on 2 cores)."""

from __future__ import annotations

import json

import pytest
import torch

from hf_alphaedit import AlphaEditModel
from tests.naive_scoring import rewrite_log_probs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def records(shared_data) -> list[dict]:
    return json.loads((shared_data / "counterfact" / "counterfact-edit.json").read_text())[:16]


@pytest.fixture()
def editor(smollm2_editor) -> AlphaEditModel:
    return smollm2_editor()


def _efficacy(editor: AlphaEditModel, records: list[dict]) -> float:
    """Share of records whose new target is more probable than the true one on the rewrite prompt (§10.2)."""
    new, true = (rewrite_log_probs(editor.model, editor.tokenizer, records, field)
                 for field in ("target_new", "ground_truth"))
    return 100.0 * (new > true).float().mean().item()


def test_two_sequential_batches_write_only_the_edited_layers_keep_the_first_batch_and_reset_exactly(editor, records):
    first, second = records[:8], records[8:]
    original = {name: p.detach().clone() for name, p in editor.model.named_parameters()}
    before = _efficacy(editor, first)
    result = editor.edit(first, batch_size=8)
    assert editor.forward_mode == "prefix_cache"  # the fast path, on the installed transformers
    after = _efficacy(editor, first)
    print(f"first batch: efficacy {before:.1f} -> {after:.1f}; {result.seconds:.0f}s; "
          f"steps {result.batches[0].target_steps}")
    assert before < 60 and after >= 95
    changed = {name for name, p in editor.model.named_parameters() if not torch.equal(p, original[name])}
    assert changed == {f"{editor.spec.rewrite_module_name(layer)}.weight" for layer in editor.hparams.layers}
    projector = editor.projector
    assert all(0 < projector.null_space_dim(layer) < editor.spec.key_size for layer in editor.hparams.layers)

    result = editor.edit(second, batch_size=8)
    assert [b.num_edits for b in result.batches] == [8]
    kept = _efficacy(editor, first)
    print(f"first-batch efficacy after {len(records)} edits: {kept:.1f}; {result.seconds:.0f}s")
    assert kept >= 87.5  # at most one of the first eight lost to the second batch
    editor.reset()
    assert all(torch.equal(p, original[name]) for name, p in editor.model.named_parameters())
