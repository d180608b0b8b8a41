"""Tests for pipeline.prompts: shapes, demos that parse, passage handling and the token budget."""

from __future__ import annotations

import pytest

from pipeline.metrics import score
from pipeline.parsing import (
    extract_answer,
    parse_dynamic_step,
    parse_solver_output,
    parse_subquestions,
)
from pipeline.prompts import (
    PROMPT_VERSION,
    cot_messages,
    decomposer_messages,
    direct_messages,
    dynamic_answer_messages,
    dynamic_messages,
    format_solver_output,
    solver_messages,
)

# A long-ish real GSM8K test question (row 2, MIT license) and typical rows of the other datasets.
GSM8K_Q = (
    "Josh decides to try flipping a house.  He buys a house for $80,000 and then puts in $50,000 in repairs.  "
    "This increased the value of the house by 150%.  How much profit did he make?"
)
LONG_GSM8K_Q = (
    "Every day, Wendi feeds each of her chickens three cups of mixed chicken feed, containing seeds, mealworms "
    "and vegetables to help keep them healthy.  She gives the chickens their feed in three separate meals. In the "
    "morning, she gives her flock of chickens 15 cups of feed.  In the afternoon, she gives her chickens another 25 "
    "cups of feed.  How many cups of feed does she need to give her chickens in the final meal of the day if the "
    "size of Wendi's flock is 20 chickens?"
)
ROWS = {
    "gsm8k": {"id": "gsm8k:test:2", "dataset": "gsm8k", "split": "test", "question": GSM8K_Q, "context": "",
              "answers": ["70000"]},
    "drop": {"id": "drop:dev:9", "dataset": "drop", "split": "dev", "question": "Who kicked the longest field goal?",
             "context": "Smith kicked a 52-yard field goal. Later Jones added a 30-yarder.", "answers": ["Smith"]},
    "bamboogle": {"id": "bamboogle:test:0", "dataset": "bamboogle", "split": "test",
                  "question": "Who was president of the United States in the year that Citibank was founded?",
                  "context": "", "answers": ["james madison"]},
    "generic": {"id": "generic:x:0", "dataset": "generic", "split": "x", "question": "What is the capital of France?",
                "context": "", "answers": ["Paris"]},
}
ALL = sorted(ROWS)


def _chars(msgs: list[dict]) -> int:
    # content plus a generous allowance for chat-template role markers
    return sum(len(m["content"]) + 20 for m in msgs)


def _check_shape(msgs: list[dict]) -> None:
    assert msgs[0]["role"] == "system"
    assert msgs[-1]["role"] == "user"
    assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) and m["content"] for m in msgs)
    for i, m in enumerate(msgs[1:]):  # strict user/assistant alternation after the system turn
        assert m["role"] == ("user" if i % 2 == 0 else "assistant")


def test_prompt_version() -> None:
    assert isinstance(PROMPT_VERSION, str) and PROMPT_VERSION == "v1"


@pytest.mark.parametrize("ds", ALL)
def test_decomposer_few_shot_demos_parse(ds: str) -> None:
    msgs = decomposer_messages(ROWS[ds])
    _check_shape(msgs)
    assert len(msgs) == 6  # system + 2 demos + user
    for demo_reply in (msgs[2]["content"], msgs[4]["content"]):
        parse_subquestions(demo_reply)  # every demo reply is valid decomposer output
    assert "numbered list" in msgs[0]["content"] and "No decomposition" in msgs[0]["content"]
    assert msgs[-1]["content"].endswith(ROWS[ds]["question"])


def test_decomposer_demos_are_numbered_and_drop_has_no_decomposition_demo() -> None:
    msgs = decomposer_messages(ROWS["gsm8k"])
    assert msgs[2]["content"].startswith("1. ") and "\n2. " in msgs[2]["content"]
    drop_replies = [m["content"] for m in decomposer_messages(ROWS["drop"]) if m["role"] == "assistant"]
    assert "No decomposition" in drop_replies
    assert parse_subquestions("No decomposition") == []


@pytest.mark.parametrize("ds", ALL)
def test_decomposer_zero_shot(ds: str) -> None:
    msgs = decomposer_messages(ROWS[ds], few_shot=False)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == decomposer_messages(ROWS[ds])[0]["content"]
    assert msgs[1] == decomposer_messages(ROWS[ds])[-1]


def test_drop_passage_in_user_turn_only_for_drop() -> None:
    user = decomposer_messages(ROWS["drop"])[-1]["content"]
    assert user.startswith("Passage: " + ROWS["drop"]["context"])
    assert "Question: Who kicked the longest field goal?" in user
    for fn in (direct_messages, cot_messages):
        assert ROWS["drop"]["context"] in fn(ROWS["drop"])[-1]["content"]
    assert ROWS["drop"]["context"] in solver_messages(ROWS["drop"], ["Who kicked?"])[-1]["content"]
    assert ROWS["drop"]["context"] in dynamic_messages(ROWS["drop"], [])[-1]["content"]
    assert "Passage:" not in decomposer_messages(ROWS["gsm8k"])[-1]["content"]


@pytest.mark.parametrize("question", [GSM8K_Q, LONG_GSM8K_Q])
def test_gsm8k_decomposer_token_budget(question: str) -> None:
    row = dict(ROWS["gsm8k"], question=question)
    assert _chars(decomposer_messages(row)) < 2400  # ~600 byte-level BPE tokens
    assert _chars(solver_messages(row, ["a?", "b?", "c?"])) < 2400


def test_solver_messages_and_demo_roundtrip() -> None:
    subqs = ["How much did the house cost?", "What is the new value of the house?"]
    msgs = solver_messages(ROWS["gsm8k"], subqs)
    _check_shape(msgs)
    assert len(msgs) == 4
    assert "Q1: How much did the house cost?\nQ2: What is the new value of the house?" in msgs[-1]["content"]
    subans, final = parse_solver_output(msgs[2]["content"])
    assert final is not None and len(subans) == msgs[1]["content"].count("\nQ")
    assert "The answer is:" in msgs[0]["content"]
    assert len(solver_messages(ROWS["gsm8k"], subqs, few_shot=False)) == 2


@pytest.mark.parametrize("ds", ALL)
def test_solver_demo_answers_are_correct_format(ds: str) -> None:
    msgs = solver_messages(ROWS[ds], ["x?"])
    assert msgs[2]["content"].splitlines()[-1].startswith("The answer is: ")
    assert len(msgs[2]["content"].splitlines()[-1].split(": ", 1)[1].split()) <= 5


def test_solver_without_subquestions() -> None:
    user = solver_messages(ROWS["bamboogle"], [])[-1]["content"]
    assert "Subquestions: none" in user and "Q1:" not in user


def test_answer_style_per_dataset() -> None:
    assert "number" in solver_messages(ROWS["gsm8k"], [])[0]["content"]
    for ds in ("drop", "bamboogle"):
        assert "at most 5 words" in solver_messages(ROWS[ds], [])[0]["content"]


def test_format_solver_output() -> None:
    text = format_solver_output(["9 eggs.", "$18."], "18")
    assert text == "A1: 9 eggs.\nA2: $18.\nThe answer is: 18"
    assert parse_solver_output(text) == (["9 eggs.", "$18."], "18")
    assert format_solver_output([], "Paris") == "The answer is: Paris"
    assert format_solver_output(["two\nlines"], "x") == "A1: two lines\nThe answer is: x"


@pytest.mark.parametrize("ds", ALL)
def test_single_stage_baselines(ds: str) -> None:
    for fn in (direct_messages, cot_messages):
        msgs = fn(ROWS[ds])
        _check_shape(msgs)
        demo_answer = extract_answer(msgs[2]["content"], ds)
        assert demo_answer is not None
        assert fn(ROWS[ds], few_shot=False)[1:] == msgs[-1:]
    assert direct_messages(ROWS[ds])[2]["content"].startswith("The answer is: ")
    assert "step by step" in cot_messages(ROWS[ds])[0]["content"]


def test_cot_demo_gsm8k_answer_is_consistent() -> None:
    reply = cot_messages(ROWS["gsm8k"])[2]["content"]
    assert score("gsm8k", extract_answer(reply, "gsm8k"), ["420"])["correct"]


@pytest.mark.parametrize("ds", ALL)
def test_dynamic_messages(ds: str) -> None:
    history = [("How much did the house cost?", "$130,000.")]
    msgs = dynamic_messages(ROWS[ds], history)
    _check_shape(msgs)
    assert parse_dynamic_step(msgs[2]["content"])[0] == "followup"
    assert parse_dynamic_step(msgs[4]["content"])[0] == "final"
    assert msgs[-1]["content"].endswith("Follow up: How much did the house cost?\nIntermediate answer: $130,000.")
    assert "So the final answer is:" in msgs[0]["content"]
    assert dynamic_messages(ROWS[ds], [])[-1]["content"].endswith(ROWS[ds]["question"])


def test_dynamic_answer_messages() -> None:
    msgs = dynamic_answer_messages(ROWS["drop"], [("Who kicked a 52-yard field goal?", "Smith.")], "Who kicked 30?")
    _check_shape(msgs)
    assert msgs[-1]["content"].endswith("Intermediate answer: Smith.\nFollow up: Who kicked 30?")
    assert ROWS["drop"]["context"] in msgs[-1]["content"]
    assert "passage" in msgs[0]["content"]
    zero = dynamic_answer_messages(ROWS["bamboogle"], [], "When was Citibank founded?", few_shot=False)
    assert [m["role"] for m in zero] == ["system", "user"]
    assert zero[-1]["content"].endswith("Follow up: When was Citibank founded?")


def test_unknown_dataset_falls_back_to_generic() -> None:
    row = dict(ROWS["generic"], dataset="weird")
    assert decomposer_messages(row) == decomposer_messages(ROWS["generic"])
