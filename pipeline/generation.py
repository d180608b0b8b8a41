"""``generate``: the teacher writes decompositions for every (question, sample index).

Rows are expanded to one request per sample, staged as shards, and run on a Ray Data
actor pool whose actors each hold one teacher backend. Each output row records the
subquestions, the raw text, the teacher and prompt version, the sampling parameters,
token usage and latency; unparseable outputs and backend errors go to quarantine.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import Field

from pipeline.backends import BackendConfig, SamplingParams, make_backend
from pipeline.backends.openai_batch import chunk_size
from pipeline.cost import ledger_usage
from pipeline.job_config import ShardedJobConfig
from pipeline.manifest import Manifest
from pipeline.method import MethodConfig, Usage, decompose_call, requests_of
from pipeline.parsing import ParseError
from pipeline.prompts import PROMPT_VERSION
from pipeline.schema import QUESTION_SCHEMA
from pipeline.sharded import ShardWorker, chunks, finish_each, missing_fields, run_sharded_job, split_inputs
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


class TeacherMethod(MethodConfig, frozen=True):
    decomposer_few_shot: bool = Field(True, description="Worked demos in the teacher's prompt (a teacher is not trained "
                                                        "on the prompt, so it wants them).")


class GenerateConfig(ShardedJobConfig):
    teacher: BackendConfig
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    method: TeacherMethod = Field(default_factory=TeacherMethod, description="Uses decomposer_few_shot and max_subquestions.")

    fingerprint_fields: ClassVar[tuple[str, ...]] = ("input", "teacher", "sampling", "method.decomposer_few_shot",
                                                     "method.max_subquestions")
    backend_fields: ClassVar[tuple[str, ...]] = ("teacher",)
    legacy_method_keys: ClassVar[dict[str, str]] = {"few_shot": "decomposer_few_shot", "max_subquestions": "max_subquestions"}



def expand_samples(rows, n: int):
    """One request per (question, sample index), with a stable ``request_id``. A row without an ``id``
    gets ``input-row-<position>#k`` so that it reaches a shard and is quarantined there, naming it."""
    for i, row in enumerate(rows):
        for k in range(n):
            yield {**row, "request_id": f"{row.get('id') or f'input-row-{i}'}#{k}", "sample_index": k}


def completion_fields(c) -> dict[str, Any]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "latency_s": c.latency_s, "cached": c.cached}


class DecomposeWorker(ShardWorker):
    """Ray Data actor: holds one teacher backend, decomposes the rows of a shard."""

    schema = GENERATE_SCHEMA

    def __init__(self, out_dir: str, cfg: GenerateConfig):
        super().__init__(out_dir)
        self.backend = make_backend(cfg.teacher, cfg.cache_dir, job_dir=out_dir)
        self.params = cfg.sampling
        self.method = cfg.method
        self.batch_size = chunk_size(self.backend, cfg.pool.batch_size)  # a Batch-API teacher takes the whole shard

    def process(self, rows):
        todo, bad = split_inputs(rows, lambda r: missing_fields(r, ("id", "question")))
        good, usage = [], Usage()
        for chunk in chunks(todo, self.batch_size):
            outs = self.backend.generate(requests_of([decompose_call(r, self.method) for r in chunk]), self.params)
            for c in outs:
                usage.add("decomposer", c)
            g, b = finish_each(chunk, outs, self.finish, "parse")  # anything odd in one answer quarantines its row only
            good += g
            bad += b
        return good, bad, {**usage.counters(), **ledger_usage("decomposer", self.backend, usage.stages["decomposer"])}

    def finish(self, row: dict[str, Any], c) -> dict[str, Any]:
        """The output row for one completion (``error`` set: it goes to quarantine)."""
        out = {**row, "raw_text": c.text, "teacher": self.backend.name, "prompt_version": PROMPT_VERSION,
               "temperature": self.params.temperature, "top_p": self.params.top_p,
               "max_tokens": self.params.max_tokens, "seed": self.params.seed + int(row["sample_index"]),
               **completion_fields(c), "subquestions": None, "error": None}
        if c.error:
            out["error"] = f"teacher error for request {row['request_id']}: {c.error}"
            return out
        try:  # unlike the method's reading (no list: "no decomposition"), a teacher's unparseable reply is no training data
            out["subquestions"] = parse_decomposition(c.text, self.method.max_subquestions)
        except ParseError as e:
            out["error"] = f"parse error for request {row['request_id']}: {e}"
        return out


def run(cfg: GenerateConfig) -> Manifest:
    """The generate job: every (question, sample) decomposed by the teacher into ``cfg.output.dir``.

    A rerun with the same config resumes: committed shards are kept, the rest are redone."""
    started = time.time()
    requests = expand_samples(cfg.input.rows(), cfg.sampling.n)
    counts, usage, _ = run_sharded_job(cfg, requests, DecomposeWorker, "generate", started)
    manifest = Manifest.of("generate", cfg, inputs={"questions": cfg.input.path}, counts=counts, started_at=started,
                           usage=usage).write(cfg.output.dir)
    log.info("generate done: %s | tokens %d | est. cost %.4f %s -> %s", counts, usage["total_tokens"],
             usage["estimated_cost"], usage["currency"], cfg.output.dir)
    return manifest
