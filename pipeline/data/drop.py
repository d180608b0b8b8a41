"""DROP loader. Three input forms, detected automatically:

(a) OpenAI simple-evals raw JSONL (``drop_v0_dev.jsonl.gz``), one row per question:
    ``{"context": "Passage: <p>\\nQuestion: <q>\\nAnswer:", "completion": " <a>", "ref_text": "a|b"}``.
    Gold answers = ``ref_text.split("|")`` (+ ``completion``). Id: the 0-based line number.
(b) Our parsed JSONL (``dev.jsonl``): ``{"id", "passage", "question", "answers", "answer"}``.
    Id: its ``id`` (= the simple-evals line number, so (a) and (b) of the same rows agree).
    The Hugging Face ``ucinlp/drop`` row shape (``query_id``, ``passage``, ``question``,
    ``answers_spans: {"spans": [...]}``) is read by the same row parser, id = ``query_id``.
(c) The official AllenAI JSON document (``drop_dataset_dev.json``)::

        {passage_id: {"passage": str, "qa_pairs": [{"question", "query_id",
            "answer": {"number": str, "date": {"day", "month", "year"}, "spans": [str]},
            "validated_answers": [<same shape>, ...]}]}}

    Id: ``query_id``. Rejected locations read ``passage nfl_123 / query <query_id>``.

Answer normalization for (c), following allenai ``drop_eval.answer_json_to_strings``
(number first, then spans, then date):

- number -> the string as is;
- spans -> the spans joined with ``" and "`` (how simple-evals flattens multi-span answers,
  so all three forms give the same strings; the span boundaries are not kept);
- date -> ``"day month year"`` of the non-empty parts (e.g. ``"5 September 1998"``,
  ``"September 1998"`` or ``"1998"``; the official evaluator's and simple-evals' order).

``answer`` and every ``validated_answers`` entry are merged, stripped and deduplicated in
first-seen order; entries with no content are skipped. ``context`` is the passage.
"""

from __future__ import annotations

from typing import Any, Iterator

from pipeline.data.sources import (
    RowParser,
    SourceConfig,
    as_answer_list,
    dedupe,
    iter_records,
    load_json_document,
    parse_one,
    parse_records,
    records_from_document,
    reject,
    require,
    require_str,
    resolve_format,
    source_id,
    str_list,
)
from pipeline.schema import Question, Rejected, RowError, make_id

_PASSAGE = "Passage:"
_QUESTION = "\nQuestion:"
_ANSWER = "Answer:"


# ------------------------------------------------------------------ answers
def answer_to_string(answer: Any, name: str = "answer") -> str:
    """One official DROP answer object as a string ("" when it has no content)."""
    if not isinstance(answer, dict):
        raise RowError(f"field {name!r} must be an object with number/date/spans, got {type(answer).__name__}")
    number = answer.get("number")
    if number is not None and (isinstance(number, bool) or not isinstance(number, (str, int, float))):
        raise RowError(f"field '{name}.number' must be a string or number, got {type(number).__name__}")
    if number is not None and str(number).strip():
        return str(number).strip()
    spans = answer.get("spans")
    if spans:
        spans = [s.strip() for s in str_list(spans, f"{name}.spans") if s.strip()]
        if spans:
            return " and ".join(spans)
    date = answer.get("date")
    if date:
        if not isinstance(date, dict):
            raise RowError(f"field '{name}.date' must be an object with day/month/year, got {type(date).__name__}")
        parts = []
        for key in ("day", "month", "year"):
            v = date.get(key)
            if v is None:
                continue
            if not isinstance(v, (str, int)) or isinstance(v, bool):
                raise RowError(f"field '{name}.date.{key}' must be a string, got {type(v).__name__}")
            if str(v).strip():
                parts.append(str(v).strip())
        return " ".join(parts)
    return ""


def official_answers(qa: Any) -> list[str]:
    """Merged, deduplicated gold strings of an official qa pair (``answer`` + ``validated_answers``)."""
    out = [answer_to_string(require(qa, "answer"), "answer")]
    validated = qa.get("validated_answers") or []
    if not isinstance(validated, list):
        raise RowError(f"field 'validated_answers' must be a list, got {type(validated).__name__}")
    for i, v in enumerate(validated):
        out.append(answer_to_string(v, f"validated_answers[{i}]"))
    answers = dedupe(out)
    if not answers:
        raise RowError("field 'answer' has no number, spans or date (and no validated answer has one)")
    return answers


# ------------------------------------------------------------------ rows (a) and (b)
def split_simple_evals_context(context: str) -> tuple[str, str]:
    """``"Passage: p\\nQuestion: q\\nAnswer:"`` -> ``(p, q)``."""
    if not context.startswith(_PASSAGE) or _QUESTION not in context:
        raise RowError("field 'context' is not of the form 'Passage: ...\\nQuestion: ...\\nAnswer:'")
    body = context[len(_PASSAGE):]
    cut = body.rfind(_QUESTION)
    passage, rest = body[:cut].strip(), body[cut + len(_QUESTION):].rstrip()
    if rest.endswith(_ANSWER):
        rest = rest[: -len(_ANSWER)]
    return passage, rest.strip()


def _is_simple_evals(row: dict) -> bool:
    return "context" in row and "passage" not in row and ("ref_text" in row or "completion" in row)


def parse_row(row: Any, position: int, split: str) -> Question:
    """One row of form (a), (b) or the hub shape."""
    if not isinstance(row, dict):
        raise RowError(f"expected an object, got {type(row).__name__}")
    if _is_simple_evals(row):
        passage, question = split_simple_evals_context(require_str(row, "context"))
        golds: list[str] = []
        if row.get("ref_text") is not None:
            golds += require_str(row, "ref_text").split("|")
        if row.get("completion") is not None:
            golds.append(require_str(row, "completion"))
        sid: Any = position
    else:
        passage = require_str(row, "passage")
        question = require(row, "question")
        if "answers_spans" in row and "answers" not in row:  # Hugging Face ucinlp/drop
            spans = require(row, "answers_spans")
            golds = as_answer_list(spans.get("spans") if isinstance(spans, dict) else spans, "answers_spans.spans")
            sid = require(row, "query_id")
        else:
            if row.get("answers") is None and row.get("answer") is None:
                raise RowError("field 'answers' is missing")
            golds = []
            if row.get("answers") is not None:
                golds += as_answer_list(row["answers"], "answers")
            if row.get("answer") is not None:
                golds += as_answer_list(row["answer"], "answer")
            sid = row["query_id"] if row.get("query_id") is not None else source_id(row, position)
    if not passage.strip():
        raise RowError("field 'passage' is empty")
    answers = dedupe(golds)
    if not answers:
        raise RowError("field 'answers' has no non-empty gold answer")
    return Question(
        id=make_id("drop", split, sid), dataset="drop", split=split, question=question, context=passage, answers=answers
    )


def row_parser(src: SourceConfig) -> RowParser:
    return lambda row, position: parse_row(row, position, src.split)


# ------------------------------------------------------------------ official JSON (c)
def is_official(doc: Any) -> bool:
    return (
        isinstance(doc, dict)
        and bool(doc)
        and all(isinstance(v, dict) and ("qa_pairs" in v or "passage" in v) for v in doc.values())
    )


def iter_official(doc: dict, source: str, split: str) -> Iterator[Question | Rejected]:
    seen: dict[str, str] = {}
    for pid, entry in doc.items():
        where = f"passage {pid}"
        if not isinstance(entry, dict):
            yield reject(source, where, entry, f"passage entry must be an object, got {type(entry).__name__}")
            continue
        passage = entry.get("passage")
        qa_pairs = entry.get("qa_pairs")
        if not isinstance(qa_pairs, list):
            err = "field 'qa_pairs' is missing" if qa_pairs is None else (
                f"field 'qa_pairs' must be a list, got {type(qa_pairs).__name__}")
            yield reject(source, where, entry, err)
            continue
        if not isinstance(passage, str) or not passage.strip():
            err = "field 'passage' is missing" if passage is None else (
                "field 'passage' is empty" if isinstance(passage, str)
                else f"field 'passage' must be a string, got {type(passage).__name__}")
            yield reject(source, where, entry, f"{err} ({len(qa_pairs)} questions skipped)")
            continue
        for i, qa in enumerate(qa_pairs):
            qid = qa.get("query_id") if isinstance(qa, dict) else None
            has_qid = isinstance(qid, (str, int)) and not isinstance(qid, bool) and str(qid).strip()
            loc = f"{where} / query {qid}" if has_qid else f"{where} / qa_pairs[{i}]"

            def parse(qa: Any, _pos: int) -> Question:
                if not isinstance(qa, dict):
                    raise RowError(f"qa pair must be an object, got {type(qa).__name__}")
                if not has_qid:
                    if qid is None:
                        raise RowError("field 'query_id' is missing")
                    raise RowError(f"field 'query_id' must be a non-empty string, got {qid!r}")
                return Question(
                    id=make_id("drop", split, str(qid).strip()),
                    dataset="drop",
                    split=split,
                    question=require(qa, "question"),
                    context=passage,
                    answers=official_answers(qa),
                )

            try:
                q = parse_one(parse, qa, i)
            except RowError as e:
                yield reject(source, loc, qa, str(e))
                continue
            if q.id in seen:
                yield reject(source, loc, qa, f"duplicate id {q.id!r} (first seen at {seen[q.id]})")
                continue
            seen[q.id] = loc
            yield q


# ------------------------------------------------------------------ entry point
def load(src: SourceConfig) -> Iterator[Question | Rejected]:
    fmt = resolve_format(src)
    if fmt != "json":
        return parse_records(iter_records(src.path, fmt), src.path, row_parser(src))
    return _load_json(src)


def _load_json(src: SourceConfig) -> Iterator[Question | Rejected]:
    doc, err = load_json_document(src.path)
    if err is None and is_official(doc):
        yield from iter_official(doc, src.path, src.split)
        return
    # a JSON array of (a)/(b) rows, a .json that is really JSONL, or one "document" error
    yield from parse_records(records_from_document(src.path, doc, err), src.path, row_parser(src))
