"""``generate``: the teacher writes decompositions for every (question, sample index).

Rows are expanded to one request per sample, staged as shards, and run on a Ray Data
actor pool whose actors each hold one teacher backend. Each output row records the
subquestions, the raw text, the teacher and prompt version, the sampling parameters,
token usage and latency; unparseable outputs and backend errors go to quarantine.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar, Optional

import pyarrow as pa
from pydantic import Field

from pipeline.backends import Request, SamplingParams, make_backend
from pipeline.backends.openai_batch import chunk_size
from pipeline.cost import ledger_usage
from pipeline.config import BackendConfig, SamplingConfig
from pipeline.manifest import Manifest
from pipeline.outputs import ShardedJobConfig, filtered_rows
from pipeline.parsing import ParseError
from pipeline.prompts import PROMPT_VERSION, decomposer_messages
from pipeline.schema import QUESTION_SCHEMA
from pipeline.sharded import ShardWorker, exception_cause, row_error, run_sharded_job
from pipeline.structured import parse_decomposition

log = logging.getLogger(__name__)

USAGE_FIELDS = [
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("latency_s", pa.float64()),
    pa.field("cached", pa.bool_()),
]

GENERATE_SCHEMA = pa.schema(
    list(QUESTION_SCHEMA)
    + [
        pa.field("request_id", pa.string()),
        pa.field("sample_index", pa.int64()),
        pa.field("subquestions", pa.list_(pa.string())),
        pa.field("raw_text", pa.string()),
        pa.field("teacher", pa.string()),
        pa.field("prompt_version", pa.string()),
        pa.field("temperature", pa.float64()),
        pa.field("top_p", pa.float64()),
        pa.field("max_tokens", pa.int64()),
        pa.field("seed", pa.int64()),
    ]
    + USAGE_FIELDS
    + [pa.field("error", pa.string())]
)


class GenerateConfig(ShardedJobConfig):
    teacher: BackendConfig
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    few_shot: bool = Field(True, description="Include the worked demonstrations in the teacher prompt.")
    max_subquestions: int = Field(10, ge=1)

    fingerprint_fields: ClassVar[tuple[str, ...]] = ("input", "teacher", "sampling", "few_shot")
    backend_fields: ClassVar[tuple[str, ...]] = ("teacher",)


def expand_samples(rows, n: int):
    """One request per (question, sample index), with a stable ``request_id``. A row without an ``id``
    gets ``input-row-<position>#k`` so that it reaches a shard and is quarantined there, naming it."""
    for i, row in enumerate(rows):
        for k in range(n):
            yield {**row, "request_id": f"{row.get('id') or f'input-row-{i}'}#{k}", "sample_index": k}


def input_problem(row: dict[str, Any], required: tuple[str, ...] = ("id", "question")) -> Optional[str]:
    """Why an input row cannot be worked on (a required field missing or empty), else None."""
    missing = [f for f in required if row.get(f) is None or row.get(f) == ""]
    return f"input row has no {' or '.join(repr(f) for f in missing)}" if missing else None


def usage_of(completions) -> dict[str, float]:
    return {
        "prompt_tokens": sum(c.prompt_tokens for c in completions),
        "completion_tokens": sum(c.completion_tokens for c in completions),
        "cached": sum(1 for c in completions if c.cached),
        "truncated_prompts": sum(1 for c in completions if c.prompt_truncated),
        "latency_s": sum(c.latency_s for c in completions),
    }


def completion_fields(c) -> dict[str, Any]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "latency_s": c.latency_s, "cached": c.cached}


class DecomposeWorker(ShardWorker):
    """Ray Data actor: holds one teacher backend, decomposes the rows of a shard."""

    schema = GENERATE_SCHEMA

    def __init__(self, out_dir: str, cfg: GenerateConfig):
        super().__init__(out_dir)
        self.backend = make_backend(cfg.teacher, cfg.cache_dir, job_dir=out_dir)
        self.params = SamplingParams.from_config(cfg.sampling)
        self.few_shot = cfg.few_shot
        self.max_subquestions = cfg.max_subquestions
        self.batch_size = chunk_size(self.backend, cfg.pool.batch_size)  # a Batch-API teacher takes the whole shard

    def process(self, rows):
        good, bad, completions = [], [], []
        todo = []
        for r in rows:
            problem = input_problem(r)
            if problem:
                bad.append({**r, "error": row_error(r, "input", problem)})
            else:
                todo.append(r)
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            reqs = [Request(messages=decomposer_messages(r, few_shot=self.few_shot), sample_index=int(r["sample_index"]),
                            row=r, role="decomposer") for r in chunk]
            outs = self.backend.generate(reqs, self.params)
            completions.extend(outs)
            for row, c in zip(chunk, outs):
                try:
                    out = self.finish(row, c)
                except Exception as e:  # per row: anything odd in this answer quarantines this row only
                    out = {**row, "error": row_error(row, "parse", exception_cause(e))}
                (bad if out["error"] else good).append(out)
        return good, bad, {**usage_of(completions), **ledger_usage("decomposer", self.backend, completions)}

    def finish(self, row: dict[str, Any], c) -> dict[str, Any]:
        """The output row for one completion (``error`` set: it goes to quarantine)."""
        out = {**row, "raw_text": c.text, "teacher": self.backend.name, "prompt_version": PROMPT_VERSION,
               "temperature": self.params.temperature, "top_p": self.params.top_p,
               "max_tokens": self.params.max_tokens, "seed": self.params.seed + int(row["sample_index"]),
               **completion_fields(c), "subquestions": None, "error": None}
        if c.error:
            out["error"] = f"teacher error for request {row['request_id']}: {c.error}"
            return out
        try:
            out["subquestions"] = parse_decomposition(c.text, self.max_subquestions)
        except ParseError as e:
            out["error"] = f"parse error for request {row['request_id']}: {e}"
        return out


def run(cfg: GenerateConfig) -> Manifest:
    """The generate job: every (question, sample) decomposed by the teacher into ``cfg.output.dir``.

    A rerun with the same config resumes: committed shards are kept, the rest are redone."""
    started = time.time()
    requests = expand_samples(filtered_rows(cfg.input), cfg.sampling.n)
    counts, usage, _ = run_sharded_job(cfg, requests, DecomposeWorker, "generate", started)
    manifest = Manifest.of("generate", cfg, inputs={"questions": cfg.input.path}, counts=counts, started_at=started,
                           usage=usage).write(cfg.output.dir)
    log.info("generate done: %s | tokens %d | est. cost %.4f %s -> %s", counts, usage["total_tokens"],
             usage["estimated_cost"], usage["currency"], cfg.output.dir)
    return manifest
