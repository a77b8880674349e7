"""Pure metric arithmetic on scores (no model, no torch): what the `evaluate` modules in `hf_alphaedit/metrics/`
compute, kept in one place so that the modules and the runner cannot drift apart.

Conventions of the reference summariser (ALGORITHMS.md §10.5): one value per record (the mean over the record's
prompts of one kind), then the mean and the population standard deviation over records, both × 100.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

import numpy as np

# Weights of the bigram and trigram entropies in the reference's fluency (`ngram_entropy`, §10.3).
NGRAM_WEIGHTS = {2: 2 / 3, 3: 4 / 3}

PerRecord = Sequence[float] | Sequence[Sequence[float]]


def per_record_values(values: PerRecord) -> list[list[float]]:
    """Normalise one-value-per-record input (a number, or a list for records with several prompts) to lists."""
    return [list(v) if isinstance(v, Sequence | np.ndarray) else [v] for v in values]


def mean_std_percent(values: Sequence[float]) -> tuple[float, float]:
    """`(mean × 100, population std × 100)` of per-record values; NaN for no records."""
    if len(values) == 0:
        return math.nan, math.nan
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean() * 100), float(array.std() * 100)


def probability_comparison(new_target_nll: PerRecord, true_target_nll: PerRecord, *,
                           new_should_win: bool) -> dict[str, float]:
    """Success rate and magnitude of a CounterFact prompt kind (§10.2) from per-token mean NLLs.

    Per prompt, success is `NLL_true > NLL_new` when the new target should win (rewrite, paraphrase) and
    `NLL_true < NLL_new` otherwise (neighborhood); magnitude is the winner's minus the loser's geometric-mean token
    probability `exp(−NLL)`. Both are averaged per record, then summarised over records in percent.
    Returns `success`, `success_std`, `magnitude`, `magnitude_std`.
    """
    new, true = per_record_values(new_target_nll), per_record_values(true_target_nll)
    if len(new) != len(true) or any(len(a) != len(b) for a, b in zip(new, true, strict=False)):
        raise ValueError("new_target_nll and true_target_nll need the same number of records and of prompts per "
                         "record")
    if any(len(a) == 0 for a in new):
        raise ValueError("every record needs at least one prompt score; drop records without prompts of this kind")
    sign = 1.0 if new_should_win else -1.0
    success, magnitude = [], []
    for record_new, record_true in zip(new, true, strict=True):
        n, t = np.asarray(record_new, dtype=np.float64), np.asarray(record_true, dtype=np.float64)
        success.append(float(np.mean(sign * (t - n) > 0)))
        magnitude.append(float(np.mean(sign * (np.exp(-n) - np.exp(-t)))))
    success_mean, success_std = mean_std_percent(success)
    magnitude_mean, magnitude_std = mean_std_percent(magnitude)
    return {"success": success_mean, "success_std": success_std,
            "magnitude": magnitude_mean, "magnitude_std": magnitude_std}


def token_accuracy(token_correct: Sequence[Sequence[bool]]) -> tuple[float, float]:
    """ZsRE accuracy (§10.4): per record the share of target tokens predicted correctly under teacher forcing,
    then `(mean × 100, std × 100)` over records."""
    if any(len(flags) == 0 for flags in token_correct):
        raise ValueError("every record needs at least one token flag; a target always has one token or more")
    return mean_std_percent([float(np.mean(np.asarray(flags, dtype=np.float64))) for flags in token_correct])


def harmonic_mean(values: Sequence[float]) -> float:
    """The summariser's `score`: harmonic mean of efficacy, generalization and specificity (0 if any is 0)."""
    if any(math.isnan(v) for v in values):
        return math.nan
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


ARTICLES = frozenset({"a", "an", "the"})


def normalize_answer(text: str, *, drop_articles: bool = True) -> str:
    """An answer in comparable form: NFKC, lower case, every punctuation and control character (Unicode categories
    P and C) replaced by a space, the articles "a", "an", "the" removed as words (unless `drop_articles` is
    False), whitespace collapsed. `"The U.S."` → `"u s"`."""
    text = unicodedata.normalize("NFKC", text).lower()
    words = "".join(" " if unicodedata.category(c)[0] in "PC" else c for c in text).split()
    return " ".join(w for w in words if not (drop_articles and w in ARTICLES))


def live_match(continuation: str, answer: str, match: str = "prefix") -> bool:
    """Whether a generated `continuation` gives `answer` (the `live_accuracy` metric card's rule).

    Both are normalised by `normalize_answer` (articles are kept on both sides when the answer is nothing but
    articles); `match="prefix"`: the continuation's words start with the answer's words; `"contains"`: the
    answer's words occur consecutively anywhere in it. An answer that normalises to nothing never matches.
    """
    if match not in ("prefix", "contains"):
        raise ValueError(f"match={match!r}: choose 'prefix' or 'contains'")
    drop = bool(normalize_answer(answer))
    expected, produced = normalize_answer(answer, drop_articles=drop), normalize_answer(continuation, drop_articles=drop)
    if not expected:
        return False
    if match == "prefix":
        return produced == expected or produced.startswith(expected + " ")
    return f" {expected} " in f" {produced} "


def live_accuracy(continuations: Sequence[str] | Sequence[Sequence[str]], answers: Sequence[str],
                  match: str = "prefix") -> tuple[float, float]:
    """Live-decoding success: per record the share of its continuations that give its answer (`live_match`), then
    `(mean × 100, population std × 100)` over records."""
    per_record = [[texts] if isinstance(texts, str) else list(texts) for texts in continuations]
    if len(per_record) != len(answers):
        raise ValueError(f"{len(per_record)} records of continuations but {len(answers)} answers; give one answer "
                         "per record")
    if any(not texts for texts in per_record):
        raise ValueError("every record needs at least one generated continuation")
    return mean_std_percent([float(np.mean([live_match(text, answer, match) for text in texts]))
                             for texts, answer in zip(per_record, answers, strict=True)])


# A regular-expression version of NLTK's Treebank word tokenisation (which the reference calls through
# `word_tokenize`), so fluency needs no NLTK data download: contractions and punctuation become separate words.
_WORD_PATTERN = re.compile(
    r"(?i:n't)\b|'(?:s|m|d|ll|re|ve)\b|\w+(?=n't\b)|\w+(?:[-.]\w+)*|\.\.\.|--|``|''|[^\w\s]"
)


def word_tokenize(text: str) -> list[str]:
    """Split text into words and punctuation, approximately as NLTK's `word_tokenize` does.

    Where it differs (the fluency metric card has the measured effect): NLTK writes double quotes as `` and '',
    keeps abbreviations with their periods (`U.S.`), digits around a colon (`5:30`), URLs and apostrophes inside
    words that are not contractions (`d'Italia`) whole; here they are split.
    """
    return _WORD_PATTERN.findall(text)


def ngram_entropy(text: str) -> float:
    """The reference's fluency of one text (§10.3): `Σ_n w_n H_n / 2` over n ∈ {2, 3} with weights 2/3 and 4/3,
    `H_n` the entropy (bits) of the text's n-gram frequency distribution."""
    words = word_tokenize(text)
    entropies = []
    for n, weight in NGRAM_WEIGHTS.items():
        counts = np.asarray(list(Counter(zip(*(words[i:] for i in range(n)), strict=False)).values()),
                            dtype=np.float64)
        frequencies = counts / counts.sum() if counts.size else counts
        entropies.append(weight * float(-(frequencies * np.log2(frequencies)).sum()))
    return float(np.mean(entropies))


def fluency(texts_per_record: Sequence[str] | Sequence[Sequence[str]]) -> tuple[float, float]:
    """`(mean × 100, std × 100)` over records of the mean `ngram_entropy` of each record's generated texts."""
    per_record = [[texts] if isinstance(texts, str) else list(texts) for texts in texts_per_record]
    if any(not texts for texts in per_record):
        raise ValueError("every record needs at least one generated text")
    return mean_std_percent([float(np.mean([ngram_entropy(t) for t in texts])) for texts in per_record])


def weighted_f1(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """F1 per true class weighted by the class's support (scikit-learn's `average="weighted"`); predictions
    outside the label set (invalid, −1) count as wrong."""
    labels_array, predicted = np.asarray(labels), np.asarray(predictions)
    total = 0.0
    for label in np.unique(labels_array):
        true_positive = float(np.sum((predicted == label) & (labels_array == label)))
        predicted_count, support = float(np.sum(predicted == label)), float(np.sum(labels_array == label))
        denominator = predicted_count + support
        total += support * (2 * true_positive / denominator if denominator else 0.0)
    return total / len(labels_array) if len(labels_array) else math.nan


def matthews_correlation(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """Multi-class Matthews correlation coefficient (scikit-learn's definition; 0 when undefined)."""
    classes = sorted(set(labels) | set(predictions))
    index = {c: i for i, c in enumerate(classes)}
    confusion = np.zeros((len(classes), len(classes)))
    for label, prediction in zip(labels, predictions, strict=True):
        confusion[index[label], index[prediction]] += 1
    true_counts, predicted_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    samples, correct = confusion.sum(), np.trace(confusion)
    numerator = correct * samples - true_counts @ predicted_counts
    denominator = math.sqrt((samples**2 - predicted_counts @ predicted_counts) *
                            (samples**2 - true_counts @ true_counts))
    return float(numerator / denominator) if denominator else 0.0
