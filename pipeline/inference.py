"""``infer``: bulk offline inference of a two-stage (or single-stage) system over a dataset.

Modes:
* ``static``  (the paper's method): the decomposer writes every subquestion up front, then
  the solver answers them in order and gives the final answer: 2 calls per question.
* ``dynamic`` (self-ask style): the decomposer asks one follow-up at a time, the solver answers
  it, and the growing transcript goes back to the decomposer until it gives the final
  answer: 2 calls per step, with the context re-sent every step (the cost the paper compares).
* ``direct`` / ``cot``: single-stage baselines: the solver answers alone.

Every mode is a program of :mod:`pipeline.method` (the code ``solve`` and ``/v1/solve`` run too),
driven in batches: each round's calls of one stage are one ``generate`` on that stage's backend.
Backends are any of the project's (a local Hugging Face student, an OpenAI-compatible
endpoint such as our own serve app or vLLM, the offline reference). Each actor of the
Ray Data pool holds one decomposer and one solver; work is sharded and resumable like
``generate``. Every row is scored with the dataset's metric and carries token usage
split by decomposer and solver.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar, Optional

import pyarrow as pa
from pydantic import Field

from pipeline import method, prompts
from pipeline.backends import BackendConfig, SamplingParams, make_backend
from pipeline.backends.openai_batch import chunk_size
from pipeline.backends.reference import gold_pairs
from pipeline.config import UsageError
from pipeline.cost import ledger_usage, merge
from pipeline.job_config import ShardedJobConfig
from pipeline.manifest import Manifest
from pipeline.method import MethodConfig, Mode, Outcome, Usage
from pipeline.schema import QUESTION_SCHEMA
from pipeline.sharded import ShardWorker, chunks, finish_each, missing_fields, row_label, run_sharded_job, split_inputs
from pipeline.similarity import decomposition_similarity

log = logging.getLogger(__name__)

INFER_SCHEMA = pa.schema(
    list(QUESTION_SCHEMA)
    + [
        pa.field("request_id", pa.string()),
        pa.field("setting", pa.string()),
        pa.field("mode", pa.string()),
        pa.field("decomposer", pa.string()),
        pa.field("solver", pa.string()),
        pa.field("prompt_version", pa.string()),
        pa.field("subquestions", pa.list_(pa.string())),
        pa.field("decomposition_parsed", pa.bool_()),
        pa.field("subanswers", pa.list_(pa.string())),
        pa.field("decomposer_text", pa.string()),
        pa.field("solver_text", pa.string()),
        pa.field("prediction", pa.string()),
        pa.field("em", pa.float64()),
        pa.field("f1", pa.float64()),
        pa.field("correct", pa.bool_()),
        pa.field("rouge_l", pa.float64()),
        pa.field("count_match", pa.float64()),
        pa.field("decomposer_calls", pa.int64()),
        pa.field("solver_calls", pa.int64()),
        pa.field("decomposer_prompt_tokens", pa.int64()),
        pa.field("decomposer_completion_tokens", pa.int64()),
        pa.field("solver_prompt_tokens", pa.int64()),
        pa.field("solver_completion_tokens", pa.int64()),
        pa.field("latency_s", pa.float64()),
        pa.field("error", pa.string()),
    ]
)


class InferConfig(ShardedJobConfig):
    setting: str = Field(..., description="Label of this system in reports, e.g. 'student S_D-R + teacher solver'.")
    mode: Mode = "static"
    decomposer: Optional[BackendConfig] = Field(None, description="Required for static and dynamic modes.")
    solver: BackendConfig
    decomposer_sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(max_tokens=128))
    solver_sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(max_tokens=256))
    method: MethodConfig = Field(default_factory=MethodConfig)

    fingerprint_fields: ClassVar[tuple[str, ...]] = ("input", "setting", "mode", "decomposer", "solver", "decomposer_sampling",
                                                     "solver_sampling", "method")
    backend_fields: ClassVar[tuple[str, ...]] = ("decomposer", "solver")
    legacy_method_keys: ClassVar[dict[str, str]] = {k: k for k in ("decomposer_few_shot", "solver_few_shot", "max_dynamic_steps",
                                                                   "drop_f1_threshold")}



class InferWorker(ShardWorker):
    """Ray Data actor holding a decomposer and a solver: runs the system of ``cfg.mode``
    (:mod:`pipeline.method`) over a shard's questions, each stage's calls batched on its backend."""

    schema = INFER_SCHEMA

    def __init__(self, out_dir: str, cfg: InferConfig):
        super().__init__(out_dir)
        self.cfg = c = cfg
        self.solver = make_backend(c.solver, c.cache_dir, job_dir=out_dir)
        self.decomposer = make_backend(c.decomposer, c.cache_dir, job_dir=out_dir) if c.decomposer is not None else None
        self.call = method.on_backends({"decomposer": self.decomposer, "solver": self.solver},
                                       {"decomposer": c.decomposer_sampling, "solver": c.solver_sampling})
        self.batch_size = max(chunk_size(b, c.pool.batch_size) for b in (self.solver, self.decomposer) if b is not None)

    def process(self, rows):
        todo, bad = split_inputs(rows, lambda r: missing_fields(r, ("id", "question", "dataset")), method.input_problem)
        bad = [self._row(r, Outcome(), 0.0, error=r["error"]) for r in bad]  # quarantined before any call is spent
        good, usage = [], Usage()
        for chunk in chunks(todo, self.batch_size):
            t0 = time.perf_counter()
            outcomes = method.run_batched([method.program(self.cfg.mode, r, self.cfg.method) for r in chunk], self.call)
            latency = (time.perf_counter() - t0) / max(1, len(chunk))
            for o in outcomes:
                usage.merge(o.usage)
            g, b = finish_each(chunk, outcomes, lambda r, o: self._row(r, o, latency), "score",
                               on_error=lambda r, o, error: self._row(r, o, latency, error=error))
            good += g
            bad += b
        ledger = [ledger_usage(stage, backend, usage.stages[stage])
                  for stage, backend in (("decomposer", self.decomposer), ("solver", self.solver)) if backend is not None]
        return good, bad, merge(usage.counters(), *ledger)

    def _row(self, row: dict, o: Outcome, latency: float, error: Optional[str] = None) -> dict[str, Any]:
        """The output row of one question; one with an ``error`` is not scored (it counts as wrong)."""
        c = self.cfg
        error = error or (f"request {row_label(row)}: {o.error}" if o.error else None)
        if error:
            s, sim = {"em": 0.0, "f1": 0.0, "correct": False}, {}
        else:
            s = method.score(row, o.prediction, c.method.drop_f1_threshold)
            sim = decomposition_similarity(o.subquestions, gold_pairs(row)[0]) if o.subquestions is not None and row.get("gold_subquestions") else {}
        return {**{k: row.get(k) for k in QUESTION_SCHEMA.names}, "request_id": row["request_id"], "setting": c.setting,
                "mode": c.mode, "decomposer": self.decomposer.name if self.decomposer else None, "solver": self.solver.name,
                "prompt_version": prompts.PROMPT_VERSION, "subquestions": o.subquestions,
                "decomposition_parsed": o.decomposition_parsed, "subanswers": o.subanswers,
                "decomposer_text": o.decomposer_text, "solver_text": o.solver_text,
                "prediction": o.prediction, "em": s["em"], "f1": s["f1"], "correct": bool(s["correct"]),
                "rouge_l": sim.get("rouge_l"), "count_match": sim.get("count_match"), **o.usage.fields(),
                "latency_s": latency, "error": error}


def as_requests(rows):
    """One request per question; a row without an ``id`` gets ``input-row-<position>`` (and is quarantined)."""
    for i, row in enumerate(rows):
        yield {**row, "request_id": row.get("id") or f"input-row-{i}"}


def run(cfg: InferConfig) -> Manifest:
    """The infer job: the system of ``cfg`` (mode, decomposer, solver) over every question, each row scored.

    A rerun with the same config resumes: committed shards are kept, the rest are redone."""
    started = time.time()
    if cfg.mode in ("static", "dynamic") and cfg.decomposer is None:
        raise UsageError(f"mode {cfg.mode!r} needs a `decomposer` backend in the config")
    counts, usage, _ = run_sharded_job(cfg, as_requests(cfg.input.rows()), InferWorker, f"infer[{cfg.setting}]",
                                       started)
    manifest = Manifest.of("infer", cfg, inputs={"questions": cfg.input.path}, counts=counts, started_at=started,
                           usage=usage, extra={"setting": cfg.setting, "mode": cfg.mode}).write(cfg.output.dir)
    log.info("infer[%s] done: %s -> %s", cfg.setting, counts, cfg.output.dir)
    return manifest
