"""Tests for pipeline.metrics, incl. agreement with the official DROP script (vendored reference)."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

import reference_drop_eval as ref
from pipeline.metrics import (
    METRIC_NAME,
    bamboogle_match,
    drop_em_f1,
    get_metrics,
    gsm8k_em,
    linear_sum_assignment_max,
    normalize_text,
    primary_metric,
    score,
)

# ------------------------------------------------------------------ GSM8K


@pytest.mark.parametrize(
    "pred,gold",
    [
        ("18", "18"),
        ("1,000", "1000"),
        ("$1,000", "1000"),
        ("1000", "1,000"),
        ("5 apples", "5"),
        ("12 dollars", "12"),
        ("3%", "3"),
        ("18.0", "18"),
        ("18.00", "18"),
        ("-7", "-7"),
        ("-$7", "-7"),
        ("1/2", "0.5"),
        ("0.5", "1/2"),
        ("She makes 9 * 2 = $18 every day.", "18"),
        ("The answer is 70,000.", "70000"),
        ("**42**", "42"),
        (".5", "0.5"),
    ],
)
def test_gsm8k_em_matches(pred: str, gold: str) -> None:
    assert gsm8k_em(pred, [gold]) == 1.0


@pytest.mark.parametrize(
    "pred,gold",
    [
        ("17", "18"),
        ("7", "-7"),
        ("18 apples and 3 pears", "18"),  # the last number counts
        ("1/3", "0.33"),
        ("180", "18"),
        ("1.8", "18"),
        ("", "18"),
        ("no number", "18"),
        ("10,00", "1000"),
    ],
)
def test_gsm8k_em_mismatches(pred: str, gold: str) -> None:
    assert gsm8k_em(pred, [gold]) == 0.0


def test_gsm8k_em_none_and_multiple_golds() -> None:
    assert gsm8k_em(None, ["18"]) == 0.0
    assert gsm8k_em("20", ["18", "20"]) == 1.0
    assert gsm8k_em("1/0", ["0"]) == 0.0  # a zero denominator never matches


# ------------------------------------------------------------------ DROP vs official

DROP_CASES: list[tuple[object, object]] = [
    ("Lee", "Lee"),
    ("lee.", "Lee"),
    ("The Bears", "Bears"),
    ("a touchdown", "the touchdown"),
    ("2.0", "2"),
    ("2", "2.0"),
    ("two", "2"),
    ("17 yards", "17"),
    ("17", "17 yards"),
    ("1,000", "1000"),
    ("-5", "5"),
    ("3 November 1990", "3 November 1990"),
    ("November 3, 1990", "3 November 1990"),
    ("1990", "3 November 1990"),
    ("  3  November  1990 ", "3 November 1990"),
    ("Pakistanis and Filipinos", "Pakistanis and Filipinos"),
    ("Filipinos and Pakistanis", "Pakistanis and Filipinos"),
    ("Pakistani and Filipino", "Pakistanis and Filipinos"),
    (["Pakistanis", "Filipinos"], ["Pakistanis", "Filipinos"]),
    (["Filipinos", "Pakistanis"], ["Pakistanis", "Filipinos"]),
    (["Pakistanis"], ["Pakistanis", "Filipinos"]),
    (["Pakistanis", "Filipinos", "Indians"], ["Pakistanis", "Filipinos"]),
    (["Pakistanis and Filipinos"], ["Pakistanis", "Filipinos"]),
    ("under the age of 18 and 25 to 44", "under the age of 18 and 25 to 44 and 45 to 64"),
    ("25-44", "25 to 44"),
    ("state-of-the-art", "state of the art"),
    ("U.S.", "US"),
    ("$23.6 billion", "23.6 billion"),
    ("23.6", "$23.6 billion"),
    ("", "Lee"),
    ("Lee", ""),
    ("", ""),
    ("the", "a"),
    ("45 and 31", "45"),
    (["45", "31"], ["31", "45", "28"]),
    (["45 yards", "31"], ["31 yards", "45 yards"]),
    ("Jerry Rice", "Rice"),
    ("Jerry Rice and Joe Montana", "Joe Montana and Jerry Rice"),
    ("5.50", "5.5"),
    ("1e3", "1000"),
    ("nan", "nan"),
    ("inf", "infinity"),
    ("Lee's", "Lee"),
    ("9/11", "9 11"),
    (("a", "b"), ("b", "a")),
    (["x y z", "y", "z w"], ["y z", "x", "w", "q"]),
]


def _random_cases(n: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    rng = random.Random(seed)
    vocab = ["Lee", "the", "Bears", "45", "45.0", "31", "2", "yards", "a", "field", "goal", "Hawks", "-", "1,000", "."]
    def span() -> str:
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 4)))
    return [([span() for _ in range(rng.randint(1, 4))], [span() for _ in range(rng.randint(1, 4))]) for _ in range(n)]


@pytest.mark.parametrize("pred,gold", DROP_CASES + _random_cases(300))
def test_get_metrics_agrees_with_official(pred: object, gold: object) -> None:
    em, f1 = get_metrics(pred, gold)  # type: ignore[arg-type]
    ref_em, ref_f1 = ref.get_metrics(pred, gold)
    assert em == pytest.approx(ref_em, abs=1e-6)
    assert f1 == pytest.approx(float(ref_f1), abs=1e-6)
    assert isinstance(f1, float)


def _ref_drop_max(pred: object, golds: list[object]) -> tuple[float, float]:
    """What the official evaluate_json does for one question (max over candidate answers)."""
    best_em = best_f1 = 0.0
    for gold in golds:
        g = (gold,) if isinstance(gold, str) else tuple(gold)
        em, f1 = ref.get_metrics(pred, g)
        if g[0].strip() != "":
            best_em, best_f1 = max(best_em, em), max(best_f1, f1)
    return best_em, float(best_f1)


@pytest.mark.parametrize(
    "pred,golds,expected",
    [
        ("Pakistanis and Filipinos", ["Pakistanis and Filipinos", "Pakistani and Filipino"], (1.0, 1.0)),
        ("Pakistani and Filipino", ["Pakistanis and Filipinos", "Pakistani and Filipino"], (1.0, 1.0)),
        ("Filipino", ["Pakistanis and Filipinos", "Pakistani and Filipino"], (0.0, 0.5)),
        ("Pakistanis and Indians", ["Pakistanis and Filipinos"], (0.0, 0.67)),
        ("17", ["17", "seventeen"], (1.0, 1.0)),
        ("16", ["17"], (0.0, 0.0)),
        ("Lee", ["", "Lee"], (1.0, 1.0)),
        ("", ["", "  "], (0.0, 0.0)),
        (["Pakistanis", "Filipinos"], [["Filipinos", "Pakistanis"], "Indians"], (1.0, 1.0)),
        ("3 November 1990", [" 3 November 1990"], (1.0, 1.0)),
    ],
)
def test_drop_em_f1_max_over_golds(pred: object, golds: list[object], expected: tuple[float, float]) -> None:
    got = drop_em_f1(pred, golds)  # type: ignore[arg-type]
    assert got == pytest.approx(expected, abs=1e-6)
    assert got == pytest.approx(_ref_drop_max(pred, golds), abs=1e-6)


def test_drop_em_f1_none_and_empty_prediction_list() -> None:
    assert drop_em_f1(None, ["Lee"]) == (0.0, 0.0)
    assert drop_em_f1([], ["Lee"]) == (0.0, 0.0)


def test_drop_f1_rounding_matches_numpy() -> None:
    # 3 gold spans, 1 matched: mean 1/3 -> 0.33; 2 of 3 partial -> official 2-dp rounding.
    assert drop_em_f1(["a b", "c"], [["a b", "c", "d"]]) == pytest.approx(_ref_drop_max(["a b", "c"], [["a b", "c", "d"]]))
    assert get_metrics("x y", "x y z")[1] == 0.8


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3, 2), (4, 4), (1, 5), (5, 1), (5, 6)])
def test_assignment_is_optimal(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for _ in range(20):
        m = rng.integers(0, 4, size=shape).astype(float) / 3
        pairs = linear_sum_assignment_max(m)
        assert len(pairs) == min(shape)
        assert len({r for r, _ in pairs}) == len({c for _, c in pairs}) == min(shape)
        n, k = shape
        if n <= k:
            best = max(sum(m[r, c] for r, c in enumerate(cols)) for cols in itertools.permutations(range(k), n))
        else:
            best = max(sum(m[r, c] for c, r in enumerate(rows)) for rows in itertools.permutations(range(n), k))
        assert sum(m[r, c] for r, c in pairs) == pytest.approx(best)


def test_assignment_empty() -> None:
    assert linear_sum_assignment_max(np.zeros((0, 3))) == []


# ------------------------------------------------------------------ Bamboogle / generic


@pytest.mark.parametrize(
    "pred,gold,ok",
    [
        ("James Madison", "james madison", True),
        ("James Madison.", "james madison", True),
        ("the Titan IIIE", "Titan IIIE", True),
        ("Titan-IIIE", "Titan IIIE", True),
        ("It was James Madison.", "james madison", True),
        ("The president was James Madison, I think", "james madison", True),  # 5 extra words
        ("I am fairly sure the president was James Madison", "james madison", False),  # 7 extra words
        ("Madison", "james madison", False),
        ("James Madisonian", "james madison", False),  # whole words only
        ("1999", "1999", True),
        ("In 1999", "1999", True),
        ("19999", "1999", False),
        ("", "1999", False),
        ("...", "1999", False),
    ],
)
def test_bamboogle_match(pred: str, gold: str, ok: bool) -> None:
    assert bamboogle_match(pred, [gold]) == (1.0 if ok else 0.0)


def test_bamboogle_alt_answers_and_none() -> None:
    assert bamboogle_match("Mildred Gale", ["Mary Ball", "Mildred Gale"]) == 1.0
    assert bamboogle_match(None, ["x"]) == 0.0
    assert bamboogle_match("anything", ["", "..."]) == 0.0


def test_normalize_text() -> None:
    assert normalize_text("  The Quick, brown-fox!  ") == "quick brown fox"


# ------------------------------------------------------------------ score / primary metric


def test_score_dispatch() -> None:
    assert score("gsm8k", "The answer is $1,000", ["1000"]) == {"em": 1.0, "f1": 1.0, "correct": True}
    assert score("gsm8k", "999", ["1000"]) == {"em": 0.0, "f1": 0.0, "correct": False}
    s = score("drop", "Filipino", ["Pakistanis and Filipinos"])
    assert s["em"] == 0.0 and s["f1"] == pytest.approx(0.0) and s["correct"] is False
    s = score("drop", "Pakistanis and Indians", ["Pakistanis and Filipinos"])
    assert s["f1"] == pytest.approx(0.67) and s["correct"] is True
    assert score("drop", "Pakistanis", ["Pakistanis and Filipinos"])["f1"] == pytest.approx(0.5)
    assert score("drop", "Pakistanis", ["Pakistanis and Filipinos"])["correct"] is True  # 0.5 >= 0.5
    assert score("drop", "Pakistanis", ["Pakistanis and Filipinos"], f1_threshold=0.7)["correct"] is False
    assert score("bamboogle", "James Madison", ["james madison"]) == {"em": 1.0, "f1": 1.0, "correct": True}
    assert score("generic", "Paris, France", ["Paris"])["correct"] is True
    for ds in METRIC_NAME:
        assert score(ds, None, ["1"]) == {"em": 0.0, "f1": 0.0, "correct": False}
    with pytest.raises(ValueError, match="unknown dataset"):
        score("squad", "x", ["x"])


def test_primary_metric() -> None:
    assert METRIC_NAME == {"gsm8k": "exact_match", "drop": "f1", "bamboogle": "accuracy", "generic": "accuracy"}
    s = {"em": 0.0, "f1": 0.67, "correct": True}
    assert primary_metric("drop", s) == 0.67
    assert primary_metric("gsm8k", s) == 0.0
    assert primary_metric("bamboogle", s) == 1.0
    assert primary_metric("generic", {"em": 0.2, "f1": 0.2, "correct": 0.4}) == 0.4
    with pytest.raises(ValueError):
        primary_metric("nope", s)
