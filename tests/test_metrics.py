"""The shipped `evaluate` modules on hand-built scores with known answers, and the pure metric arithmetic."""

from __future__ import annotations

import math

import pytest
import yaml

from hf_alphaedit.metrics import METRIC_NAMES, load_metric, metric_path
from hf_alphaedit.metrics.summaries import (
    harmonic_mean,
    live_match,
    matthews_correlation,
    ngram_entropy,
    normalize_answer,
    weighted_f1,
    word_tokenize,
)


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_every_metric_loads_offline_by_path_with_a_space_ready_card(name):
    import evaluate

    module = evaluate.load(metric_path(name))
    assert module.name == name and module.citation and module.features
    readme = (metric_path(name) + "/README.md")
    front_matter = yaml.safe_load(open(readme, encoding="utf-8").read().split("---")[1])
    assert front_matter["sdk"] == "gradio" and "metric" in front_matter["tags"] and front_matter["title"]


def test_efficacy_averages_per_record_then_over_records():
    # Record 1: one of two prompts succeeds (0.5); record 2: its only prompt succeeds (1.0).
    result = load_metric("efficacy").compute(new_target_nll=[[1.0, 2.0], [3.0]], true_target_nll=[[2.0, 1.0], [4.0]])
    assert result["efficacy"] == pytest.approx(75.0)
    assert result["efficacy_std"] == pytest.approx(25.0)
    first = ((math.exp(-1) - math.exp(-2)) + (math.exp(-2) - math.exp(-1))) / 2
    second = math.exp(-3) - math.exp(-4)
    assert result["efficacy_magnitude"] == pytest.approx(100 * (first + second) / 2)


def test_one_number_per_record_is_accepted():
    result = load_metric("generalization").compute(new_target_nll=[1.0, 3.0], true_target_nll=[2.0, 2.0])
    assert result["generalization"] == pytest.approx(50.0)


def test_specificity_wants_the_true_target_to_win():
    result = load_metric("specificity").compute(new_target_nll=[3.0, 1.0], true_target_nll=[1.0, 1.0])
    # A tie is no success, as in the reference's strict comparison.
    assert result["specificity"] == pytest.approx(50.0)
    assert result["specificity_magnitude"] == pytest.approx(100 * (math.exp(-1) - math.exp(-3)) / 2)


def test_knowledge_editing_combines_the_three_and_the_harmonic_score():
    columns = {"rewrite_new_nll": [1.0, 1.0], "rewrite_true_nll": [2.0, 2.0],
               "paraphrase_new_nll": [1.0, 3.0], "paraphrase_true_nll": [2.0, 2.0],
               "neighborhood_new_nll": [3.0, 3.0], "neighborhood_true_nll": [1.0, 4.0]}
    result = load_metric("knowledge_editing").compute(**columns)
    assert (result["efficacy"], result["generalization"], result["specificity"]) == pytest.approx((100, 50, 50))
    assert result["score"] == pytest.approx(3 / (1 / 100 + 1 / 50 + 1 / 50))


def test_zsre_accuracy_is_token_accuracy_per_record():
    result = load_metric("zsre_accuracy").compute(rewrite_correct=[[True, False], [True]],
                                                  paraphrase_correct=[[False, False, True], [True]],
                                                  neighborhood_correct=[[True], [False]])
    assert result["efficacy"] == pytest.approx(75.0)
    assert result["generalization"] == pytest.approx(100 * (1 / 3 + 1) / 2)
    assert result["specificity"] == pytest.approx(50.0) and result["specificity_std"] == pytest.approx(50.0)


def test_live_accuracy_normalises_case_punctuation_and_articles():
    assert normalize_answer("  The U.S.  Army's ") == "u s army s"
    assert live_match("rome, of course", "Rome")
    assert live_match("The Rome!", "rome")  # articles and punctuation on either side do not count
    assert not live_match("Romania", "Rome")  # whole words only
    assert not live_match("the capital is Rome", "Rome")
    assert live_match("the capital is Rome", "Rome", match="contains")
    assert not live_match("the capital is Romeo", "Rome", match="contains")
    assert live_match("New York City", "new york") and not live_match("New", "New York")
    assert live_match("The end", "The") and not live_match("end", "The")  # an all-article answer keeps them
    assert not live_match("?", "?")  # nothing left to compare: never a success
    with pytest.raises(ValueError, match="match="):
        live_match("Rome", "Rome", match="exact")


def test_live_accuracy_module_averages_per_record_then_over_records():
    module = load_metric("live_accuracy")
    result = module.compute(predictions=[["Rome, the capital", "Paris"], ["Berlin"]], references=["Rome", "Berlin"])
    assert result["live_accuracy"] == pytest.approx(75.0) and result["live_accuracy_std"] == pytest.approx(25.0)
    one_each = module.compute(predictions=["in Rome", "Berlin"], references=["Rome", "Berlin"], match="contains")
    assert one_each["live_accuracy"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="predictions"):
        module.compute(predictions=[["Rome"]], references=None)


def test_fluency_known_value_and_repetition_scores_zero():
    # "a b c d": three distinct bigrams (H2 = log2 3) and two trigrams (H3 = 1).
    expected = 100 * (2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2
    result = load_metric("fluency").compute(texts=[["a b c d", "a b c d"]])
    assert result["fluency"] == pytest.approx(expected)
    assert ngram_entropy("word word word word word") == 0.0
    assert ngram_entropy("hello world") == 0.0


def test_word_tokenize_splits_punctuation_and_contractions():
    assert word_tokenize("Paris isn't in Italy, it's in France.") == [
        "Paris", "is", "n't", "in", "Italy", ",", "it", "'s", "in", "France", "."]


def test_word_tokenize_differs_from_nltk_only_where_the_fluency_card_says():
    """Runs where NLTK is installed (it is not a dependency): plain text is split alike; the differences are the
    ones the fluency metric card lists."""
    nltk_tokenize = pytest.importorskip("nltk.tokenize").NLTKWordTokenizer().tokenize
    for text in ("Paris isn't in Italy, it's in France.", "A small library edits facts, one batch at a time.",
                 "He said (twice) that we can't -- and won't -- stop!"):
        assert word_tokenize(text) == nltk_tokenize(text)
    assert (word_tokenize('say "hi"'), nltk_tokenize('say "hi"')) == (["say", '"', "hi", '"'], ["say", "``", "hi", "''"])
    assert (word_tokenize("U.S. Highway"), nltk_tokenize("U.S. Highway")) == (["U.S", ".", "Highway"], ["U.S.", "Highway"])
    assert (word_tokenize("at 5:30"), nltk_tokenize("at 5:30")) == (["at", "5", ":", "30"], ["at", "5:30"])


def test_bad_input_names_the_columns_and_the_fix():
    with pytest.raises(ValueError, match="new_target_nll.*one list of numbers"):
        load_metric("efficacy").compute(new_target_nll=["high"], true_target_nll=[1.0])
    with pytest.raises(ValueError, match="same number of records"):
        load_metric("efficacy").compute(new_target_nll=[[1.0, 2.0]], true_target_nll=[[1.0]])
    with pytest.raises(ValueError, match=r"missing input column\(s\) \['true_target_nll'\]"):
        load_metric("efficacy").compute(new_target_nll=[[1.0]])


def test_unknown_metric_name_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="efficacy"):
        metric_path("bleu")


def test_harmonic_mean_weighted_f1_and_mcc():
    assert harmonic_mean([100.0, 50.0, 0.0]) == 0.0
    labels, predictions = [0, 0, 1, 1], [0, 1, 1, -1]
    # class 0: precision 1, recall 1/2 -> F1 2/3; class 1: precision 1/2, recall 1/2 -> F1 1/2; equal support.
    assert weighted_f1(labels, predictions) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert matthews_correlation([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert matthews_correlation([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert matthews_correlation([0, 1], [1, 1]) == 0.0


def test_a_metric_pushed_as_a_space_loads_with_evaluate_and_its_app_computes(
        hub_api, unique_repo_id, fresh_hf_cache, monkeypatch, tmp_path):
    """push_metric_to_hub → `evaluate.load("ns/name")` from the Space, and the Space's generated Gradio app
    driven with gradio_client returns what the module computes (bad input: the app's error, not a crash)."""
    import json

    import evaluate
    from gradio_client import Client
    from huggingface_hub import snapshot_download

    from hf_alphaedit.metrics import METRIC_EXAMPLES, push_metric_to_hub
    from tests.load_module import load_module

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("HF_UPDATE_DOWNLOAD_COUNTS", "false")
    repo_id = unique_repo_id("knowledge-editing")
    push_metric_to_hub("knowledge_editing", repo_id)
    files = set(hub_api.list_repo_files(repo_id, repo_type="space"))
    assert {f"{repo_id.split('/')[1]}.py", "README.md", "app.py", "requirements.txt"} <= files
    card = yaml.safe_load(hub_api.space_info(repo_id).card_data.to_yaml())
    assert card["sdk"] == "gradio" and card["app_file"] == "app.py"

    example = METRIC_EXAMPLES["knowledge_editing"]
    expected = load_metric("knowledge_editing").compute(**example)
    assert evaluate.load(repo_id).compute(**example) == expected

    folder = snapshot_download(repo_id, repo_type="space", local_dir=tmp_path / "space")
    app = load_module(f"{folder}/app.py", "metric_space_app")
    _, url, _ = app.demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False)
        assert client.predict(json.dumps(example), api_name="/compute") == pytest.approx(expected)
        with pytest.raises(Exception, match=r"missing input column\(s\) \['rewrite_true_nll'"):
            client.predict(json.dumps({**example, "rewrite_true_nll": None}), api_name="/compute")
    finally:
        app.demo.close()
