"""GSM8K loader: plain and socratic rows, detected per row.

Rows are ``{"question": str, "answer": str}`` (openai/grade-school-math JSONL, or the same
columns in CSV / parquet / the hub). ``answer`` is a worked solution whose last line is
``#### <final answer>``. In the socratic variant every step line is
``<subquestion> ** <step text>``; a row is socratic when its answer contains ``" ** "``.

Output: ``answers = [final answer with thousands commas removed]``; socratic rows also get
``gold_subquestions`` / ``gold_subanswers`` (one per step, calculator annotations
``<<48/2=24>>`` removed; the ``####`` line is not a step). The id is
``gsm8k:<split>:<0-based line number>``, so a plain file and its socratic twin give the
same id to the same question.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

from pipeline.data.sources import (
    RowParser,
    SourceConfig,
    iter_records,
    parse_records,
    require_str,
    resolve_format,
)
from pipeline.schema import Question, Rejected, RowError, make_id

SOCRATIC_SEP = " ** "
FINAL_MARK = "####"
_ANNOTATION = re.compile(r"<<.*?>>")
_STEP = re.compile(r"^(.*?)\s\*\*(?:\s+(.*))?$", re.S)


def strip_annotations(text: str) -> str:
    """Remove calculator annotations: ``"48/2 = <<48/2=24>>24"`` -> ``"48/2 = 24"``."""
    return _ANNOTATION.sub("", text)


def final_answer(solution: str) -> str:
    """The gold answer after the last ``####``, commas removed (RowError when absent)."""
    if FINAL_MARK not in solution:
        raise RowError(f"field 'answer' has no '{FINAL_MARK}' final-answer line")
    tail = solution.rsplit(FINAL_MARK, 1)[1].strip()
    tail = tail.splitlines()[0].strip() if tail else ""
    value = tail.replace(",", "").strip()
    if not value:
        raise RowError(f"field 'answer' has an empty final answer after '{FINAL_MARK}'")
    return value


def solution_steps(solution: str) -> list[str]:
    """Non-empty step lines before the ``####`` line."""
    body = solution.rsplit(FINAL_MARK, 1)[0] if FINAL_MARK in solution else solution
    return [line.strip() for line in body.splitlines() if line.strip()]


def is_socratic(solution: str) -> bool:
    return SOCRATIC_SEP in solution


def socratic_steps(solution: str) -> tuple[list[str], list[str]]:
    """``(subquestions, subanswers)`` of a socratic solution (RowError on a step without ``**``).

    A step whose text after ``**`` is empty (upstream has a few, each followed by the same
    subquestion with its real step) is skipped."""
    subqs: list[str] = []
    subas: list[str] = []
    for n, step in enumerate(solution_steps(solution), start=1):
        m = _STEP.match(step)
        if m is None:
            raise RowError(f"field 'answer': socratic step {n} has no '{SOCRATIC_SEP.strip()}' separator: {step[:80]!r}")
        q, a = m.group(1).strip(), strip_annotations(m.group(2) or "").strip()
        if not q:
            raise RowError(f"field 'answer': socratic step {n} has an empty subquestion")
        if not a:
            continue
        subqs.append(q)
        subas.append(a)
    if not subqs:
        raise RowError("field 'answer': socratic solution has no steps")
    return subqs, subas


def parse_row(row: Any, position: int, split: str) -> Question:
    question = require_str(row, "question")
    solution = require_str(row, "answer")
    answer = final_answer(solution)
    subqs = subas = None
    if is_socratic(solution):
        subqs, subas = socratic_steps(solution)
    return Question(
        id=make_id("gsm8k", split, position),
        dataset="gsm8k",
        split=split,
        question=question,
        answers=[answer],
        gold_subquestions=subqs,
        gold_subanswers=subas,
    )


def row_parser(src: SourceConfig) -> RowParser:
    return lambda row, position: parse_row(row, position, src.split)


def load(src: SourceConfig) -> Iterator[Question | Rejected]:
    return parse_records(iter_records(src.path, resolve_format(src)), src.path, row_parser(src))
