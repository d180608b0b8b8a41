"""The normalized question schema shared by every dataset and job.

Every prepared row has: ``id`` (stable: ``<dataset>:<split>:<source id or position>``),
``dataset``, ``split``, ``question``, ``context`` (DROP passage, else ""), ``answers``
(all gold answers as strings), and optional gold decompositions
(``gold_subquestions`` / ``gold_subanswers``, e.g. from GSM8K socratic).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

MAX_QUESTION_CHARS = 4_000
MAX_CONTEXT_CHARS = 40_000

QUESTION_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("context", pa.string(), nullable=False),
        pa.field("answers", pa.list_(pa.string()), nullable=False),
        pa.field("gold_subquestions", pa.list_(pa.string())),
        pa.field("gold_subanswers", pa.list_(pa.string())),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),
        pa.field("location", pa.string()),
        pa.field("raw", pa.string()),
        pa.field("error", pa.string()),
    ]
)


def make_id(dataset: str, split: str, source_id: Any) -> str:
    return f"{dataset}:{split}:{source_id}"


@dataclass
class Question:
    id: str
    dataset: str
    split: str
    question: str
    answers: list[str]
    context: str = ""
    gold_subquestions: list[str] | None = None
    gold_subanswers: list[str] | None = None

    def to_row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "dataset": self.dataset,
            "split": self.split,
            "question": self.question,
            "context": self.context,
            "answers": list(self.answers),
            "gold_subquestions": self.gold_subquestions,
            "gold_subanswers": self.gold_subanswers,
        }


@dataclass
class Rejected:
    """A row that could not be used, with where it came from and why."""

    source: str
    location: str
    raw: str
    error: str

    def to_row(self) -> dict[str, Any]:
        return {"source": self.source, "location": self.location, "raw": self.raw[:10_000], "error": self.error}


class RowError(ValueError):
    """A single row is malformed; the message says which field and why."""


def validate_question(q: Question) -> Question:
    """Field-level checks shared by every loader; raises RowError naming the field."""
    if not isinstance(q.question, str):
        raise RowError(f"field 'question' must be a string, got {type(q.question).__name__}")
    q.question = q.question.strip()
    if not q.question:
        raise RowError("field 'question' is empty")
    if len(q.question) > MAX_QUESTION_CHARS:
        raise RowError(f"field 'question' is {len(q.question)} chars, over the {MAX_QUESTION_CHARS} limit")
    if not isinstance(q.context, str):
        raise RowError(f"field 'context' must be a string, got {type(q.context).__name__}")
    if len(q.context) > MAX_CONTEXT_CHARS:
        raise RowError(f"field 'context' is {len(q.context)} chars, over the {MAX_CONTEXT_CHARS} limit")
    if not isinstance(q.answers, list) or not all(isinstance(a, str) for a in q.answers):
        raise RowError("field 'answers' must be a list of strings")
    q.answers = [a.strip() for a in q.answers if a.strip()]
    if not q.answers:
        raise RowError("field 'answers' has no non-empty gold answer")
    for name in ("gold_subquestions", "gold_subanswers"):
        v = getattr(q, name)
        if v is not None and (not isinstance(v, list) or not all(isinstance(s, str) for s in v)):
            raise RowError(f"field {name!r} must be a list of strings")
    return q


@dataclass
class SplitRows:
    good: list[dict] = field(default_factory=list)
    bad: list[dict] = field(default_factory=list)
