"""Reading and writing Parquet row sets on any storage (:mod:`pipeline.storage`)."""

from __future__ import annotations

import io
import json
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import UsageError


def dataset_path(uri: str) -> str:
    """A job's output root resolves to its ``data/`` folder; anything else is used as given."""
    data = storage.join(uri, "data")
    if storage.is_dir(uri) and storage.exists(storage.join(uri, "manifest.json")):
        return data
    if storage.is_dir(data) and not storage.list_files(uri, ".parquet", recursive=False):
        return data
    return uri


def iter_rows(uri: str, columns: list[str] | None = None, batch_size: int = 1024) -> Iterator[dict[str, Any]]:
    """Stream rows of a Parquet file or directory (sorted file order, so the order is stable)."""
    path = dataset_path(uri)
    files = storage.list_files(path, ".parquet")
    if not files:
        if not storage.exists(path):
            raise FileNotFoundError(f"no such dataset: {uri}")
        return
    fs, _ = storage.arrow_filesystem(path)
    inner = [storage.inner_path(f) for f in files]
    try:
        ds = pads.dataset(inner, filesystem=fs, format="parquet")
        for batch in ds.to_batches(columns=columns, batch_size=batch_size):
            yield from batch.to_pylist()
    except pa.ArrowInvalid as e:  # a file that is not Parquet, or files that disagree: the input's fault
        raise UsageError(f"cannot read the rows of {uri}: {e}") from e


def read_rows(uri: str, columns: list[str] | None = None) -> list[dict[str, Any]]:
    return list(iter_rows(uri, columns=columns))


def column_names(uri: str) -> list[str]:
    """The columns of a Parquet dataset (from the first file's schema); FileNotFoundError without files."""
    files = storage.list_files(dataset_path(uri), ".parquet")
    if not files:
        raise FileNotFoundError(f"no such dataset: {uri}")
    return list(pq.ParquetFile(io.BytesIO(storage.read_bytes(files[0]))).schema_arrow.names)


def count_rows(uri: str | None) -> int:
    """Rows of a Parquet dataset, from the files' metadata (0 for no path: an optional input left unset)."""
    if not uri:
        return 0
    path = dataset_path(uri)
    return sum(pq.ParquetFile(io.BytesIO(storage.read_bytes(f))).metadata.num_rows for f in storage.list_files(path, ".parquet"))


def write_rows(uri: str, rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> None:
    """Write one Parquet file (atomically: see :func:`pipeline.storage.write_bytes`)."""
    table = pa.Table.from_pylist(rows, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())


def write_jsonl(uri: str, rows: list[dict[str, Any]]) -> None:
    storage.write_text(uri, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
