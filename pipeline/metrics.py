"""Answer scoring: GSM8K exact match, official DROP EM/F1, Bamboogle/generic accuracy.

The DROP functions are a faithful port of AllenNLP's ``drop_eval.py``
(allenai/allennlp-reading-comprehension, ``allennlp_rc/eval/drop_eval.py``, Apache-2.0);
the only change is a built-in rectangular Hungarian solver instead of
``scipy.optimize.linear_sum_assignment`` (scipy is not a dependency).
"""

from __future__ import annotations

import re
import string
from fractions import Fraction
from typing import Any, Iterator, Mapping, Sequence, Union

import numpy as np

from pipeline import datasets
from pipeline.parsing import find_numbers

__all__ = [
    "METRIC_NAME",
    "gsm8k_em",
    "drop_em_f1",
    "get_metrics",
    "bamboogle_match",
    "normalize_text",
    "score",
    "primary_metric",
]



class _MetricNames(Mapping[str, str]):
    """``{dataset: metric}`` read from the registry (:mod:`pipeline.datasets`), so a dataset registered
    later is in it too."""

    def __getitem__(self, name: str) -> str:
        found = datasets.find(name)
        if found is None:
            raise KeyError(name)
        return found.metric

    def __iter__(self) -> Iterator[str]:
        return iter(datasets.names())

    def __len__(self) -> int:
        return len(datasets.names())

    def __repr__(self) -> str:
        return repr(dict(self))


METRIC_NAME: Mapping[str, str] = _MetricNames()

Span = Union[str, Sequence[str]]


# ------------------------------------------------------------------ GSM8K


def _to_fraction(num: str) -> Fraction | None:
    try:
        if "/" in num:
            a, b = num.split("/", 1)
            den = Fraction(b)
            return None if den == 0 else Fraction(a) / den
        return Fraction(num)
    except (ValueError, ZeroDivisionError):
        return None


def _gsm8k_value(text: str) -> Fraction | None:
    nums = find_numbers(text)
    return _to_fraction(nums[-1]) if nums else None


def gsm8k_em(predicted: str | None, gold_answers: list[str]) -> float:
    """1.0 if the last number in ``predicted`` equals a gold number, else 0.0.

    Numbers compare exactly as rationals, so "1,000", "$1000.00", "1000 apples" and "1000"
    all match 1000, and "1/2" matches "0.5". A gold answer without a number falls back to
    a whitespace/case-insensitive string comparison.
    """
    if predicted is None or not predicted.strip():
        return 0.0
    pred_val = _gsm8k_value(predicted)
    for gold in gold_answers:
        gold_val = _gsm8k_value(gold)
        if gold_val is None:
            if normalize_text(gold) and normalize_text(gold) == normalize_text(predicted):
                return 1.0
        elif pred_val is not None and pred_val == gold_val:
            return 1.0
    return 0.0


# ------------------------------------------------------------------ DROP (official port)


def _remove_articles(text: str) -> str:
    regex = re.compile(r"\b(a|an|the)\b", re.UNICODE)
    return re.sub(regex, " ", text)


def _white_space_fix(text: str) -> str:
    return " ".join(text.split())


EXCLUDE = set(string.punctuation)


def _remove_punc(text: str) -> str:
    if not _is_number(text):
        return "".join(ch for ch in text if ch not in EXCLUDE)
    return text


def _lower(text: str) -> str:
    return text.lower()


def _tokenize(text: str) -> list[str]:
    return re.split(" |-", text)


def _normalize_answer(text: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace."""
    parts = [
        _white_space_fix(_remove_articles(_normalize_number(_remove_punc(_lower(token)))))
        for token in _tokenize(text)
    ]
    parts = [part for part in parts if part.strip()]
    return " ".join(parts).strip()


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _normalize_number(text: str) -> str:
    if _is_number(text):
        return str(float(text))
    return text


def _answer_to_bags(answer: Span) -> tuple[list[str], list[set[str]]]:
    raw_spans = answer if isinstance(answer, (list, tuple)) else [answer]
    normalized_spans: list[str] = []
    token_bags: list[set[str]] = []
    for raw_span in raw_spans:
        normalized_span = _normalize_answer(raw_span)
        normalized_spans.append(normalized_span)
        token_bags.append(set(normalized_span.split()))
    return normalized_spans, token_bags


def linear_sum_assignment_max(scores: np.ndarray) -> list[tuple[int, int]]:
    """Maximum-weight one-to-one assignment of rows to columns (Hungarian, O(n^2 m)).

    Returns ``min(n_rows, n_cols)`` (row, col) pairs, like scipy's ``linear_sum_assignment``
    on ``-scores``.
    """
    n_rows, n_cols = scores.shape
    if n_rows == 0 or n_cols == 0:
        return []
    transposed = n_rows > n_cols
    cost = (-scores.T if transposed else -scores).astype(float)
    n, m = cost.shape  # n <= m
    inf = float("inf")
    u = [0.0] * (n + 1)
    v = [0.0] * (m + 1)
    p = [0] * (m + 1)  # p[j]: row (1-based) matched to column j
    way = [0] * (m + 1)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = [inf] * (m + 1)
        used = [False] * (m + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = p[j0], inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    cur = cost[i0 - 1, j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[p[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    pairs = [(p[j] - 1, j - 1) for j in range(1, m + 1) if p[j]]
    if transposed:
        pairs = [(c, r) for r, c in pairs]
    return sorted(pairs)


def _align_bags(predicted: list[set[str]], gold: list[set[str]]) -> np.ndarray:
    """Optimal 1-1 alignment of gold and predicted bags; per-gold F1 (length max(n_gold, n_pred))."""
    scores = np.zeros([len(gold), len(predicted)])
    for gold_index, gold_item in enumerate(gold):
        for pred_index, pred_item in enumerate(predicted):
            if _match_numbers_if_present(gold_item, pred_item):
                scores[gold_index, pred_index] = _compute_f1(pred_item, gold_item)
    max_scores = np.zeros([max(len(gold), len(predicted))])
    for row, column in linear_sum_assignment_max(scores):
        max_scores[row] = max(max_scores[row], scores[row, column])
    return max_scores


def _compute_f1(predicted_bag: set[str], gold_bag: set[str]) -> float:
    intersection = len(gold_bag.intersection(predicted_bag))
    precision = 1.0 if not predicted_bag else intersection / float(len(predicted_bag))
    recall = 1.0 if not gold_bag else intersection / float(len(gold_bag))
    if precision == 0.0 and recall == 0.0:
        return 0.0
    return (2 * precision * recall) / (precision + recall)


def _match_numbers_if_present(gold_bag: set[str], predicted_bag: set[str]) -> bool:
    gold_numbers = {w for w in gold_bag if _is_number(w)}
    predicted_numbers = {w for w in predicted_bag if _is_number(w)}
    return (not gold_numbers) or bool(gold_numbers.intersection(predicted_numbers))


def get_metrics(predicted: Span, gold: Span) -> tuple[float, float]:
    """Official DROP ``(exact_match, f1)`` for one prediction vs one gold answer; F1 rounded to 2 dp."""
    predicted_bags = _answer_to_bags(predicted)
    gold_bags = _answer_to_bags(gold)
    if set(predicted_bags[0]) == set(gold_bags[0]) and len(predicted_bags[0]) == len(gold_bags[0]):
        exact_match = 1.0
    else:
        exact_match = 0.0
    f1_per_bag = _align_bags(predicted_bags[1], gold_bags[1])
    f1 = round(np.mean(f1_per_bag), 2)  # numpy float64 rounding, exactly as the official script
    return exact_match, float(f1)


def drop_em_f1(predicted: Span | None, gold_answers: Sequence[Span]) -> tuple[float, float]:
    """Max over gold answers of official DROP ``(em, f1)`` (each maxed separately).

    ``predicted`` is a string or a list of spans; each gold answer is a string or a list of
    spans. Gold answers whose first span is blank are skipped, as in ``evaluate_json``.
    """
    if predicted is None:
        return 0.0, 0.0
    best_em, best_f1 = 0.0, 0.0
    for gold in gold_answers:
        spans = [gold] if isinstance(gold, str) else list(gold)
        if not spans or spans[0].strip() == "":
            continue
        em, f1 = get_metrics(predicted, gold if isinstance(gold, str) else tuple(spans))
        best_em, best_f1 = max(best_em, em), max(best_f1, f1)
    return best_em, best_f1


# ------------------------------------------------------------------ Bamboogle / generic


def normalize_text(text: str) -> str:
    """SQuAD-style: lowercase, drop punctuation and articles (a/an/the), squeeze whitespace."""
    text = text.lower()
    text = "".join(" " if ch in EXCLUDE else ch for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def bamboogle_match(predicted: str | None, gold_answers: list[str], max_extra_words: int = 5) -> float:
    """1.0 if the prediction matches any gold answer after :func:`normalize_text`, else 0.0.

    Rule: correct when normalized gold == normalized prediction, or when the normalized gold
    occurs as a whole-word contiguous sequence inside the prediction and the prediction is
    at most ``max_extra_words`` (5) words longer than the gold ("James Madison was
    president" matches "james madison"; a long sentence that merely mentions it does not).
    Punctuation is replaced by spaces, so "Titan-IIIE" matches "Titan IIIE".
    """
    if predicted is None:
        return 0.0
    pred = normalize_text(predicted).split()
    if not pred:
        return 0.0
    for gold_text in gold_answers:
        gold = normalize_text(gold_text).split()
        if not gold:
            continue
        if pred == gold:
            return 1.0
        if len(pred) - len(gold) <= max_extra_words:
            k = len(gold)
            if any(pred[i:i + k] == gold for i in range(len(pred) - k + 1)):
                return 1.0
    return 0.0


# ------------------------------------------------------------------ dispatch


def score(dataset: str, predicted: str | None, gold_answers: list[str], f1_threshold: float = 0.5) -> dict:
    """``{"em", "f1", "correct"}`` for one prediction by the dataset's metric; None scores zero.
    ``f1`` metric (DROP): correct = f1 >= threshold."""
    metric = datasets.get(dataset).metric
    if predicted is None:
        return {"em": 0.0, "f1": 0.0, "correct": False}
    if metric == "exact_match":
        em = gsm8k_em(predicted, gold_answers)
        return {"em": em, "f1": em, "correct": em == 1.0}
    if metric == "f1":
        em, f1 = drop_em_f1(predicted, gold_answers)
        return {"em": em, "f1": f1, "correct": f1 >= f1_threshold}
    acc = bamboogle_match(predicted, gold_answers)
    return {"em": acc, "f1": acc, "correct": acc == 1.0}


def primary_metric(dataset: str, scores: Mapping[str, Any], *, unknown: str | None = None) -> float:
    """The dataset's headline number from a :func:`score` dict (or a dict of their means): em, f1 or
    correct by its metric. An unknown dataset raises, unless ``unknown`` names the metric to read
    (evaluation reads a quarantined row of an unknown dataset as ``accuracy``)."""
    found = datasets.find(dataset)
    if found is None and unknown is None:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(datasets.names())}")
    name = found.metric if found is not None else unknown
    if name == "exact_match":
        return float(scores["em"])
    if name == "f1":
        return float(scores["f1"])
    return float(scores["correct"] or 0.0)
