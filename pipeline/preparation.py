"""``prepare``: raw corpora -> the normalized question schema, with quarantine."""

from __future__ import annotations

import logging
import time
from typing import Any

from pydantic import Field

from pipeline import storage, tables
from pipeline.config import Strict
from pipeline.data import SourceConfig, load_source
from pipeline.manifest import Manifest
from pipeline.schema import QUARANTINE_SCHEMA, QUESTION_SCHEMA, Question
from pipeline.sharded import split_storable, storable_rows

log = logging.getLogger(__name__)

CHUNK_ROWS = 5_000


class PrepareOutput(Strict):
    dir: str


class PrepareConfig(Strict):
    sources: list[SourceConfig] = Field(..., min_length=1)
    output: PrepareOutput


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Write every source's good rows to ``<out>/data`` and bad rows to ``<out>/quarantine``.

    Deterministic and cheap, so a rerun rewrites the output from scratch (no resume state).
    Duplicate ids across sources are quarantined (ids must be unique).
    """
    out = cfg.output.dir
    for sub in ("data", "quarantine"):
        if storage.exists(storage.join(out, sub)):
            storage.delete(storage.join(out, sub))
    counts: dict[str, Any] = {"rows_in": 0, "rows_out": 0, "quarantined": 0, "by_dataset": {}}
    seen: set[str] = set()
    for si, src in enumerate(cfg.sources):
        good: list[dict] = []
        bad: list[dict] = []
        part = 0

        def flush(final: bool = False) -> None:
            nonlocal good, bad, part
            good, unstorable = split_storable(good, QUESTION_SCHEMA)  # e.g. a lone surrogate from a JSON escape
            bad = storable_rows(bad + [{"source": src.path, "location": r["id"], "raw": r["question"], "error": why}
                                       for r, why in unstorable], QUARANTINE_SCHEMA)
            counts["rows_out"] -= len(unstorable)
            counts["quarantined"] += len(unstorable)
            for r, _ in unstorable:
                counts["by_dataset"][f"{src.dataset}/{src.split}"] -= 1
            if good or (final and part == 0):
                tables.write_rows(storage.join(out, "data", f"part-{si:03d}-{part:05d}.parquet"), good, QUESTION_SCHEMA)
            if bad:
                tables.write_rows(storage.join(out, "quarantine", f"part-{si:03d}-{part:05d}.parquet"), bad, QUARANTINE_SCHEMA)
            part += 1
            good, bad = [], []

        for item in load_source(src):
            counts["rows_in"] += 1
            if isinstance(item, Question):
                if item.id in seen:
                    bad.append({"source": src.path, "location": item.id, "raw": item.question, "error": f"duplicate id {item.id!r}"})
                else:
                    seen.add(item.id)
                    good.append(item.to_row())
                    key = f"{src.dataset}/{src.split}"
                    counts["by_dataset"][key] = counts["by_dataset"].get(key, 0) + 1
            else:
                bad.append(item.to_row())
            if len(good) + len(bad) >= CHUNK_ROWS:
                counts["rows_out"] += len(good)
                counts["quarantined"] += len(bad)
                flush()
        counts["rows_out"] += len(good)
        counts["quarantined"] += len(bad)
        flush(final=True)
        log.info("prepare: %s -> %s so far", src.path, counts["by_dataset"])
    return counts


def run(cfg: PrepareConfig) -> Manifest:
    """The prepare job: every source normalized into ``cfg.output.dir`` (a rerun rewrites it)."""
    started = time.time()
    counts = prepare(cfg)
    manifest = Manifest.of("prepare", cfg, inputs={"sources": [s.path for s in cfg.sources]}, counts=counts,
                           started_at=started).write(cfg.output.dir)
    log.info("prepare: %d rows in, %d out, %d quarantined -> %s", counts["rows_in"], counts["rows_out"],
             counts["quarantined"], cfg.output.dir)
    return manifest
