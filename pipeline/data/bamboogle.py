"""Bamboogle loader (Press et al. 2022; 125 two-hop questions).

Forms:

- JSONL / JSON / parquet rows ``{"id": int, "question": str, "answer": str, "alt_answers": [str]}``
  (our ``test.jsonl``). Field names are matched case-insensitively, so the hub copy's
  ``Question`` / ``Answer`` columns work too. Id: the row's ``id``, else its 0-based position.
- The raw headerless CSV export of the sheet (``bamboogle.csv``): question in column 0,
  answer in column 4, an alternative answer in column 5 when non-empty. Id: the 0-based row
  index, which equals ``id`` in test.jsonl. A CSV whose first cell is ``question`` is read as
  having a header and mapped by column name instead.

``answers = [answer] + alt_answers`` (stripped, deduplicated).
"""

from __future__ import annotations

from typing import Any, Iterator

from pipeline.data.sources import (
    Record,
    RowParser,
    SourceConfig,
    _csv_line,
    as_answer,
    dedupe,
    iter_csv_rows,
    iter_records,
    parse_records,
    resolve_format,
    source_id,
    str_list,
)
from pipeline.schema import Question, Rejected, RowError, make_id

CSV_QUESTION_COL = 0
CSV_ANSWER_COL = 4
CSV_ALT_ANSWER_COL = 5


def _field(row: dict, name: str) -> Any:
    if name in row:
        return row[name]
    for k, v in row.items():
        if isinstance(k, str) and k.strip().lower() == name:
            return v
    return None


def parse_row(row: Any, position: int, split: str) -> Question:
    if not isinstance(row, dict):
        raise RowError(f"expected an object, got {type(row).__name__}")
    question = _field(row, "question")
    if question is None:
        raise RowError("field 'question' is missing")
    answer = _field(row, "answer")
    if answer is None:
        raise RowError("field 'answer' is missing")
    answers = [as_answer(answer, "answer")]
    alt = _field(row, "alt_answers")
    if alt is not None:
        answers += str_list(alt, "alt_answers")
    answers = dedupe(answers)
    if not answers:
        raise RowError("field 'answer' is empty")
    sid = source_id({"id": _field(row, "id")}, position)
    return Question(id=make_id("bamboogle", split, sid), dataset="bamboogle", split=split, question=question, answers=answers)


def row_parser(src: SourceConfig) -> RowParser:
    return lambda row, position: parse_row(row, position, src.split)


def iter_raw_csv(path: str) -> Iterator[Record]:
    """Records of the headerless sheet export, as ``{"question", "answer", "alt_answers"}`` dicts."""
    header: list[str] | None = None
    pos = 0
    for n, (_, row, err) in enumerate(iter_csv_rows(path)):
        if n == 0 and row and row[0].strip().lstrip("\ufeff").lower() == "question":
            header = [h.strip().lstrip("\ufeff") for h in row]
            continue
        rec = Record(position=pos, location=f"row {pos + 1}", raw=_csv_line(row))
        pos += 1
        if err is not None:
            rec.error = err
        elif header is not None:
            if len(row) != len(header):
                rec.error = f"row has {len(row)} fields but the header has {len(header)}"
            else:
                rec.value = dict(zip(header, row))
        elif len(row) <= CSV_ANSWER_COL:
            rec.error = (
                f"row has {len(row)} columns; field 'answer' (column {CSV_ANSWER_COL}) is missing"
            )
        else:
            alt = row[CSV_ALT_ANSWER_COL].strip() if len(row) > CSV_ALT_ANSWER_COL else ""
            rec.value = {
                "question": row[CSV_QUESTION_COL],
                "answer": row[CSV_ANSWER_COL],
                "alt_answers": [alt] if alt else [],
            }
        yield rec


def load(src: SourceConfig) -> Iterator[Question | Rejected]:
    fmt = resolve_format(src)
    records = iter_raw_csv(src.path) if fmt == "csv" else iter_records(src.path, fmt)
    return parse_records(records, src.path, row_parser(src))
