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
    assert METRIC_NAME == {"gsm8k": "exact_match", "drop": "f1", "bamboogle": "accuracy", "generic": "accuracy",
                           "world_chain": "accuracy", "world_numeric": "exact_match", "world_compare": "accuracy"}
    s = {"em": 0.0, "f1": 0.67, "correct": True}
    assert primary_metric("drop", s) == 0.67
    assert primary_metric("gsm8k", s) == 0.0
    assert primary_metric("bamboogle", s) == 1.0
    assert primary_metric("generic", {"em": 0.2, "f1": 0.2, "correct": 0.4}) == 0.4
    with pytest.raises(ValueError):
        primary_metric("nope", s)


# ------------------------------------------------------------------ scripts/check_drop_metric.py (the full-dev-set check)
def _drop_check():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "check_drop_metric.py")
    spec = importlib.util.spec_from_file_location("check_drop_metric", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_drop_check_script_agrees_on_the_shipped_sample(tmp_path) -> None:
    import json
    import os

    check = _drop_check()
    sample = os.path.join(os.path.dirname(check.DEFAULT_OUT), "..", "..", "data", "samples", "drop", "dev.jsonl")
    out = tmp_path / "drop_metric.json"
    assert check.main(["--data", sample, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["ok"] and result["data"]["questions"] == 60
    for solver in result["solvers"].values():
        assert solver["get_metrics"]["pairs"] > 1000 and solver["get_metrics_pairs_with_a_span_list"] > 100
        assert solver["drop_em_f1"]["pairs"] > 500
        assert solver["get_metrics"]["max_abs_diff_f1"] == solver["drop_em_f1"]["max_abs_diff_f1"] == 0.0


def test_drop_check_script_reports_a_difference() -> None:
    """The check can fail: against a 'reference' that skips the official 2-dp rounding it finds mismatches."""
    import os
    import types

    check = _drop_check()
    sample = os.path.join(os.path.dirname(check.DEFAULT_OUT), "..", "..", "data", "samples", "drop", "dev.jsonl")
    questions = check.read_questions(sample, 20)

    def unrounded(pred, gold):
        em, _ = ref.get_metrics(pred, gold)
        return em, float(np.mean(ref._align_bags(ref._answer_to_bags(pred)[1], ref._answer_to_bags(gold)[1])))

    result = check.compare(questions, types.SimpleNamespace(get_metrics=unrounded))
    assert result["get_metrics"]["pairs_over_tolerance"] > 0 and result["get_metrics"]["first_mismatches"]
    assert 0 < result["get_metrics"]["max_abs_diff_f1"] < 0.01


def test_committed_drop_results_cover_the_full_dev_set() -> None:
    """benchmarks/results/drop_metric.json (what the README quotes) is a full, passing run."""
    import json
    import os

    check = _drop_check()
    result = json.load(open(check.DEFAULT_OUT))
    assert result["data"]["questions"] == 9536 and result["data"]["gold_answers"] > 9536
    assert result["data"]["sha256"] == "7a58d35552dc476699d87ee8af0254f63e9f00f5a7f6b8b033e11c933157e186"
    assert result["ok"] and "scipy" in result["solvers"], "the committed run used the official scipy solver too"
    for solver in result["solvers"].values():
        for kind in ("get_metrics", "drop_em_f1"):
            assert solver[kind]["pairs_over_tolerance"] == 0
            assert max(solver[kind]["max_abs_diff_em"], solver[kind]["max_abs_diff_f1"]) <= 1e-6
    assert result["solvers"]["scipy"]["get_metrics"]["pairs"] > 200_000
