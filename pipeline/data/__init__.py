"""Dataset loaders: raw files (local, s3:// or hf://) -> ``Question`` / ``Rejected`` rows.

Usage::

    from pipeline.data import SourceConfig, load_source
    for row in load_source(SourceConfig(dataset="gsm8k", path="data/samples/gsm8k/test_socratic.jsonl")):
        ...  # Question (validated, stable id) or Rejected (source, location, raw, error)

``load_source`` checks the path and format eagerly (FileNotFoundError naming the path;
ValueError for a format it cannot infer; ImportError for hf:// without ``datasets``) and
then streams rows lazily. A malformed row never raises: it comes out as ``Rejected``.
``limit`` stops after that many good rows. See each module for its dataset's formats.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable, Iterator

from pipeline import datasets
from pipeline.data.hub import load_hub
from pipeline.data.sources import FILE_DAMAGE, RowParser, SourceConfig, SourceReadError, check_file, resolve_format, take_good
from pipeline.schema import Question, Rejected

def loader(dataset: str) -> ModuleType:
    """The loader module the registry names for ``dataset`` (``load(src)``, ``row_parser(src)``)."""
    return importlib.import_module(datasets.get(dataset).loader)


def row_parser(src: SourceConfig) -> RowParser:
    """The dataset's ``parser(row_dict, position) -> Question`` (raises RowError)."""
    return loader(src.dataset).row_parser(src)


def load_source(src: SourceConfig) -> Iterator[Question | Rejected]:
    """Questions and rejected rows of one source, in file order."""
    if datasets.get(src.dataset).generated:  # no file: the loader makes the rows
        return take_good(loader(src.dataset).load(src), src.limit)
    if src.is_hub:
        return take_good(load_hub(src, row_parser(src)), src.limit)
    resolve_format(src)
    check_file(src.path)
    load: Callable[[SourceConfig], Iterator[Question | Rejected]] = loader(src.dataset).load
    return take_good(_guard(load(src), src), src.limit)


def _guard(rows: Iterator[Question | Rejected], src: SourceConfig) -> Iterator[Question | Rejected]:
    """A damaged file (bad or truncated compression, bad encoding: deterministic, rerunning would not
    help) becomes one quarantined row naming it and why; the rows read before the damage are kept.
    An I/O error (:class:`SourceReadError`: storage unreachable after its retries) is raised: the job
    stops rather than report a silently truncated corpus as done."""
    try:
        yield from rows
    except SourceReadError:
        raise
    except FILE_DAMAGE as e:
        yield Rejected(source=src.path, location="file", raw="",
                       error=f"unreadable file (rows before this point were kept): {type(e).__name__}: {e}")


def load_questions(src: SourceConfig) -> tuple[list[Question], list[Rejected]]:
    """Convenience: everything from ``src`` split into ``(good, rejected)`` lists."""
    good: list[Question] = []
    bad: list[Rejected] = []
    for row in load_source(src):
        (good if isinstance(row, Question) else bad).append(row)
    return good, bad


__all__ = ["SourceConfig", "load_source", "load_questions", "loader", "row_parser"]
