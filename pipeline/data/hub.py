"""Hugging Face hub sources: ``path: hf://<repo_id>`` (e.g. ``hf://openai/gsm8k`` with
``hub_config: socratic``). Rows are streamed with ``datasets.load_dataset(..., streaming=True)``
and mapped through the same row parsers as local files, so ids, answers and rejections
behave the same (positional ids are the 0-based row index in the hub split).

Needs the optional ``datasets`` package and network access; not exercised by the offline tests.
"""

from __future__ import annotations

import json
from typing import Iterator

from pipeline.config import UsageError
from pipeline.data.sources import HUB_PREFIX, Record, RowParser, SourceConfig, parse_records
from pipeline.schema import Question, Rejected


def repo_id(path: str) -> str:
    if not path.startswith(HUB_PREFIX) or not path[len(HUB_PREFIX):].strip("/"):
        raise UsageError(f"hub path must look like {HUB_PREFIX}<owner>/<name>, got {path!r}")
    return path[len(HUB_PREFIX):].strip("/")


def load_hub(src: SourceConfig, parser: RowParser) -> Iterator[Question | Rejected]:
    """Stream ``src`` from the hub through ``parser``. Raises ImportError at call time when
    ``datasets`` is missing."""
    try:
        import datasets  # lazy: optional (hf:// sources only), and slow to import
    except ImportError as e:
        raise ImportError("pip install datasets to load from the Hugging Face hub") from e
    repo = repo_id(src.path)
    ds = datasets.load_dataset(repo, src.hub_config, split=src.hub_split or src.split, streaming=True)

    def records() -> Iterator[Record]:
        for i, row in enumerate(ds):
            yield Record(position=i, location=f"row {i + 1}", raw=json.dumps(row, default=str), value=dict(row))

    return parse_records(records(), src.path, parser)
