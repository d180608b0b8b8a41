"""Chat prompts for every stage: static decomposer, solver, single-stage and dynamic baselines.

All prompts are our own (the paper's static style). Demonstrations are compact because
tiny students have a 1024-token context: the few-shot decomposer prompt for a typical
GSM8K question stays under ~2,400 characters (~600 byte-level BPE tokens). Every
function returns OpenAI-style messages; demos are prior user/assistant turns.
"""

from __future__ import annotations

from pipeline import datasets
from pipeline.datasets import Dataset, Demo
from pipeline.parsing import NO_DECOMPOSITION, format_answer_line, format_subquestions

__all__ = [
    "PROMPT_VERSION",
    "decomposer_messages",
    "solver_messages",
    "format_solver_output",
    "direct_messages",
    "cot_messages",
    "dynamic_messages",
    "dynamic_answer_messages",
    "render_history",
]

PROMPT_VERSION = "v1"

Messages = list[dict[str, str]]
History = list[tuple[str, str]]


def _dataset(row: dict) -> Dataset:
    """The row's registry entry; a dataset the registry does not know is prompted like ``generic``."""
    return datasets.find(row.get("dataset")) or datasets.GENERIC


def _system(ds: Dataset, tag: str, text: str) -> str:
    """The system message: ``text`` (the instructions a pretrained LLM needs), or only the task
    ``tag`` for a dataset with ``compact_prompts`` (a model trained from scratch on these prompts
    learns the task from the tag; the instructions would be half of every row it reads)."""
    return tag if ds.compact_prompts else text


def _question_block(question: str, context: str) -> str:
    context = (context or "").strip()
    q = f"Question: {question.strip()}"
    return f"Passage: {context}\n{q}" if context else q


def _row_block(row: dict) -> str:
    return _question_block(row["question"], row.get("context") or "")


def _demo_block(demo: Demo) -> str:
    return _question_block(demo.question, demo.context)


def _msgs(system: str, turns: list[tuple[str, str]], user: str) -> Messages:
    out: Messages = [{"role": "system", "content": system}]
    for u, a in turns:
        out.append({"role": "user", "content": u})
        out.append({"role": "assistant", "content": a})
    out.append({"role": "user", "content": user})
    return out


# ------------------------------------------------------------------ static decomposer

_DECOMPOSER_SYSTEM = (
    "Break the question into the simpler subquestions that must be answered to solve it. "
    "Write all of them now, before answering any: a numbered list (1. ..., 2. ...), one per line, "
    "in the order to answer them, with no answers. If the question needs no decomposition, "
    f"write only the line: {NO_DECOMPOSITION}"
)
_PASSAGE_NOTE = "\nSubquestions may refer to the passage."


def decomposer_messages(row: dict, few_shot: bool = True) -> Messages:
    """System + (2 demos) + user turn asking for all subquestions as a numbered list.

    ``few_shot=False`` drops the demos (the student's training/inference prompt).
    The expected reply is :func:`pipeline.parsing.format_subquestions` output.
    """
    ds = _dataset(row)
    system = _system(ds, "Decompose.", _DECOMPOSER_SYSTEM + (_PASSAGE_NOTE if (row.get("context") or "").strip() else ""))
    turns = [(_demo_block(d), format_subquestions(list(d.subquestions))) for d in ds.demos] if few_shot else []
    return _msgs(system, turns, _row_block(row))


# ------------------------------------------------------------------ solver


def format_solver_output(subanswers: list[str], answer: str) -> str:
    """``"A1: ...\\nA2: ...\\nThe answer is: <answer>"`` (solver target / gold replay)."""
    lines = [f"A{i}: {' '.join(a.split())}" for i, a in enumerate(subanswers, 1)]
    lines.append(format_answer_line(answer))
    return "\n".join(lines)


def _solver_user(block: str, subquestions: list[str]) -> str:
    if not subquestions:
        return f"{block}\nSubquestions: none. Answer the question directly."
    listed = "\n".join(f"Q{i}: {' '.join(q.split())}" for i, q in enumerate(subquestions, 1))
    return f"{block}\nSubquestions:\n{listed}"


def solver_messages(row: dict, subquestions: list[str], few_shot: bool = True) -> Messages:
    """Ask the solver to answer ``subquestions`` in order ("A1: ...") then "The answer is: ...".

    Each answer may use the earlier ones. With no subquestions it answers directly and still
    ends with "The answer is: ...". One compact demo per dataset when ``few_shot``.
    """
    ds = _dataset(row)
    system = _system(ds, "Solve.", "Answer the subquestions in order, one line each (A1: ..., A2: ...); later answers may "
                     "use earlier ones. Then write the final line: The answer is: <answer>. " + ds.answer_style)
    demo = ds.demos[0]
    turns = []
    if few_shot:
        turns = [
            (
                _solver_user(_demo_block(demo), list(demo.subquestions)),
                format_solver_output(list(demo.subanswers), demo.answer),
            )
        ]
    return _msgs(system, turns, _solver_user(_row_block(row), subquestions))


# ------------------------------------------------------------------ single-stage baselines


def direct_messages(row: dict, few_shot: bool = True) -> Messages:
    """Single-stage baseline: reply with only "The answer is: <answer>"."""
    ds = _dataset(row)
    system = _system(ds, "Answer.", "Answer the question. Reply with one line: The answer is: <answer>. " + ds.answer_style)
    demo = ds.demos[0]
    turns = [(_demo_block(demo), f"The answer is: {demo.answer}")] if few_shot else []
    return _msgs(system, turns, _row_block(row))


def cot_messages(row: dict, few_shot: bool = True) -> Messages:
    """Chain-of-thought baseline: reason step by step, then "The answer is: <answer>"."""
    ds = _dataset(row)
    system = _system(ds, "Think, then answer.", "Answer the question. Think step by step, then end with the line: "
                     "The answer is: <answer>. " + ds.answer_style)
    demo = ds.demos[0]
    turns = [(_demo_block(demo), f"{demo.reasoning}\nThe answer is: {demo.answer}")] if few_shot else []
    return _msgs(system, turns, _row_block(row))


# ------------------------------------------------------------------ dynamic (self-ask)

_DYNAMIC_SYSTEM = (
    "Solve the question by asking one simple follow-up question at a time. Each reply is one line: "
    "either 'Follow up: <question>' for the next thing you need to know, or "
    "'So the final answer is: <answer>' once the answers so far are enough. "
)


def render_history(history: History) -> str:
    """Self-ask transcript: "Follow up: q\\nIntermediate answer: a" per pair."""
    return "\n".join(f"Follow up: {q}\nIntermediate answer: {a}" for q, a in history)


def _dynamic_user(block: str, history: History) -> str:
    return f"{block}\n{render_history(history)}" if history else block


def dynamic_messages(row: dict, history: History, few_shot: bool = True) -> Messages:
    """Next self-ask step given (follow-up, answer) pairs so far.

    The model replies "Follow up: <question>" or "So the final answer is: <answer>"
    (see :func:`pipeline.parsing.parse_dynamic_step`).
    """
    ds = _dataset(row)
    demo = ds.demos[0]
    turns = []
    if few_shot:
        pairs = list(zip(demo.subquestions, demo.subanswers))
        block = _demo_block(demo)
        turns = [
            (block, f"Follow up: {demo.subquestions[0]}"),
            (_dynamic_user(block, pairs), f"So the final answer is: {demo.answer}"),
        ]
    return _msgs(_system(ds, "Self-ask.", _DYNAMIC_SYSTEM + ds.answer_style), turns, _dynamic_user(_row_block(row), history))


def dynamic_answer_messages(row: dict, history: History, question: str, few_shot: bool = True) -> Messages:
    """Ask the solver to answer one follow-up ``question`` briefly, given earlier pairs."""
    ds = _dataset(row)
    system = _system(ds, "Answer the follow-up.", "Answer the follow-up question briefly, in one short sentence, using the "
                     "main question" + (", the passage" if (row.get("context") or "").strip() else "") + " and the earlier answers.")

    def user(block: str, hist: History, q: str) -> str:
        return f"{_dynamic_user(block, hist)}\nFollow up: {' '.join(q.split())}"

    demo = ds.demos[0]
    turns = []
    if few_shot and len(demo.subquestions) >= 2:
        first = [(demo.subquestions[0], demo.subanswers[0])]
        turns = [(user(_demo_block(demo), first, demo.subquestions[1]), demo.subanswers[1])]
    return _msgs(system, turns, user(_row_block(row), history, question))
