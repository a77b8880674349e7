"""Real edits on the embedded SmolLM2-135M-Instruct with wikitext-2 key statistics (slow: minutes on 2 cores)."""

from __future__ import annotations

import json

import pytest
import torch

from hf_alphaedit import AlphaEditModel, EditingArguments
from hf_alphaedit.requests import as_edit_requests

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def records(shared_data) -> list[dict]:
    return json.loads((shared_data / "counterfact" / "counterfact-edit.json").read_text())[:60]


@pytest.fixture()
def editor(smollm2, shared_data, tmp_path_factory):
    """A SmolLM2 editor; the shared model's weights are restored afterwards."""
    model, tokenizer = smollm2
    original = {k: v.clone() for k, v in model.state_dict().items()}
    args = EditingArguments(statistics_corpus=str(shared_data / "wikitext-2" / "valid.txt"),
                            statistics_samples=1000, disable_tqdm=True,
                            statistics_cache_dir=str(tmp_path_factory.getbasetemp() / "smollm2-statistics"))
    yield AlphaEditModel(model, tokenizer, args)
    model.load_state_dict(original)


def _efficacy(editor: AlphaEditModel, records: list[dict]) -> float:
    """Share of records whose new target is more probable than the true one on the rewrite prompt (§10.2)."""
    tokenizer, model = editor.tokenizer, editor.model
    wins = 0
    for record in records:
        prompt = tokenizer(record["prompt"])["input_ids"]
        nll = []
        for target in (record["target_new"], record["ground_truth"]):
            ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                log_probs = torch.log_softmax(model(torch.tensor([prompt + ids])).logits[0].float(), -1)
            nll.append(-sum(log_probs[len(prompt) - 1 + j, t] for j, t in enumerate(ids)) / len(ids))
        wins += int(nll[0] < nll[1])
    return 100.0 * wins / len(records)


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


def test_sixty_sequential_edits_keep_the_first_batch(editor, records):
    requests = as_edit_requests(records, batch_size=20)
    result = editor.edit(requests, batch_size=20)
    assert [b.num_edits for b in result.batches] == [20, 20, 20]
    first = _efficacy(editor, records[:20])
    print(f"first-batch efficacy after 60 edits: {first:.1f}; {result.seconds:.0f}s")
    assert first >= 90
