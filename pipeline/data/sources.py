"""Where questions come from (``SourceConfig``) and the shared record readers.

Every loader turns a file into a stream of *records* (one JSON line, CSV row, parquet
row or JSON array item, with where it came from and its raw text) and then maps each
record through a per-dataset row parser. ``parse_records`` is the one place that turns a
parser failure into a :class:`~pipeline.schema.Rejected`, so no bad row ever raises.

Locations are 1-based and human-oriented: ``line 17`` (JSONL, physical line, blank lines
counted), ``row 3`` (CSV data row not counting the header, parquet row, JSON array item).
Positions used for ids are 0-based (``line 17`` has position 16).

Paths may be local or any storage URL (``s3://``, ``gs://``, ``az://``, ``hf://datasets/<owner>/<name>/<file>``,
... through :mod:`pipeline.storage`), or ``hf://<owner>/<name>``: a hub dataset (see :mod:`pipeline.data.hub`). A ``.gz`` suffix is decompressed on
the fly for JSONL, JSON and CSV.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Optional

import pyarrow.parquet as pq
from pydantic import Field, field_validator, model_validator

from pipeline import datasets, storage
from pipeline.config import Strict, UsageError
from pipeline.data.world import SPLITS as WORLD_SPLITS
from pipeline.data.world import WorldConfig
from pipeline.schema import Question, Rejected, RowError, validate_question

HUB_PREFIX = "hf://"
FORMATS = ("jsonl", "json", "csv", "parquet")
GENERIC_FIELDS = ("question", "context", "answers", "id", "gold_subquestions", "gold_subanswers")

_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


class SourceConfig(Strict):
    """One input file (or hub dataset) and how to read it."""

    dataset: str = Field(..., description="A registered dataset (pipeline/datasets.py): gsm8k, drop, bamboogle, generic, ...")
    path: Optional[str] = Field(None, description="Local path or storage URL (s3://, gs://, az://, hf://datasets/<owner>/<name>/"
                                "<file>...) of a file, or hf://<owner>/<name> for a Hugging Face hub dataset (required except "
                                "for a generated dataset: the world's families).")
    split: str = Field("test", description="Split name used in ids (<dataset>:<split>:<source id>).")
    format: Literal["auto", "jsonl", "json", "csv", "parquet"] = Field(
        "auto", description="auto: by extension (.jsonl/.json/.csv/.parquet, optionally .gz)."
    )
    limit: Optional[int] = Field(None, ge=0, description="Stop after this many good rows.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="generic only: our field name -> source column (question, context, answers, id, "
        "gold_subquestions, gold_subanswers). Unmapped fields use the column of the same name.",
    )
    hub_config: Optional[str] = Field(None, description="Hub dataset config name, e.g. 'socratic' for openai/gsm8k.")
    hub_split: Optional[str] = Field(None, description="Hub split to read (default: split).")
    world: Optional[WorldConfig] = Field(None, description="The world's families only: the generator's settings (default: "
                                         "the embedded default's world); split is one of teacher, train, test.")

    @field_validator("dataset")
    @classmethod
    def _registered(cls, v: str) -> str:
        return datasets.check_name(v)

    @field_validator("path")
    @classmethod
    def _path_not_empty(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not v.strip():
            raise ValueError("path is empty")
        return v

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(GENERIC_FIELDS))
        if unknown:
            raise ValueError(f"unknown field(s) {unknown} in columns; allowed: {list(GENERIC_FIELDS)}")
        return v

    @model_validator(mode="after")
    def _columns_only_for_generic(self) -> "SourceConfig":
        if self.columns and self.dataset != "generic":
            raise ValueError(f"columns is only used with dataset 'generic', not {self.dataset!r}")
        return self

    @model_validator(mode="after")
    def _path_unless_generated(self) -> "SourceConfig":
        generated = datasets.get(self.dataset).generated
        if generated and self.path is not None:
            raise ValueError(f"{self.dataset} is generated (pipeline/data/world.py): remove path")
        if not generated and self.path is None:
            raise ValueError("path: missing required field")
        if generated and self.split not in WORLD_SPLITS:
            raise ValueError(f"split: {self.dataset} has the splits {list(WORLD_SPLITS)}, not {self.split!r}")
        if self.world is not None and not generated:
            raise ValueError(f"world is only used with the world's families, not {self.dataset!r}")
        return self

    @property
    def is_hub(self) -> bool:
        """``hf://<owner>/<name>`` is a hub dataset (read with ``datasets``); a longer ``hf://`` path is a
        file in a hub repository, read like any other storage URL."""
        return self.path is not None and self.path.startswith(HUB_PREFIX) and self.path[len(HUB_PREFIX):].strip("/").count("/") <= 1


# ------------------------------------------------------------------ files and formats
def resolve_format(src: SourceConfig) -> str:
    """The concrete format of ``src`` (raises ValueError when it cannot be inferred)."""
    if src.format != "auto":
        return src.format
    name = src.path.rstrip("/").lower()
    if name.endswith(".gz"):
        name = name[: -len(".gz")]
    for ext, fmt in _EXTENSIONS.items():
        if name.endswith(ext):
            return fmt
    raise UsageError(
        f"cannot infer the format of {src.path!r} from its extension; "
        f"set format to one of {list(FORMATS)} (known extensions: {sorted(_EXTENSIONS)}, optionally .gz)"
    )


def check_file(path: str) -> None:
    """Raise FileNotFoundError (naming ``path``) unless it is an existing file."""
    if not storage.exists(path):
        raise FileNotFoundError(f"source file not found: {path}")
    if storage.is_dir(path):
        raise UsageError(f"source path {path!r} is a directory; point it at a file")


def _open_text(path: str, newline: Optional[str] = "\n") -> io.TextIOWrapper:
    """A text stream of ``path``; ``.gz`` is inflated by Python's gzip (not a storage-level codec) so that a
    damaged file (:data:`FILE_DAMAGE`) can be told apart from an I/O error (an OSError of the storage)."""
    raw = storage.open_input(path)
    return io.TextIOWrapper(gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw, encoding="utf-8", newline=newline)


# A file whose bytes are damaged (not gzip, cut short, not UTF-8): its rows are quarantined, the job goes on.
FILE_DAMAGE = (EOFError, UnicodeDecodeError, zlib.error, gzip.BadGzipFile)


class SourceReadError(OSError):
    """Reading a source failed part-way for an I/O reason (storage gone after its retries): ``prepare``
    stops (exit 1) rather than write a silently truncated corpus. The message names the file and the
    last line or row read."""


def read_text(path: str) -> str:
    with _open_text(path) as f:
        return f.read()


# ------------------------------------------------------------------ records
@dataclass
class Record:
    """One unit of input before dataset-specific parsing."""

    position: int  # 0-based, used for positional ids
    location: str  # 1-based, for humans: "line 17", "row 3"
    raw: str
    value: Any = None
    error: Optional[str] = None  # set when the record itself could not be read


def _dumps(obj: Any) -> str:
    try:
        return json.dumps(obj, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(obj)


def iter_jsonl(path: str) -> Iterator[Record]:
    """One record per non-blank line; bad JSON or a non-object line is an error record."""
    with _open_text(path) as f:
        for i, line in enumerate(f):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            rec = Record(position=i, location=f"line {i + 1}", raw=line)
            try:
                rec.value = json.loads(line)
            except json.JSONDecodeError as e:
                rec.error = f"invalid JSON: {e}"
            else:
                if not isinstance(rec.value, dict):
                    rec.error = f"expected a JSON object, got {type(rec.value).__name__}"
            yield rec


def records_from_list(items: Iterable[Any]) -> Iterator[Record]:
    for i, item in enumerate(items):
        rec = Record(position=i, location=f"row {i + 1}", raw=_dumps(item), value=item)
        if not isinstance(item, dict):
            rec.error = f"expected a JSON object, got {type(item).__name__}"
        yield rec


def load_json_document(path: str) -> tuple[Any, Optional[str]]:
    """``(document, None)`` or ``(None, error)``. For a ``.json`` file that holds JSON lines
    (``Extra data`` after the first value) the document is the ``_JsonLinesMarker`` sentinel."""
    text = read_text(path)
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            return _JsonLinesMarker, None
        return None, f"invalid JSON document: {e}"


class _JsonLinesMarker:  # sentinel: the .json file is really JSON lines
    pass


def iter_json(path: str) -> Iterator[Record]:
    """Records of a JSON array of row objects (or of a .json file that is really JSONL)."""
    doc, err = load_json_document(path)
    return records_from_document(path, doc, err)


def records_from_document(path: str, doc: Any, err: Optional[str]) -> Iterator[Record]:
    """Records of an already loaded JSON document (see :func:`load_json_document`)."""
    if err is not None:
        yield Record(position=0, location="document", raw="", error=err)
        return
    if doc is _JsonLinesMarker:
        yield from iter_jsonl(path)
        return
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        yield Record(
            position=0,
            location="document",
            raw=_dumps(doc)[:10_000],
            error=f"expected a JSON array of row objects, got {type(doc).__name__}",
        )
        return
    yield from records_from_list(doc)


def _csv_line(row: list[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(row)
    return buf.getvalue()


def iter_csv_rows(path: str) -> Iterator[tuple[int, list[str], Optional[str]]]:
    """``(0-based row index, fields, error)`` for every non-empty CSV row, header included.
    A row the csv module cannot parse (e.g. a field over its size limit) has ``error`` set."""
    with _open_text(path, newline="") as f:
        reader = csv.reader(f)
        i = -1
        while True:
            i += 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield i, [], f"unreadable CSV row (ending at line {reader.line_num}): {e}"
                continue
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            yield i, row, None


def iter_csv(path: str) -> Iterator[Record]:
    """CSV with a header row; each data row becomes a dict of strings keyed by the header.
    A row with more or fewer fields than the header is an error record naming the columns."""
    header: Optional[list[str]] = None
    pos = 0
    for _, row, err in iter_csv_rows(path):
        if header is None and err is None:
            header = [h.strip() for h in row]
            if header and header[0].startswith("\ufeff"):
                header[0] = header[0][1:]
            continue
        rec = Record(position=pos, location=f"row {pos + 1}", raw=_csv_line(row))
        pos += 1
        if err is not None:
            rec.error = err
        elif header is None:
            rec.error = "CSV has no readable header row"
        elif len(row) < len(header):
            missing = ", ".join(repr(c) for c in header[len(row):])
            rec.error = f"row has {len(row)} fields but the header has {len(header)}: missing column(s) {missing}"
        elif len(row) > len(header):
            rec.error = f"row has {len(row)} fields but the header has {len(header)} columns"
        else:
            rec.value = dict(zip(header, row))
        yield rec


def iter_parquet(path: str, batch_size: int = 1024) -> Iterator[Record]:
    with storage.open_input(path) as f:
        pf = pq.ParquetFile(f)
        pos = 0
        for batch in pf.iter_batches(batch_size=batch_size):
            for row in batch.to_pylist():
                yield Record(position=pos, location=f"row {pos + 1}", raw=_dumps(row), value=row)
                pos += 1


def iter_records(path: str, fmt: str) -> Iterator[Record]:
    if fmt == "jsonl":
        return iter_jsonl(path)
    if fmt == "json":
        return iter_json(path)
    if fmt == "csv":
        return iter_csv(path)
    if fmt == "parquet":
        return iter_parquet(path)
    raise UsageError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}")


# ------------------------------------------------------------------ parsing
RowParser = Callable[[Any, int], Question]
"""``parser(row_value, position) -> Question``; raises RowError (naming the field) for a bad row."""

# Exceptions a row parser may leak on odd input; they are quarantined, never raised.
_ROW_EXCEPTIONS = (RowError, KeyError, TypeError, ValueError, AttributeError, IndexError)


def reject(source: str, location: str, raw: Any, error: str) -> Rejected:
    return Rejected(source=source, location=location, raw=raw if isinstance(raw, str) else _dumps(raw), error=error)


def parse_one(parser: RowParser, value: Any, position: int) -> Question:
    """Parse and validate one row (RowError on failure, with a clear message)."""
    try:
        return validate_question(parser(value, position))
    except RowError:
        raise
    except _ROW_EXCEPTIONS as e:
        raise RowError(f"{type(e).__name__}: {e}") from e


def parse_records(records: Iterable[Record], source: str, parser: RowParser) -> Iterator[Question | Rejected]:
    """Map records through ``parser``; unreadable or invalid rows and duplicate ids become Rejected."""
    seen: dict[str, str] = {}
    for rec in _read_or_stop(records, source):
        if rec.error is not None:
            yield reject(source, rec.location, rec.raw, rec.error)
            continue
        try:
            q = parse_one(parser, rec.value, rec.position)
        except RowError as e:
            yield reject(source, rec.location, rec.raw, str(e))
            continue
        first = seen.get(q.id)
        if first is not None:
            yield reject(source, rec.location, rec.raw, f"duplicate id {q.id!r} (first seen at {first})")
            continue
        seen[q.id] = rec.location
        yield q


def _read_or_stop(records: Iterable[Record], source: str) -> Iterator[Record]:
    """``records``, turning an I/O error part-way into :class:`SourceReadError` naming where it stopped."""
    it = iter(records)
    last = "before the first row"
    while True:
        try:
            rec = next(it)
        except StopIteration:
            return
        except FILE_DAMAGE:
            raise
        except OSError as e:
            raise SourceReadError(f"I/O error reading {source} after {last} (nothing written from it is complete; "
                                  f"rerun when the storage is reachable): {type(e).__name__}: {e}") from e
        last = rec.location
        yield rec


def take_good(rows: Iterator[Question | Rejected], limit: Optional[int]) -> Iterator[Question | Rejected]:
    """Pass rows through until ``limit`` Questions have been yielded (Rejected rows don't count)."""
    if limit is None:
        yield from rows
        return
    if limit <= 0:
        return
    good = 0
    for row in rows:
        yield row
        if isinstance(row, Question):
            good += 1
            if good >= limit:
                return


# ------------------------------------------------------------------ small field helpers
def require(obj: Any, name: str) -> Any:
    """``obj[name]`` or RowError("field 'name' is missing")."""
    if not isinstance(obj, dict):
        raise RowError(f"expected an object with field {name!r}, got {type(obj).__name__}")
    if name not in obj or obj[name] is None:
        raise RowError(f"field {name!r} is missing")
    return obj[name]


def require_str(obj: Any, name: str) -> str:
    v = require(obj, name)
    if not isinstance(v, str):
        raise RowError(f"field {name!r} must be a string, got {type(v).__name__}")
    return v


def as_answer(v: Any, name: str) -> str:
    """A gold answer as a string: strings as is, ints/floats via str(); anything else is an error."""
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise RowError(f"field {name!r} must hold strings, got {type(v).__name__}")


def as_answer_list(v: Any, name: str) -> list[str]:
    if isinstance(v, (list, tuple)):
        return [as_answer(a, name) for a in v]
    return [as_answer(v, name)]


def str_list(v: Any, name: str) -> list[str]:
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
        raise RowError(f"field {name!r} must be a list of strings")
    return list(v)


def dedupe(answers: Iterable[str]) -> list[str]:
    """Strip, drop empties and duplicates, keep first-seen order."""
    out: list[str] = []
    for a in answers:
        a = a.strip()
        if a and a not in out:
            out.append(a)
    return out


def source_id(value: Any, position: int) -> Any:
    """The row's own ``id`` when it has a usable one, else the 0-based position."""
    if isinstance(value, dict) and value.get("id") is not None:
        sid = value["id"]
        if isinstance(sid, bool) or not isinstance(sid, (int, str)):
            raise RowError(f"field 'id' must be a string or integer, got {type(sid).__name__}")
        if isinstance(sid, str) and not sid.strip():
            raise RowError("field 'id' is empty")
        return sid.strip() if isinstance(sid, str) else sid
    return position
