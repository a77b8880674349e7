"""The batched scorer and decoder against naive loops, the runner (teacher-forced, live, fluency, protocol cards) on
tiny models, and one real SmolLM2 run."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

import hf_alphaedit
from hf_alphaedit.evaluation import (
    REFERENCE_SAMPLING,
    LiveDecoding,
    Sampling,
    decode,
    encode_prompt,
    encode_target,
    evaluate_edits,
    evaluate_general,
    generate_texts,
    score_continuations,
    summarize_record_scores,
)
from hf_alphaedit.evaluation.scorer import leading_special_ids
from hf_alphaedit.fingerprint import weights_sha256
from tests.naive_scoring import naive_greedy, naive_scores
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


def test_a_part_of_the_per_record_scores_summarises_to_what_the_runner_reports_on_that_part_alone(shared_data):
    """`summarize_record_scores` on one batch's records (the benchmark's per-batch retention) gives the numbers
    `evaluate_edits` gives on those records alone, for CounterFact and ZsRE in one list."""
    model, tokenizer = tiny_causal_lm("llama"), tiny_tokenizer()
    counterfact = _flat_records(shared_data, 8)
    zsre = json.loads((shared_data / "zsre" / "zsre_mend_train-1k.json").read_text())[:4]
    whole = evaluate_edits(model, tokenizer, counterfact + zsre, per_record=True)
    summary = summarize_record_scores(whole["records"])
    names = ["efficacy", "generalization", "specificity", "score", "zsre_efficacy", "zsre_specificity"]
    assert summary["num_records"] == 12 and {name: summary[name] for name in names} == {
        name: whole[name] for name in names}
    by_case = {d["case_id"]: d for d in whole["records"] if d["kind"] == "counterfact"}
    part = [by_case[r["case_id"]] for r in counterfact[5:]]
    alone = evaluate_edits(model, tokenizer, counterfact[5:])
    summary = summarize_record_scores(part)
    for name in ("efficacy", "generalization", "specificity", "specificity_magnitude", "score"):
        assert summary[name] == pytest.approx(alone[name], abs=1e-9), name
    assert "zsre_efficacy" not in summary
    assert summary["efficacy"] != whole["efficacy"] or summary["specificity"] != whole["specificity"]
    with pytest.raises(ValueError, match="records: no per-record scores"):
        summarize_record_scores([])
    with pytest.raises(ValueError, match="kind 'counterfact' or 'zsre'"):
        summarize_record_scores([{"case_id": 1}])


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
        counterfact = evaluate_edits(model, tokenizer, records, live=True)
        zsre_result = evaluate_edits(model, tokenizer, zsre, live=True)
    finally:
        handle.remove()
    assert counterfact["efficacy"] == 100 and counterfact["rewrite_acc"] == 100
    assert counterfact["generalization"] == 100 and counterfact["specificity"] == 0
    assert zsre_result["zsre_efficacy"] == 100 and zsre_result["zsre_generalization"] == 100
    # It also generates "the the the ...", which starts with the target: live success, and no true answer.
    assert counterfact["live_efficacy"] == 100 and counterfact["live_specificity"] == 0
    assert zsre_result["zsre_live_efficacy"] == 100 and zsre_result["zsre_live_specificity"] == 0


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


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "opt", "gptj", "falcon"])
def test_batched_greedy_decoding_equals_a_naive_loop(family):
    """Left padding, position ids, the KV cache and per-row budgets change nothing (several batches of
    different widths; the Gemma-2 prompts are longer than its sliding window)."""
    model, tokenizer = tiny_causal_lm(family), tiny_tokenizer()
    prompts = [encode_prompt(tokenizer, p) for p in PROMPTS + [" ".join(PROMPTS)]]
    budgets = [5, 1, 7, 3, 6]
    new = decode(model, prompts, budgets, pad_id=tokenizer.pad_token_id, batch_tokens=60)
    assert new == [naive_greedy(model, p, b) for p, b in zip(prompts, budgets, strict=True)]


def test_sampler_draws_from_the_top_k_only_and_is_seeded():
    model, tokenizer = tiny_causal_lm("llama"), tiny_tokenizer()
    prompts = [encode_prompt(tokenizer, p) for p in PROMPTS]
    sampling = Sampling(top_k=3, seed=7)
    new = decode(model, prompts, [6] * len(prompts), pad_id=0, sampling=sampling)
    assert new == decode(model, prompts, [6] * len(prompts), pad_id=0, sampling=sampling)
    assert new != decode(model, prompts, [6] * len(prompts), pad_id=0, sampling=Sampling(top_k=3, seed=8))
    assert decode(model, prompts, [6] * 4, pad_id=0, sampling=Sampling(top_k=1, seed=3)) == decode(
        model, prompts, [6] * 4, pad_id=0)
    with torch.no_grad():
        for prompt, tokens in zip(prompts, new, strict=True):
            logits = model(torch.tensor([prompt + tokens])).logits[0]
            for step, token in enumerate(tokens):
                assert token in logits[len(prompt) + step - 1].topk(3).indices.tolist()
    with pytest.raises(ValueError, match="top_k"):
        Sampling(top_k=0)


def test_decoding_time_bound_keeps_the_first_token_and_refuses_non_positive_seconds():
    """`max_seconds` (the Space's answer bound) stops a batch after the token that passes it, like transformers'
    `max_time`: a bound no step can meet leaves one token per row, a prefix of the unbounded decoding."""
    model, tokenizer = tiny_causal_lm("llama"), tiny_tokenizer()
    prompts = [encode_prompt(tokenizer, p) for p in PROMPTS]
    unbounded = decode(model, prompts, [6] * len(prompts), pad_id=0)
    assert decode(model, prompts, [6] * len(prompts), pad_id=0, max_seconds=1e-9) == [row[:1] for row in unbounded]
    with pytest.raises(ValueError, match="max_seconds=0"):
        decode(model, prompts, [6] * len(prompts), pad_id=0, max_seconds=0)


def test_fluency_texts_ignore_the_models_generation_config():
    """ALGORITHMS.md §10.3: top-k 5, temperature 1, no top-p, no penalty, fixed length; whatever the model's own
    generation_config says (here Llama-3-Instruct's 0.6 / 0.9 and more)."""
    from transformers import GenerationConfig

    model, tokenizer = tiny_causal_lm("llama"), tiny_tokenizer()
    prompts = ["Paris is the capital of", "The"]
    neutral = generate_texts(model, tokenizer, prompts, max_length=16, sampling=Sampling(top_k=5, seed=3))
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, top_k=50,
                                               repetition_penalty=1.5, no_repeat_ngram_size=2, max_length=8,
                                               eos_token_id=[0, 5, 6], min_new_tokens=2)
    assert generate_texts(model, tokenizer, prompts, max_length=16, sampling=Sampling(top_k=5, seed=3)) == neutral
    assert all(text.startswith(prompt) for text, prompt in zip(neutral, prompts, strict=True))


def test_fluency_sampling_runs_to_the_fixed_length_past_eos():
    model, tokenizer = tiny_causal_lm("llama"), tiny_tokenizer()
    prompt = encode_prompt(tokenizer, "Paris is the capital of")
    handle = _boost_token(model, tokenizer.eos_token_id)
    try:
        assert decode(model, [prompt], [9], pad_id=0, sampling=REFERENCE_SAMPLING) == [[tokenizer.eos_token_id] * 9]
        assert decode(model, [prompt], [9], pad_id=0, stop_ids=[tokenizer.eos_token_id]) == [[]]
    finally:
        handle.remove()


def test_generation_is_seeded_and_feeds_fluency(shared_data):
    model, tokenizer = tiny_causal_lm("llama"), tiny_tokenizer()
    result = evaluate_edits(model, tokenizer, _flat_records(shared_data, 2), generation=True,
                            max_generation_records=1, generation_length=48, seed=4)
    assert result["fluency"] > 0 and result["fluency_std"] == 0
    again = evaluate_edits(model, tokenizer, _flat_records(shared_data, 2), generation=True,
                           max_generation_records=1, generation_length=48, seed=4)
    assert again["fluency"] == result["fluency"]
    assert result["protocol"]["metric_families"]["sampled_generation"] == ["fluency"]


def _greedy_words(model, tokenizer, prompt):
    """The model's greedy continuation of `prompt` up to where its next token starts a new word."""
    tokens = decode(model, [encode_prompt(tokenizer, prompt)], [20], pad_id=0)[0]
    end = next(i for i in range(1, len(tokens)) if tokenizer.decode(tokens[i : i + 1]).startswith(" "))
    return tokenizer.decode(tokens[:end])


def test_live_metrics_score_what_the_model_generates(shared_data):
    """A target the model generates greedily is a live success (whether or not teacher forcing agrees), any
    other target a failure; neighbourhood success is the true answer still being generated."""
    model, tokenizer = tiny_causal_lm("qwen2"), tiny_tokenizer()
    records = _flat_records(shared_data, 2)
    records[0] = dict(records[0], target_new=_greedy_words(model, tokenizer, records[0]["prompt"]).upper() + ".",
                      locality_ground_truth=_greedy_words(model, tokenizer, records[0]["locality_prompt"]))
    records[1] = dict(records[1], target_new="Rome")
    result = evaluate_edits(model, tokenizer, records, live=True, per_record=True)
    assert (result["live_efficacy"], result["live_specificity"]) == (50.0, 50.0)
    assert result["records"][0]["rewrite_live"][0].startswith(records[0]["target_new"][:-1].lower().strip())
    assert "rewrite_new_nll" in result["records"][0]  # both families' details in one record entry
    families = result["protocol"]["metric_families"]
    assert "live_efficacy" in families["live_greedy"] and "efficacy" in families["teacher_forced"]
    assert result["protocol"]["live_decoding"]["match"] == "prefix"
    contains = evaluate_edits(model, tokenizer, records, live=LiveDecoding(match="contains"))
    assert contains["live_efficacy"] >= result["live_efficacy"]
    with pytest.raises(ValueError, match="LiveDecoding.match"):
        LiveDecoding(match="exact")


def test_protocol_card_names_weights_records_and_families(shared_data):
    model, tokenizer = tiny_causal_lm("llama"), tiny_tokenizer()
    path = shared_data / "counterfact" / "counterfact-edit.json"
    result = evaluate_edits(model, tokenizer, path, limit=3)
    card = result["protocol"]
    assert card["dataset"]["source"] == "counterfact-edit.json"
    assert card["dataset"]["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert card["dataset"]["records"] == [0, 3]
    assert card["model"]["weights_sha256"] == weights_sha256(model)
    assert card["package_version"] == hf_alphaedit.__version__ and card["evaluated_at"]
    assert set(card["metric_families"]) == {"teacher_forced"} and "live_decoding" not in card
    fingerprint = card["model"]["weights_sha256"]
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-7  # one element, below display precision
    assert weights_sha256(model) != fingerprint
    same_records = evaluate_edits(model, tokenizer, _flat_records(shared_data, 3))["protocol"]["dataset"]
    assert same_records["records_sha256"] == card["dataset"]["records_sha256"]


def test_pre_is_measured_on_the_unedited_weights(corpus, shared_data, tmp_path):
    """`evaluate(baseline=True)` scores the exact original weights (the engine keeps them): the same weights, bit
    for bit, and the same numbers as a freshly built copy of the base model; its protocol card says so."""
    from hf_alphaedit import AlphaEditModel, EditingArguments

    args = EditingArguments(statistics_corpus=str(corpus / "corpus.txt"), statistics_samples=60,
                            statistics_cache_dir=str(tmp_path / "stats"), disable_tqdm=True, v_num_grad_steps=8,
                            v_lr=0.5, batch_size=2)
    editor = AlphaEditModel(tiny_causal_lm("llama"), tiny_tokenizer(), args)
    records = _flat_records(shared_data, 4)
    editor.edit(records[:2])
    editor.edit(records[2:])
    result = editor.evaluate(records, baseline=True, live=True)
    fresh = evaluate_edits(tiny_causal_lm("llama"), tiny_tokenizer(), records, live=True)
    assert result["pre"]["efficacy_magnitude"] != result["efficacy_magnitude"]  # the edits did change something
    for name, value in fresh.items():
        if isinstance(value, float) and name not in ("seconds", "records_per_second"):
            assert result["pre"][name] == value, name
    pre_card, card = result["pre"]["protocol"], result["protocol"]
    assert pre_card["model"]["weights_sha256"] == fresh["protocol"]["model"]["weights_sha256"]
    assert pre_card["editing"]["num_edits"] == 0 and "exact original weights" in pre_card["editing"]["weights"]
    assert card["editing"]["num_edits"] == 4 and card["editing"]["batch_sizes"] == [2, 2]
    assert card["schedule"]["after_batch"] == 2
    assert card["model"]["weights_sha256"] != pre_card["model"]["weights_sha256"]
    with pytest.raises(ValueError, match="same weights_sha256"):
        editor.evaluate(records, baseline=dict(result, protocol=card))


def test_model_card_model_index_carries_the_protocol(corpus, shared_data, tmp_path):
    from huggingface_hub import ModelCard

    from hf_alphaedit import AlphaEditModel, EditingArguments

    args = EditingArguments(statistics_corpus=str(corpus / "corpus.txt"), statistics_samples=60,
                            statistics_cache_dir=str(tmp_path / "stats"), disable_tqdm=True, v_num_grad_steps=8,
                            v_lr=0.5)
    editor = AlphaEditModel(tiny_causal_lm("llama"), tiny_tokenizer(), args)
    path = shared_data / "counterfact" / "counterfact-edit.json"
    editor.edit(_flat_records(shared_data, 2))
    result = editor.evaluate(path, limit=2, live=True)
    card = ModelCard.load(editor.save_pretrained(tmp_path / "edited") / "README.md")
    by_metric = {r.metric_type: r for r in card.data.eval_results}
    assert by_metric["efficacy"].metric_config == "teacher_forced"
    assert by_metric["live_efficacy"].metric_config == "live_greedy"
    args_of = by_metric["live_efficacy"].metric_args
    assert args_of["weights_sha256"] == result["protocol"]["model"]["weights_sha256"]
    assert (args_of["num_edits"], args_of["records"], args_of["package_version"]) == (2, [0, 2], hf_alphaedit.__version__)
    assert by_metric["efficacy"].dataset_revision == result["protocol"]["dataset"]["file_sha256"]
    assert by_metric["efficacy"].dataset_name == "counterfact-edit.json"
    assert f"Protocol: weights `{result['protocol']['model']['weights_sha256'][:16]}…`" in card.text and str(tmp_path) not in card.text


def test_general_suite_scores_every_task_and_reference_compat_inverts_rte(shared_data):
    model, tokenizer = tiny_causal_lm("llama"), tiny_tokenizer()
    general = shared_data / "general"
    result = evaluate_general(model, tokenizer, general, num_examples=6)
    assert set(result) == {"sst2", "mrpc", "cola", "rte", "nli", "mmlu", "sentiment_analysis", "dialogue",
                           "average", "protocol"}
    assert all(result[t]["total"] == 6 for t in result if t not in ("average", "protocol"))
    card = result["protocol"]
    assert card["model"]["weights_sha256"] == weights_sha256(model) and card["dataset"]["records"] == [0, 6]
    assert card["dataset"]["file_sha256"]["rte"] == hashlib.sha256((general / "rte.json").read_bytes()).hexdigest()
    compat = evaluate_general(model, tokenizer, general, tasks=["rte"], num_examples=6, reference_compat=True)
    assert compat["rte"]["accuracy"] == pytest.approx(100 - result["rte"]["accuracy"])
    with pytest.raises(ValueError, match="unknown general tasks"):
        evaluate_general(model, tokenizer, general, tasks=["squad"])


@pytest.mark.slow
def test_smollm2_efficacy_moves_to_90_after_a_few_edits(smollm2_editor, shared_data):
    editor = smollm2_editor()
    model = editor.model
    # Four records (it took six minutes with eight on two cores): 90 still means every edit took.
    records = _flat_records(shared_data, 4)
    editor.edit(records, batch_size=4)
    edited = {k: v.clone() for k, v in model.state_dict().items()}
    result = editor.evaluate(records, baseline=True, live=True, show_progress=False)
    print({k: (result["pre"][k], result[k]) for k in ("efficacy", "generalization", "specificity", "live_efficacy",
                                                       "live_generalization", "live_specificity")})
    assert result["efficacy"] >= 90 > result["pre"]["efficacy"]
    # The model now also says the new targets itself, though less often than teacher forcing credits it.
    assert result["pre"]["live_efficacy"] < result["live_efficacy"] <= result["efficacy"]
    assert editor.last_evaluation is result
    # The baseline pass swapped the original weights in; the edited weights are back bit for bit.
    assert all(torch.equal(edited[k], v) for k, v in model.state_dict().items())
