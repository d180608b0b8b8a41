"""Tests for pipeline.parsing: decomposer/solver/self-ask output parsing and GSM8K gold."""

from __future__ import annotations

import pytest

from pipeline.parsing import (
    ParseError,
    extract_answer,
    find_numbers,
    format_subquestions,
    gsm8k_gold_answer,
    last_number,
    parse_dynamic_step,
    parse_socratic,
    parse_solver_output,
    parse_subquestions,
)

# Literal GSM8K socratic solutions (GSM8K, MIT license; test split rows 0, 2 and train row 1).
SOCRATIC_JANET = (
    "How many eggs does Janet sell? ** Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
    "How much does Janet make at the farmers' market? ** She makes 9 * 2 = $<<9*2=18>>18 every day "
    "at the farmer\u2019s market.\n#### 18"
)
SOCRATIC_HOUSE = (
    "How much did the house cost? ** The cost of the house and repairs came out to "
    "80,000+50,000=$<<80000+50000=130000>>130,000\n"
    "How much did the repairs increase the value of the house? ** He increased the value of the house "
    "by 80,000*1.5=<<80000*1.5=120000>>120,000\n"
    "What is the new value of the house? ** So the new value of the house is "
    "120,000+80,000=$<<120000+80000=200000>>200,000\n"
    "How much profit did he make? ** So he made a profit of 200,000-130,000=$<<200000-130000=70000>>70,000\n"
    "#### 70000"
)
SOCRATIC_WENG = (
    "How much does Weng earn per minute? ** Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
    "How much did Weng earn? ** Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"
)


# ------------------------------------------------------------------ subquestions

EXPECTED = ["How many eggs are left?", "How much money does she make?"]


@pytest.mark.parametrize(
    "text",
    [
        "1. How many eggs are left?\n2. How much money does she make?",
        "1) How many eggs are left?\n2) How much money does she make?",
        "(1) How many eggs are left?\n(2) How much money does she make?",
        "Q1: How many eggs are left?\nQ2: How much money does she make?",
        "Subquestion 1: How many eggs are left?\nSubquestion 2: How much money does she make?",
        "Decomposed subquestion 1: How many eggs are left?\nDecomposed subquestion 2: How much money does she make?",
        "Step 1: How many eggs are left?\nStep 2: How much money does she make?",
        "- How many eggs are left?\n- How much money does she make?",
        "* How many eggs are left?\n* How much money does she make?",
        "**Subquestion 1:** How many eggs are left?\n**Subquestion 2:** How much money does she make?",
        "**1.** How many eggs are left?\n**2.** How much money does she make?",
        "Sure! Here are the subquestions:\n\n1. How many eggs are left?\n\n2. How much money does she make?\n\n"
        "These will help answer the question.",
        "1. How many eggs are left?\n2. How much money does she make?\n1. 9 eggs\n2. $18",
        "1. How many eggs are left?\n2. How   much money does she make?\n3. how many eggs are LEFT?",
        "To solve this we ask:\nHow many eggs are left?\nHow much money does she make?\nThat is all.",
        "  1.   How many eggs are left?  \n  2.How much money does she make?",
    ],
)
def test_parse_subquestions_styles(text: str) -> None:
    got = parse_subquestions(text)
    assert [" ".join(q.split()) for q in got] == EXPECTED


def test_numbered_items_beat_question_lines_and_bullets() -> None:
    text = "Why does this matter?\n- a bullet\n1. What is x?\n2. What is y?"
    assert parse_subquestions(text) == ["What is x?", "What is y?"]


def test_decimal_line_is_not_a_numbered_item() -> None:
    assert parse_subquestions("3.5 apples were eaten.\nHow many are left?") == ["How many are left?"]


@pytest.mark.parametrize(
    "text", ["No decomposition", "no decomposition.", "NO DECOMPOSITION!", "**No decomposition**", "'No decomposition'",
             "No decomposition.\nThe question is simple.", "The question is direct.\nNo decomposition."]
)
def test_no_decomposition(text: str) -> None:
    assert parse_subquestions(text) == []


@pytest.mark.parametrize("text", ["", "   \n ", "I cannot help with that.", "The answer is 42."])
def test_parse_subquestions_raises(text: str) -> None:
    with pytest.raises(ParseError, match="no subquestions found in model output"):
        parse_subquestions(text)


def test_parse_error_message_quotes_80_chars() -> None:
    text = "x" * 200
    with pytest.raises(ParseError) as ei:
        parse_subquestions(text)
    assert f"'{'x' * 80}'" in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_max_subquestions() -> None:
    text = "\n".join(f"{i}. Question number {i}?" for i in range(1, 15))
    assert len(parse_subquestions(text)) == 10
    assert parse_subquestions(text, max_subquestions=3) == [f"Question number {i}?" for i in (1, 2, 3)]


ROUNDTRIP = [
    [],
    ["What is 2 + 2?"],
    EXPECTED,
    ["How many muffins?", "What is 3.5 * 2?", "1 or 2?", "Is it 10% of $1,000?"],
    ["Who founded Citibank?", "When was it founded?", "Who was the US president in that year?"],
    ["What does \"Q1: x\" mean?", "(1) is a label; is it?", "- is a dash?", "Step 1: what then?"],
    [f"Sub {i}?" for i in range(1, 11)],
    ["Not a question", "Another statement"],
    ["Ünïcödé question — with dashes?", "数字は何ですか?"],
]


@pytest.mark.parametrize("subqs", ROUNDTRIP)
def test_format_parse_roundtrip(subqs: list[str]) -> None:
    text = format_subquestions(subqs)
    assert parse_subquestions(text) == subqs


def test_format_subquestions_exact() -> None:
    assert format_subquestions(["a?", "b?"]) == "1. a?\n2. b?"
    assert format_subquestions([]) == "No decomposition"
    assert format_subquestions(["multi\nline?"]) == "1. multi line?"


# ------------------------------------------------------------------ solver output


def test_parse_solver_output_basic() -> None:
    text = "A1: He sells 20 muffins.\nA2: He makes $60.\nThe answer is: 420"
    assert parse_solver_output(text) == (["He sells 20 muffins.", "He makes $60."], "420")


@pytest.mark.parametrize(
    "text,final",
    [
        ("The answer is: Benjamin Harrison.", "Benjamin Harrison"),
        ('The answer is: "Scotland"', "Scotland"),
        ("The answer is: **17**", "17"),
        ("**The answer is: 17.**", "17"),
        ("So the final answer is: 1889", "1889"),
        ("Final answer: 12", "12"),
        ("blah\n#### 1,000", "1,000"),
        ("The answer is: 5\nwait, no.\nThe answer is: 6", "6"),
        ("the answer is 3.5.", "3.5"),
        ("The answer is:\n\n  42  ", "42"),
        ("The answer is: $\\boxed{7}$", "7"),
        ("The final answer is: Lee\nQuestion: next one", "Lee"),
        ("No marker here, 42", None),
        ("The answer is:", None),
    ],
)
def test_final_answer_markers(text: str, final: str | None) -> None:
    assert parse_solver_output(text)[1] == final


def test_subanswer_variants() -> None:
    assert parse_solver_output("Answer 1: 9 eggs\nAnswer 2: $18\nThe answer is: 18")[0] == ["9 eggs", "$18"]
    assert parse_solver_output("1. 9 eggs\n2. $18\nThe answer is: 18")[0] == ["9 eggs", "$18"]
    assert parse_solver_output("**A1:** 9 eggs\nThe answer is: 18")[0] == ["9 eggs"]
    assert parse_solver_output("The answer is: 18") == ([], "18")


def test_extract_answer() -> None:
    assert extract_answer("A1: 9\nThe answer is: 18", "gsm8k") == "18"
    assert extract_answer("She makes 9 * 2 = $18 a day.", "gsm8k") == "18"
    assert extract_answer("no numbers at all", "gsm8k") is None
    assert extract_answer("It was Lee, I think.", "drop") is None
    assert extract_answer("It was Lee.\nThe answer is: Lee", "drop") == "Lee"
    assert extract_answer("So the final answer is: Benjamin Harrison", "bamboogle") == "Benjamin Harrison"


@pytest.mark.parametrize(
    "text,nums",
    [
        ("$1,000.50 and -3 and 5-3", ["1000.50", "-3", "5", "3"]),
        ("1/2 of 3/4/2020", ["1/2", "3", "4", "2020"]),
        ("A1: 24/2=12 apples, .5 more", ["24/2", "12", "0.5"]),
        ("-$5 then $ 7", ["-5", "7"]),
        ("no digits", []),
        ("x2 and 10 - 5", ["10", "5"]),
    ],
)
def test_find_numbers(text: str, nums: list[str]) -> None:
    assert find_numbers(text) == nums


def test_last_number() -> None:
    assert last_number("He earned 0.2 x 50 = $10.") == "10"
    assert last_number("nothing") is None


# ------------------------------------------------------------------ dynamic


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Follow up: When was the Eiffel Tower completed?", ("followup", "When was the Eiffel Tower completed?")),
        ("Follow-up: Who invented it?\nIntermediate answer: Bell", ("followup", "Who invented it?")),
        ("So the final answer is: Benjamin Harrison.", ("final", "Benjamin Harrison")),
        ("Final answer: 17", ("final", "17")),
        ("So the final answer is: 17\nFollow up: extra?", ("final", "17")),
        ("Are follow up questions needed here: Yes.\nFollow up: Who?", ("followup", "Who?")),
    ],
)
def test_parse_dynamic_step(text: str, expected: tuple[str, str]) -> None:
    assert parse_dynamic_step(text) == expected


@pytest.mark.parametrize("text", ["", "I don't know.", "Follow up:", "Intermediate answer: 5"])
def test_parse_dynamic_step_raises(text: str) -> None:
    with pytest.raises(ParseError):
        parse_dynamic_step(text)


# ------------------------------------------------------------------ GSM8K gold


def test_gsm8k_gold_answer() -> None:
    assert gsm8k_gold_answer(SOCRATIC_JANET) == "18"
    assert gsm8k_gold_answer(SOCRATIC_HOUSE) == "70000"
    assert gsm8k_gold_answer("Step\n#### 1,234") == "1234"
    assert gsm8k_gold_answer("#### -5") == "-5"
    with pytest.raises(ParseError):
        gsm8k_gold_answer("no marker 5")
    with pytest.raises(ParseError):
        gsm8k_gold_answer("text\n####   ")


def test_parse_socratic_real_examples() -> None:
    qs, ans = parse_socratic(SOCRATIC_JANET)
    assert qs == ["How many eggs does Janet sell?", "How much does Janet make at the farmers' market?"]
    assert ans == [
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.",
        "She makes 9 * 2 = $18 every day at the farmer\u2019s market.",
    ]
    qs, ans = parse_socratic(SOCRATIC_HOUSE)
    assert len(qs) == len(ans) == 4
    assert qs[-1] == "How much profit did he make?"
    assert ans[0] == "The cost of the house and repairs came out to 80,000+50,000=$130,000"
    assert all("<<" not in a and ">>" not in a and "####" not in a for a in ans)
    qs, ans = parse_socratic(SOCRATIC_WENG)
    assert ans == ["Weng earns 12/60 = $0.2 per minute.", "Working 50 minutes, she earned 0.2 x 50 = $10."]


def test_parse_socratic_skips_empty_step() -> None:
    # Real GSM8K train row: an empty step, repeated with its answer on the next line.
    sol = (
        "How old will Terry be in 10 years? ** Terry will be 4*10=<<4*10=40>>40 years old in 10 years\n"
        "How old is Terry now? ** \n"
        "How old is Terry now? ** Currently, Terry is 40-10 = <<40-10=30>>30 years old.\n#### 30"
    )
    qs, ans = parse_socratic(sol)
    assert qs == ["How old will Terry be in 10 years?", "How old is Terry now?"]
    assert ans == ["Terry will be 4*10=40 years old in 10 years", "Currently, Terry is 40-10 = 30 years old."]


def test_parse_socratic_malformed() -> None:
    with pytest.raises(ParseError, match=r"\*\*"):
        parse_socratic("How many? no separator here\n#### 3")
    with pytest.raises(ParseError):
        parse_socratic(" ** answer without question\n#### 3")
