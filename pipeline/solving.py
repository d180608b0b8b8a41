"""``solve``: the second stage, a solver answers every decomposition (static two-stage reasoning).

Input is a ``generate`` output (or any row set with ``request_id``, ``dataset``,
``question``, ``context``, ``answers`` and ``subquestions``); ``request_id`` is already
unique, so each input row is one work unit (no expansion). Each row runs the method's second
stage, :func:`pipeline.method.solve_given` (the same code ``infer`` and ``/v1/solve`` run): one
solver call answers the subquestions in order ("A1: ...", each answer may use the earlier ones
in the same generation) and ends with "The answer is: ...". The output row keeps every input
column and adds the subanswers, the extracted final answer (``prediction``), the raw solver
text, the solver model and prompt version, the solver's token usage and latency, and the
scores (``em``, ``f1``, ``correct``) by the dataset's metric.

Failure policy:

* a backend error (``Completion.error``) goes to quarantine with an ``error`` naming the
  ``request_id``; an unreachable backend (:class:`BackendUnavailable`) stops the job and
  a rerun resumes it.
* a solver output with no final answer is *not* quarantined: in evaluation terms it is a
  wrong prediction, and dropping it would inflate accuracy and bias rejection sampling.
  The row is kept with ``prediction=None`` (scored ``correct=False``) and a
  ``parse_warning``. A missing "The answer is:" marker on GSM8K falls back to the last
  number (:func:`~pipeline.method.read_solution`), also with a ``parse_warning``, as
  does a solver that answered a different number of subquestions than it was given.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any, ClassVar, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from pipeline import method, storage, tables
from pipeline.backends import BackendConfig, SamplingParams, make_backend
from pipeline.backends.openai_batch import chunk_size
from pipeline.config import UsageError
from pipeline.cost import ledger_usage
from pipeline.generation import GENERATE_SCHEMA
from pipeline.job_config import ShardedJobConfig
from pipeline.manifest import Manifest
from pipeline.method import MethodConfig, Outcome, Usage
from pipeline.prompts import PROMPT_VERSION
from pipeline.sharded import ShardWorker, chunks, finish_each, missing_fields, row_label, run_sharded_job, split_inputs

log = logging.getLogger(__name__)

# Input columns a solve needs.
REQUIRED_INPUT_COLUMNS = ("request_id", "id", "dataset", "question", "answers", "subquestions")

SOLVE_FIELDS = [
    pa.field("subanswers", pa.list_(pa.string())),
    pa.field("prediction", pa.string()),
    pa.field("solver_raw_text", pa.string()),
    pa.field("solver", pa.string()),
    pa.field("solver_prompt_version", pa.string()),
    pa.field("solver_prompt_tokens", pa.int64()),
    pa.field("solver_completion_tokens", pa.int64()),
    pa.field("solver_latency_s", pa.float64()),
    pa.field("solver_cached", pa.bool_()),
    pa.field("em", pa.float64()),
    pa.field("f1", pa.float64()),
    pa.field("correct", pa.bool_()),
    pa.field("parse_warning", pa.string()),
]
_SOLVE_NAMES = {f.name for f in SOLVE_FIELDS} | {"error"}


def solve_schema(input_schema: pa.Schema = GENERATE_SCHEMA) -> pa.Schema:
    """Every input column (in input order, less any solve column it already has) + the solve columns + ``error``."""
    kept = [f for f in input_schema if f.name not in _SOLVE_NAMES]
    return pa.schema(kept + SOLVE_FIELDS + [pa.field("error", pa.string())])


SOLVE_SCHEMA = solve_schema(GENERATE_SCHEMA)


class SolveConfig(ShardedJobConfig):
    solver: BackendConfig
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    method: MethodConfig = Field(default_factory=MethodConfig, description="Uses solver_few_shot and drop_f1_threshold.")

    fingerprint_fields: ClassVar[tuple[str, ...]] = ("input", "solver", "sampling", "method.solver_few_shot",
                                                     "method.drop_f1_threshold")
    backend_fields: ClassVar[tuple[str, ...]] = ("solver",)
    legacy_method_keys: ClassVar[dict[str, str]] = {"few_shot": "solver_few_shot", "drop_f1_threshold": "drop_f1_threshold"}


    @field_validator("sampling")
    @classmethod
    def _one_solve_per_decomposition(cls, v: SamplingParams) -> SamplingParams:
        if v.n != 1:
            raise ValueError("solve answers each decomposition once: sampling.n must be 1 "
                             "(sample more decompositions in generate instead)")
        return v


def input_schema(path: str) -> pa.Schema:
    """The schema of an input row set (a job output root, a Parquet dir or file; local or s3://)."""
    files = storage.list_files(tables.dataset_path(path), ".parquet")
    if not files:
        raise FileNotFoundError(f"no Parquet input rows under {path}")
    schema = pq.ParquetFile(io.BytesIO(storage.read_bytes(files[0]))).schema_arrow
    missing = [c for c in REQUIRED_INPUT_COLUMNS if c not in schema.names]
    if missing:
        raise UsageError(f"solve input {path} lacks column(s) {missing}: expected a generate output "
                         f"(columns {list(REQUIRED_INPUT_COLUMNS)})")
    return schema


def _score_keys(dataset: str) -> dict[str, str]:
    return {k: f"acc.{dataset}.{k}" for k in ("n", "correct", "em", "f1", "no_answer", "quarantined")}


class SolveWorker(ShardWorker):
    """Ray Data actor: holds one solver backend, solves and scores the rows of a shard."""

    schema = SOLVE_SCHEMA

    def __init__(self, out_dir: str, cfg: SolveConfig, schema: Optional[pa.Schema] = None):
        super().__init__(out_dir)
        if schema is not None:
            self.schema = schema
        self.backend = make_backend(cfg.solver, cfg.cache_dir, job_dir=out_dir)
        self.call = method.on_backends({"solver": self.backend}, {"solver": cfg.sampling})
        self.method = cfg.method
        self.batch_size = chunk_size(self.backend, cfg.pool.batch_size)  # a Batch-API solver takes the whole shard

    def finish(self, row: dict[str, Any], o: Outcome) -> dict[str, Any]:
        """The output row of one solved decomposition (``error`` set: it goes to quarantine)."""
        t = o.usage.stages["solver"]
        out = {**row, "subanswers": None, "prediction": None, "solver_raw_text": o.solver_text, "solver": self.backend.name,
               "solver_prompt_version": PROMPT_VERSION, "solver_prompt_tokens": t.prompt_tokens,
               "solver_completion_tokens": t.completion_tokens, "solver_latency_s": t.latency_s,
               "solver_cached": t.cached_calls > 0, "em": None, "f1": None, "correct": None, "parse_warning": None, "error": None}
        if o.error:
            out["error"] = f"request {row_label(row)}: {o.error}"
            return out
        s = method.score(row, o.prediction, self.method.drop_f1_threshold)
        out.update(subanswers=o.subanswers, prediction=o.prediction, em=float(s["em"]), f1=float(s["f1"]),
                   correct=bool(s["correct"]), parse_warning=o.warning)
        return out

    def process(self, rows):
        todo, bad = split_inputs(rows, lambda r: missing_fields(r, ("request_id", "question")), _no_decomposition,
                                 method.input_problem)
        good, usage = [], Usage()
        for chunk in chunks(todo, self.batch_size):
            programs = [method.solve_given(r, list(r["subquestions"]), self.method) for r in chunk]
            outcomes = method.run_batched(programs, self.call)
            for o in outcomes:
                usage.merge(o.usage)
            g, b = finish_each(chunk, outcomes, self.finish, "score")  # an odd answer or gold field: this row only
            good += g
            bad += b
        return good, bad, {**usage.counters(), **accuracy_counters(good, bad),
                           **ledger_usage("solver", self.backend, usage.stages["solver"])}


def _no_decomposition(row: dict[str, Any]) -> Optional[str]:
    return "input row has no subquestions" if row.get("subquestions") is None else None


def accuracy_counters(good: list[dict], bad: list[dict]) -> dict[str, float]:
    """Per-dataset counters for a shard's commit marker (summed over committed shards later)."""
    agg: dict[str, float] = {}

    def add(key: str, v: float) -> None:
        agg[key] = agg.get(key, 0.0) + v

    for r in good:
        k = _score_keys(str(r["dataset"]))
        add(k["n"], 1)
        add(k["correct"], 1 if r["correct"] else 0)
        add(k["em"], r["em"] or 0.0)
        add(k["f1"], r["f1"] or 0.0)
        add(k["no_answer"], 1 if r["prediction"] is None else 0)
        add("parse_warnings", 1 if r["parse_warning"] else 0)
    for r in bad:
        add(_score_keys(str(r.get("dataset")))["quarantined"], 1)
    return agg


def accuracy_summary(totals: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{dataset: {n, answered, coverage, correct, accuracy, em, f1, no_answer, quarantined}}`` plus ``"all"``.

    ``n`` counts every question (answered or quarantined) and is the denominator of accuracy, EM
    and F1: a quarantined row counts as wrong, as in the paper, so a system that fails more rows
    cannot score higher. ``coverage`` (answered / n) is shown beside it.
    """
    by: dict[str, dict[str, float]] = {}
    for key, v in totals.items():
        if key.startswith("acc.") and key.count(".") >= 2:
            _, rest = key.split(".", 1)
            dataset, name = rest.rsplit(".", 1)
            by.setdefault(dataset, {})[name] = v
    out: dict[str, dict[str, float]] = {}
    names = ("n", "correct", "em", "f1", "no_answer", "quarantined")
    all_ = {name: 0.0 for name in names}
    for dataset in sorted(by):
        d = {name: by[dataset].get(name, 0.0) for name in names}
        for name in names:
            all_[name] += d[name]
        out[dataset] = _finish_summary(d)
    if out:
        out["all"] = _finish_summary(all_)
    return out


def _finish_summary(d: dict[str, float]) -> dict[str, float]:
    answered, n = d["n"], d["n"] + d["quarantined"]  # the shard counter "n" counts answered rows
    return {"n": int(n), "answered": int(answered), "correct": int(d["correct"]), "no_answer": int(d["no_answer"]),
            "quarantined": int(d["quarantined"]),
            "accuracy": round(d["correct"] / n, 6) if n else 0.0,
            "coverage": round(answered / n, 6) if n else 0.0,
            "em": round(d["em"] / n, 6) if n else 0.0,
            "f1": round(d["f1"] / n, 6) if n else 0.0}


def run(cfg: SolveConfig) -> Manifest:
    """The solve job: every decomposition in ``cfg.input.path`` answered by the solver and scored.

    A rerun with the same config resumes: committed shards are kept, the rest are redone."""
    started = time.time()
    schema = solve_schema(input_schema(cfg.input.path))
    counts, usage, totals = run_sharded_job(cfg, cfg.input.rows(), SolveWorker, "solve", started, schema=schema)
    accuracy = accuracy_summary(totals)
    counts["parse_warnings"] = int(totals.get("parse_warnings", 0))
    manifest = Manifest.of("solve", cfg, inputs={"decompositions": cfg.input.path}, counts=counts, started_at=started,
                           usage=usage, extra={"accuracy": accuracy}).write(cfg.output.dir)
    log.info("solve done: %s | accuracy %s | tokens %d | est. cost %.4f %s -> %s", counts,
             {k: v["accuracy"] for k, v in accuracy.items()}, usage["total_tokens"], usage["estimated_cost"],
             usage["currency"], cfg.output.dir)
    return manifest
