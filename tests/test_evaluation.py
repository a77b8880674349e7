"""The batched scorer against a naive per-pair loop, the runner on tiny models, and one real SmolLM2 run."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from hf_alphaedit.evaluation import (
    encode_prompt,
    encode_target,
    evaluate_edits,
    evaluate_general,
    generate_texts,
    score_continuations,
)
from hf_alphaedit.evaluation.scorer import leading_special_ids
from tests.naive_scoring import naive_scores
from tests.tiny_models import tiny_causal_lm, tiny_tokenizer

PROMPTS = ["The small robot in our lab speaks", "Paris is the capital of", "The Eiffel Tower is in",
           "In the year of"]
TARGETS = ["English", "France", "the city of Rome", "the"]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "opt"])
def test_batched_scorer_equals_a_naive_loop(family):
    model, tokenizer = tiny_causal_lm(family), tiny_tokenizer()
    pairs = [(encode_prompt(tokenizer, p), encode_target(tokenizer, t)) for p in PROMPTS for t in TARGETS]
    # A small token budget forces several padded batches of different widths.
    scores = score_continuations(model, pairs, pad_id=tokenizer.pad_token_id, batch_tokens=40)
    nll, correct = naive_scores(model, pairs)
    assert [s.nll for s in scores] == pytest.approx(nll, abs=1e-5)
    assert [s.token_correct for s in scores] == correct


def test_single_token_options_share_one_row_and_keep_their_own_scores():
    model, tokenizer = tiny_causal_lm("llama"), tiny_tokenizer()
    prompt = encode_prompt(tokenizer, "Is this sentence acceptable? Answer:")
    options = [encode_target(tokenizer, option) for option in ("the", "of")]
    assert all(len(option) == 1 for option in options)
    scores = score_continuations(model, [(prompt, option) for option in options], pad_id=0)
    assert [s.nll for s in scores] == pytest.approx(naive_scores(model, [(prompt, o) for o in options])[0], abs=1e-5)
    assert scores[0].nll != scores[1].nll


def test_bos_is_detected_from_the_tokenizer_and_kept_out_of_targets():
    plain = tiny_tokenizer()
    assert leading_special_ids(plain) == ()
    backend = plain.backend_tokenizer.__class__.from_str(plain.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[
        ("<|endoftext|>", 0)])
    with_bos = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                       pad_token="<|endoftext|>")
    assert leading_special_ids(with_bos) == (0,)
    assert encode_prompt(with_bos, "Paris is") == [0] + plain("Paris is")["input_ids"]
    assert encode_target(with_bos, "France") == plain(" France")["input_ids"]


def _flat_records(shared_data, count):
    return json.loads((shared_data / "counterfact" / "counterfact-edit.json").read_text())[:count]


def test_counterfact_runner_matches_per_record_scores_and_loads_through_datasets(shared_data):
    model, tokenizer = tiny_causal_lm("qwen2"), tiny_tokenizer()
    path = shared_data / "counterfact" / "counterfact-edit.json"
    result = evaluate_edits(model, tokenizer, path, limit=6, per_record=True, show_progress=False)
    assert result["num_records"] == 6
    records = _flat_records(shared_data, 6)
    for record, details in zip(records, result["records"], strict=True):
        pairs = [(encode_prompt(tokenizer, record["prompt"]), encode_target(tokenizer, record[key]))
                 for key in ("target_new", "ground_truth")]
        nll, _ = naive_scores(model, pairs)
        assert details["rewrite_new_nll"] + details["rewrite_true_nll"] == pytest.approx(nll, abs=1e-5)
    wins = [d["rewrite_true_nll"][0] > d["rewrite_new_nll"][0] for d in result["records"]]
    assert result["efficacy"] == pytest.approx(100 * sum(wins) / 6)
    assert result["score"] <= max(result["efficacy"], result["generalization"], result["specificity"])


def _boost_token(model, token_id, amount=100.0):
    """Make `token_id` the argmax continuation at every position (a hook on the model's LM head)."""
    head = model.get_output_embeddings()

    def hook(_module, _inputs, logits):
        boosted = logits.clone()
        boosted[..., token_id] += amount
        return boosted

    return head.register_forward_hook(hook)


def test_new_target_as_argmax_gives_full_success_and_accuracy(shared_data):
    """ALGORITHMS.md §15: where the new target is the argmax continuation, rewrite success and teacher-forced
    accuracy are 1 (CounterFact and ZsRE alike)."""
    model, tokenizer = tiny_causal_lm("llama"), tiny_tokenizer()
    (token_id,) = encode_target(tokenizer, "the")
    records = [dict(r, target_new="the") for r in _flat_records(shared_data, 3)]
    zsre = json.loads((shared_data / "zsre" / "zsre_mend_train-1k.json").read_text())[:3]
    zsre = [dict(r, answers=["the"]) for r in zsre]
    handle = _boost_token(model, token_id)
    try:
        counterfact = evaluate_edits(model, tokenizer, records)
        zsre_result = evaluate_edits(model, tokenizer, zsre)
    finally:
        handle.remove()
    assert counterfact["efficacy"] == 100 and counterfact["rewrite_acc"] == 100
    assert counterfact["generalization"] == 100 and counterfact["specificity"] == 0
    assert zsre_result["zsre_efficacy"] == 100 and zsre_result["zsre_generalization"] == 100


def test_zsre_token_accuracy_uses_the_questions_with_a_question_mark_for_nq(shared_data):
    model, tokenizer = tiny_causal_lm("gpt2"), tiny_tokenizer()
    record = json.loads((shared_data / "zsre" / "zsre_mend_train-1k.json").read_text())[0]
    result = evaluate_edits(model, tokenizer, [record], per_record=True)
    (details,) = result["records"]
    pairs = [(encode_prompt(tokenizer, record["loc"] + "?"), encode_target(tokenizer, record["loc_ans"]))]
    assert details["neighborhood_correct"] == list(naive_scores(model, pairs)[1][0])
    expected = 100 * sum(details["neighborhood_correct"]) / len(details["neighborhood_correct"])
    assert result["zsre_specificity"] == pytest.approx(expected)
    assert "efficacy" not in result


def test_baseline_results_are_reported_under_pre(shared_data):
    model, tokenizer = tiny_causal_lm("llama"), tiny_tokenizer()
    records = _flat_records(shared_data, 2)
    pre = evaluate_edits(model, tokenizer, records)
    post = evaluate_edits(model, tokenizer, records, baseline=pre)
    assert post["pre"]["efficacy"] == pre["efficacy"] and "pre" not in post["pre"]


def test_records_without_a_true_target_cannot_be_read_as_counterfact():
    model, tokenizer = tiny_causal_lm("llama"), tiny_tokenizer()
    request = {"prompt": "{} is in", "subject": "Paris", "target_new": "Rome"}
    with pytest.raises(ValueError, match="target_true"):
        evaluate_edits(model, tokenizer, [request], kind="counterfact")


def test_generation_is_seeded_and_feeds_fluency(shared_data):
    model, tokenizer = tiny_causal_lm("llama"), tiny_tokenizer()
    prompts = ["Paris is the capital of", "The"]
    first = generate_texts(model, tokenizer, prompts, max_length=12, seed=3)
    assert first == generate_texts(model, tokenizer, prompts, max_length=12, seed=3)
    assert all(text.startswith(prompt) for text, prompt in zip(first, prompts, strict=True))
    greedy = [generate_texts(model, tokenizer, prompts, max_length=12, do_sample=False, seed=s) for s in (1, 2)]
    assert greedy[0] == greedy[1] and greedy[0] != first
    result = evaluate_edits(model, tokenizer, _flat_records(shared_data, 2), generation=True,
                            max_generation_records=1, generation_length=48)
    assert result["fluency"] > 0 and result["fluency_std"] == 0


def test_general_suite_scores_every_task_and_reference_compat_inverts_rte(shared_data):
    model, tokenizer = tiny_causal_lm("llama"), tiny_tokenizer()
    general = shared_data / "general"
    result = evaluate_general(model, tokenizer, general, num_examples=6)
    assert set(result) == {"sst2", "mrpc", "cola", "rte", "nli", "mmlu", "sentiment_analysis", "dialogue",
                           "average"}
    assert all(result[t]["total"] == 6 for t in result if t != "average")
    compat = evaluate_general(model, tokenizer, general, tasks=["rte"], num_examples=6, reference_compat=True)
    assert compat["rte"]["accuracy"] == pytest.approx(100 - result["rte"]["accuracy"])
    with pytest.raises(ValueError, match="unknown general tasks"):
        evaluate_general(model, tokenizer, general, tasks=["squad"])


@pytest.mark.slow
def test_smollm2_efficacy_moves_to_90_after_a_few_edits(smollm2_editor, shared_data):
    editor = smollm2_editor()
    model = editor.model
    records = _flat_records(shared_data, 8)
    editor.edit(records, batch_size=8)
    edited = {k: v.clone() for k, v in model.state_dict().items()}
    result = editor.evaluate(records, baseline=True, show_progress=False)
    print({k: (result["pre"][k], result[k]) for k in ("efficacy", "generalization", "specificity")})
    assert result["efficacy"] >= 90 > result["pre"]["efficacy"]
    assert editor.last_evaluation is result
    # The baseline pass subtracted the edits temporarily; the edited weights are back bit for bit.
    assert all(torch.equal(edited[k], v) for k, v in model.state_dict().items())
