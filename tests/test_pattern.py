"""The paper's pattern, checked on the full miniature (``divconq quickstart``: 8.1-12.3 min on the 2-core AVX-512 EPYC, 2026-12-03 and -04; 30-41 on the AVX2-only one before its stages ran side by side).

Marked ``pattern`` and left out of every run whose ``-m`` does not name it (tests/conftest.py; it is the whole experiment, not a unit of the
machinery): ``.venv/bin/python -m pytest -m pattern``; ``DIVCONQ_PATTERN_RUN=runs/quickstart`` checks a finished run instead. It checks the claims of issue 12 with tolerances,
on the held-out questions of the two trained families (the held-out family is the transfer test).
Each claim is a comparison of two settings of one run; none is an exact value. A claim that does not
reproduce at this scale is an ``xfail`` with the figures (README: Results), not a tuned world.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import free_port

TRAINED = ("world_chain", "world_numeric")
pytestmark = [pytest.mark.slow, pytest.mark.pattern, pytest.mark.timeout(3600)]


def _score(table: dict, setting: str, datasets=TRAINED) -> float:
    return 100 * sum(table[(setting, d)]["score"] for d in datasets) / len(datasets)


def _tokens(table: dict, setting: str, datasets=TRAINED) -> float:
    return sum(table[(setting, d)]["decomposer_tokens_per_q"] + table[(setting, d)]["solver_tokens_per_q"] for d in datasets)


@pytest.fixture(scope="module")
def table(request, tmp_path_factory):
    """The results of a fresh full run, or of the finished run named in ``DIVCONQ_PATTERN_RUN`` (its ``--out``)."""
    out = os.environ.get("DIVCONQ_PATTERN_RUN")
    if not out:
        from ray_jobs import quickstart

        request.getfixturevalue("ray_session")
        out = str(tmp_path_factory.mktemp("pattern") / "qs")
        assert quickstart.main(["--out", out, "--port", str(free_port())]) == 0
    results = json.load(open(os.path.join(out, "report", "results.json")))
    return {(row["setting"], row["dataset"]): row for row in results["table"]}


TT, SDR, SDT = "teacher QD + teacher QA (static)", "S_D-R + teacher QA (served)", "S_D-T + teacher QA"


def test_distilled_decomposer_keeps_most_of_the_teachers_quality(table):
    assert _score(table, SDT) >= _score(table, TT) - 10


@pytest.mark.xfail(reason="does not reproduce at this scale (README: Results): rejection sampling keeps ~160 rows, almost all "
                          "entity chains (the teacher solves ~4 % of the train numeric questions), and a student fine-tuned on "
                          "~160 rows copies names less reliably than on ~440 (benchmarks/results/probe_student_base.md)",
                   strict=False)
def test_rejection_sampled_decomposer_is_within_10_points_and_at_least_as_good_as_sd_t(table):
    assert _score(table, SDR) >= _score(table, TT) - 10
    assert _score(table, SDR) >= _score(table, SDT) - 3  # S_D-R at least as good as S_D-T (3 points of noise)


def test_distilled_solvers_lose(table):
    for solver in ("teacher QD + S_E-T", "teacher QD + S_E-A"):
        assert _score(table, solver) <= _score(table, TT) - 20, solver


def test_two_stage_beats_single_stage_and_untrained_student_is_near_zero(table):
    assert _score(table, TT) > _score(table, "single-stage teacher (direct)")
    assert _score(table, "untrained student + teacher QA") <= 5


def test_static_costs_at_most_half_the_tokens_of_dynamic_at_comparable_accuracy(table):
    dynamic = "teacher QD + teacher QA (dynamic)"
    assert 2 * _tokens(table, TT) <= _tokens(table, dynamic)
    assert _score(table, TT) >= _score(table, dynamic) - 10
