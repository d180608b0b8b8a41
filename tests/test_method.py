"""The method module: each system's calls, parsing and scoring, and the two drivers agreeing."""

from __future__ import annotations

import asyncio

import pytest

from pipeline import method
from pipeline.backends.base import Completion

ROW = {"id": "gsm8k:test:1", "dataset": "gsm8k", "question": "Tom has 3 bags of 4 apples and eats 2. How many are left?",
       "context": "", "answers": ["10"]}


def scripted_model(call: method.Call) -> Completion:
    """A deterministic stand-in for an LLM that reads its prompt: enough to drive every system."""
    user = call.messages[-1]["content"]
    if call.role == "decomposer":
        text = "1. How many apples are in the bags?\n2. How many apples are left?"
    elif call.role == "solver":
        n = user.count("\nQ")
        text = "\n".join(f"A{i}: {i * 6}" for i in range(1, n + 1)) + "\nThe answer is: 10"
    elif call.role == "dynamic_decomposer":
        steps = user.count("Follow up:")
        text = "So the final answer is: 10" if steps >= 2 else f"Follow up: What is step {steps + 1}?"
    elif call.role == "dynamic_solver":
        text = "12 apples."
    else:  # single stage
        text = "The answer is: 12"
    return Completion(text=text, prompt_tokens=len(user.split()), completion_tokens=len(text.split()))


def batch_call(log: list):
    def call(role: str, calls: list[method.Call]) -> list[Completion]:
        log.append((role, len(calls)))
        return [scripted_model(c) for c in calls]
    return call


async def _async_call(c: method.Call) -> Completion:
    return scripted_model(c)


def test_static_decomposes_once_then_solves_in_order_and_scores():
    log: list = []
    [out] = method.run_batched([method.static(ROW, method.Settings())], batch_call(log))
    assert log == [("decomposer", 1), ("solver", 1)]
    assert out.subquestions == ["How many apples are in the bags?", "How many apples are left?"]
    assert out.subanswers == ["6", "12"] and out.prediction == "10" and out.warning is None
    assert method.score(ROW, out.prediction)["correct"] is True
    assert out.usage.calls == {"decomposer": 1, "solver": 1}


def test_batched_runs_one_batch_per_role_per_round():
    log: list = []
    rows = [{**ROW, "id": f"gsm8k:test:{i}"} for i in range(5)]
    progs = [method.program(m, r, method.Settings()) for r, m in zip(rows, ["static", "static", "dynamic", "direct", "cot"])]
    outs = method.run_batched(progs, batch_call(log))
    assert len(outs) == 5
    # round 1: 2 static decomposers, 1 dynamic step, 2 single-stage solvers (same role "direct")
    assert ("decomposer", 2) in log and ("direct", 2) in log and log.count(("dynamic_decomposer", 1)) == 3
    assert outs[2].subquestions == ["What is step 1?", "What is step 2?"] and outs[2].prediction == "10"
    assert outs[3].prediction == "12" and outs[3].warning is None


@pytest.mark.parametrize("mode", ["static", "dynamic", "direct", "cot"])
def test_batched_and_async_drivers_agree(mode):
    s = method.Settings(max_subquestions=1)
    [batched] = method.run_batched([method.program(mode, ROW, s)], batch_call([]))
    online = asyncio.run(method.run_async(method.program(mode, ROW, s), _async_call))
    assert batched == online


def test_one_cap_and_unparseable_decomposition_means_none():
    assert method.read_decomposition("1. a?\n2. b?\n3. c?", 2) == (["a?", "b?"], True)
    assert method.read_decomposition("I cannot help with that", 3) == ([], False)
    assert method.read_decomposition("No decomposition", 3) == ([], True)


def test_read_solution_falls_back_to_the_last_number_on_numeric_datasets_only():
    assert method.read_solution("A1: 4\nso 7 apples", "gsm8k", 1) == (
        ["4"], "7", ["no 'The answer is:' marker; used the last number in the solver output"])
    subanswers, prediction, warnings = method.read_solution("A1: Paris\nit is Paris", "bamboogle", 2)
    assert prediction is None and warnings[0].startswith("no final answer") and "1 subanswers for 2" in warnings[1]


def test_a_failed_call_stops_the_program_with_a_stage_error():
    def failing(role, calls):
        return [Completion(error="HTTP 400: too long") if role == "solver" else scripted_model(c) for c in calls]

    [out] = method.run_batched([method.static(ROW, method.Settings())], failing)
    assert out.error == "solver error: HTTP 400: too long" and out.prediction is None
    assert out.subquestions and out.usage.calls == {"decomposer": 1, "solver": 1}


def test_dynamic_stops_after_max_steps_without_an_answer():
    def never_done(role, calls):
        return [Completion(text="Follow up: and then?") if role == "dynamic_decomposer" else Completion(text="ok") for _ in calls]

    [out] = method.run_batched([method.dynamic(ROW, method.Settings(max_dynamic_steps=3))], never_done)
    assert out.prediction is None and out.usage.calls == {"decomposer": 3, "solver": 3} and "after 3 steps" in out.warning


def test_solve_given_starts_from_a_decomposition():
    [out] = method.run_batched([method.solve_given(ROW, ["q1?", "q2?", "q3?"], method.Settings())], batch_call([]))
    assert out.subanswers == ["6", "12", "18"] and out.usage.calls == {"decomposer": 0, "solver": 1}


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown mode 'tree'"):
        method.program("tree", ROW, method.Settings())


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_n():
    from pipeline.evaluation import bootstrap_ci

    small = bootstrap_ci([1.0, 0.0] * 10)
    large = bootstrap_ci([1.0, 0.0] * 500)
    assert small[0] < 0.5 < small[1] and large[0] < 0.5 < large[1]
    assert (large[1] - large[0]) < (small[1] - small[0]) / 3
    assert bootstrap_ci([1.0] * 7) == (1.0, 1.0) and bootstrap_ci([]) is None
    assert bootstrap_ci([1.0, 0.0, 1.0]) == bootstrap_ci([1.0, 0.0, 1.0])  # seeded: a report is reproducible
