"""Generic loader: any JSONL / JSON / CSV (with header) / parquet file plus a column mapping.

``SourceConfig.columns`` maps our field names (``question``, ``context``, ``answers``, ``id``,
``gold_subquestions``, ``gold_subanswers``) to the source's column names; a field that is
not mapped is read from the column of the same name. ``question`` and ``answers`` are
required (a missing or null value rejects the row, naming the column). An explicitly mapped
optional column must be present in every row (it may be null); an unmapped optional field
that is absent is simply left empty.

The answers column may hold one string (or number) or a list of them. Id:
``generic:<split>:<value of the id column>``, else the 0-based row position.
"""

from __future__ import annotations

from typing import Any, Iterator

from pipeline.data.sources import (
    GENERIC_FIELDS,
    RowParser,
    SourceConfig,
    as_answer_list,
    dedupe,
    iter_records,
    parse_records,
    resolve_format,
    source_id,
    str_list,
)
from pipeline.schema import Question, Rejected, RowError, make_id

REQUIRED = ("question", "answers")


def make_row_parser(columns: dict[str, str], split: str) -> RowParser:
    mapping = {f: columns.get(f, f) for f in GENERIC_FIELDS}

    def get(row: dict, field: str) -> Any:
        col = mapping[field]
        how = f"mapped to field {field!r}" if col != field else "required"
        if field in REQUIRED:
            if row.get(col) is None:
                raise RowError(f"column {col!r} ({how}) is missing")
        elif field in columns and col not in row:
            raise RowError(f"column {col!r} ({how}) is missing")
        return row.get(col)

    def parse(row: Any, position: int) -> Question:
        if not isinstance(row, dict):
            raise RowError(f"expected an object, got {type(row).__name__}")
        question = get(row, "question")
        context = get(row, "context")
        answers = dedupe(as_answer_list(get(row, "answers"), mapping["answers"]))
        if not answers:
            raise RowError(f"column {mapping['answers']!r} (field 'answers') has no non-empty answer")
        subqs = get(row, "gold_subquestions")
        subas = get(row, "gold_subanswers")
        sid = source_id({"id": get(row, "id")}, position)
        return Question(
            id=make_id("generic", split, sid),
            dataset="generic",
            split=split,
            question=question,
            context="" if context is None else context,
            answers=answers,
            gold_subquestions=None if subqs is None else str_list(subqs, mapping["gold_subquestions"]),
            gold_subanswers=None if subas is None else str_list(subas, mapping["gold_subanswers"]),
        )

    return parse


def row_parser(src: SourceConfig) -> RowParser:
    return make_row_parser(src.columns, src.split)


def load(src: SourceConfig) -> Iterator[Question | Rejected]:
    return parse_records(iter_records(src.path, resolve_format(src)), src.path, row_parser(src))
