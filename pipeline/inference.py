"""``infer``: bulk offline inference of a two-stage (or single-stage) system over a dataset.

Modes:
* ``static``  (the paper's method): the decomposer writes every subquestion up front, then
  the solver answers them in order and gives the final answer: 2 calls per question.
* ``dynamic`` (self-ask style): the decomposer asks one follow-up at a time, the solver answers
  it, and the growing transcript goes back to the decomposer until it gives the final
  answer: 2 calls per step, with the context re-sent every step (the cost the paper compares).
* ``direct`` / ``cot``: single-stage baselines: the solver answers alone.

Backends are any of the project's (a local Hugging Face student, an OpenAI-compatible
endpoint such as our own serve app or vLLM, the offline reference). Each actor of the
Ray Data pool holds one decomposer and one solver; work is sharded and resumable like
``generate``. Every row is scored with the dataset's metric and carries token usage
split by decomposer and solver.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar, Literal, Optional

import pyarrow as pa
from pydantic import Field

from pipeline import metrics, prompts
from pipeline.backends import Request, SamplingParams, make_backend
from pipeline.backends.openai_batch import chunk_size
from pipeline.backends.reference import gold_pairs
from pipeline.cost import backend_mode, ledger_counts, merge
from pipeline.config import BackendConfig, SamplingConfig, UsageError
from pipeline.generation import input_problem
from pipeline.manifest import Manifest
from pipeline.outputs import ShardedJobConfig, filtered_rows
from pipeline.parsing import ParseError, extract_answer, parse_dynamic_step, parse_solver_output
from pipeline.schema import QUESTION_SCHEMA
from pipeline.sharded import ShardWorker, exception_cause, row_error, run_sharded_job
from pipeline.similarity import decomposition_similarity
from pipeline.structured import parse_decomposition

log = logging.getLogger(__name__)

Mode = Literal["static", "dynamic", "direct", "cot"]

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
    decomposer_sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_tokens=128))
    solver_sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_tokens=256))
    decomposer_few_shot: bool = Field(False, description="Students are trained zero-shot; teachers want the demos.")
    solver_few_shot: bool = True
    max_dynamic_steps: int = Field(6, ge=1)
    drop_f1_threshold: float = Field(0.5, ge=0.0, le=1.0)

    fingerprint_fields: ClassVar[tuple[str, ...]] = ("input", "setting", "mode", "decomposer", "solver", "decomposer_sampling",
                                                     "solver_sampling", "decomposer_few_shot", "solver_few_shot")
    backend_fields: ClassVar[tuple[str, ...]] = ("decomposer", "solver")


class _Tally:
    def __init__(self) -> None:
        self.calls = {"decomposer": 0, "solver": 0}
        self.tokens = {k: [0, 0] for k in ("decomposer", "solver")}
        self.truncated = 0

    def add(self, role: str, c) -> None:
        self.truncated += int(c.prompt_truncated)
        self.calls[role] += 1
        self.tokens[role][0] += c.prompt_tokens
        self.tokens[role][1] += c.completion_tokens

    def fields(self) -> dict[str, int]:
        return {"decomposer_calls": self.calls["decomposer"], "solver_calls": self.calls["solver"],
                "decomposer_prompt_tokens": self.tokens["decomposer"][0], "decomposer_completion_tokens": self.tokens["decomposer"][1],
                "solver_prompt_tokens": self.tokens["solver"][0], "solver_completion_tokens": self.tokens["solver"][1]}


class InferWorker(ShardWorker):
    """Ray Data actor holding a decomposer and a solver; runs one question at a time per stage batch."""

    schema = INFER_SCHEMA

    def __init__(self, out_dir: str, cfg: InferConfig):
        super().__init__(out_dir)
        self.cfg = c = cfg
        self.solver = make_backend(c.solver, c.cache_dir, job_dir=out_dir)
        self.decomposer = make_backend(c.decomposer, c.cache_dir, job_dir=out_dir) if c.decomposer is not None else None
        self.dec_params = SamplingParams.from_config(c.decomposer_sampling)
        self.sol_params = SamplingParams.from_config(c.solver_sampling)
        self.batch_size = max(chunk_size(b, c.pool.batch_size) for b in (self.solver, self.decomposer) if b is not None)

    # ---- one stage over many rows: batched backend calls ----
    def _call(self, backend, role: str, rows: list[dict], messages: list, params) -> list:
        reqs = [Request(messages=m, row=r, role=role, sample_index=0) for r, m in zip(rows, messages)]
        return backend.generate(reqs, params)

    def _static(self, rows: list[dict], states: list[dict]) -> None:
        c = self.cfg
        outs = self._call(self.decomposer, "decomposer", rows, [prompts.decomposer_messages(r, few_shot=c.decomposer_few_shot) for r in rows], self.dec_params)
        for st, o in zip(states, outs):
            st["tally"].add("decomposer", o)
            st["decomposer_text"] = o.text
            if o.error:
                st["error"] = f"decomposer error: {o.error}"
                continue
            try:
                st["subquestions"], st["decomposition_parsed"] = parse_decomposition(o.text), True
            except ParseError:  # an unparseable decomposition counts as "no decomposition" and is recorded
                st["subquestions"], st["decomposition_parsed"] = [], False
        live = [(r, st) for r, st in zip(rows, states) if not st.get("error")]
        if not live:
            return
        lrows = [{**r, "subquestions": st["subquestions"]} for r, st in live]
        outs = self._call(self.solver, "solver", lrows, [prompts.solver_messages(r, r["subquestions"], few_shot=c.solver_few_shot) for r in lrows], self.sol_params)
        for (r, st), o in zip(live, outs):
            self._finish_solver(r, st, o)

    def _single(self, rows: list[dict], states: list[dict]) -> None:
        build = prompts.direct_messages if self.cfg.mode == "direct" else prompts.cot_messages
        outs = self._call(self.solver, "direct", rows, [build(r, few_shot=self.cfg.solver_few_shot) for r in rows], self.sol_params)
        for r, st, o in zip(rows, states, outs):
            self._finish_solver(r, st, o)

    def _finish_solver(self, row: dict, st: dict, o) -> None:
        st["tally"].add("solver", o)
        st["solver_text"] = o.text
        if o.error:
            st["error"] = f"solver error: {o.error}"
            return
        subanswers, _ = parse_solver_output(o.text)
        st["subanswers"] = subanswers
        st["prediction"] = extract_answer(o.text, row["dataset"])

    def _dynamic(self, rows: list[dict], states: list[dict]) -> None:
        c = self.cfg
        for st in states:
            st.update(history=[], subquestions=[], subanswers=[], decomposition_parsed=True)
        active = list(range(len(rows)))
        for _ in range(c.max_dynamic_steps):
            if not active:
                break
            arows = [{**rows[i], "history": states[i]["history"]} for i in active]
            outs = self._call(self.decomposer, "dynamic_decomposer", arows,
                              [prompts.dynamic_messages(r, r["history"], few_shot=c.decomposer_few_shot) for r in arows], self.dec_params)
            asking = []
            for i, o in zip(active, outs):
                st = states[i]
                st["tally"].add("decomposer", o)
                st["decomposer_text"] = (st.get("decomposer_text") or "") + o.text + "\n"
                try:
                    kind, text = parse_dynamic_step(o.text) if not o.error else ("error", o.error)
                except ParseError:
                    kind, text = "final", None
                    st["decomposition_parsed"] = False
                if kind == "followup":
                    asking.append((i, text))
                elif kind == "error":
                    st["error"] = f"decomposer error: {text}"
                else:
                    st["prediction"] = text
            if asking:
                qrows = [{**rows[i], "history": states[i]["history"]} for i, _ in asking]
                outs = self._call(self.solver, "dynamic_solver", qrows,
                                  [prompts.dynamic_answer_messages(r, r["history"], q, few_shot=c.solver_few_shot)
                                   for r, (_, q) in zip(qrows, asking)], self.sol_params)
                for (i, q), o in zip(asking, outs):
                    states[i]["tally"].add("solver", o)
                    states[i]["history"].append((q, o.text.strip()))
                    states[i]["subquestions"].append(q)
                    states[i]["subanswers"].append(o.text.strip())
            active = [i for i, _ in asking]

    def process(self, rows):
        c = self.cfg
        good, bad = [], []
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "truncated_prompts": 0}
        todo = []
        for row in rows:
            problem = _input_problem(row)
            if problem:  # quarantined before any call is spent on it
                bad.append(self._row(row, {"tally": _Tally(), "error": row_error(row, "input", problem)}, 0.0))
            else:
                todo.append(row)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            states: list[dict[str, Any]] = [{"tally": _Tally()} for _ in chunk]
            t0 = time.perf_counter()
            {"static": self._static, "dynamic": self._dynamic}.get(c.mode, self._single)(chunk, states)
            latency = (time.perf_counter() - t0) / max(1, len(chunk))
            for row, st in zip(chunk, states):
                try:
                    out = self._row(row, st, latency)
                except Exception as e:  # per row: an odd prediction or gold field quarantines this row only
                    out = self._row(row, {**st, "error": row_error(row, "score", exception_cause(e))}, latency)
                usage["truncated_prompts"] += st["tally"].truncated
                usage["prompt_tokens"] += out["decomposer_prompt_tokens"] + out["solver_prompt_tokens"]
                usage["completion_tokens"] += out["decomposer_completion_tokens"] + out["solver_completion_tokens"]
                (bad if out["error"] else good).append(out)
        return good, bad, merge(usage, self._ledger(good + bad))

    def _ledger(self, rows: list[dict]) -> dict[str, float]:
        """Cost-ledger counters per stage and model from the rows' per-stage tallies."""
        out = []
        for stage, backend in (("decomposer", self.decomposer), ("solver", self.solver)):
            if backend is not None:
                out.append(ledger_counts(stage, backend.name, backend_mode(backend), sum(r[f"{stage}_calls"] for r in rows),
                                         sum(r[f"{stage}_prompt_tokens"] for r in rows),
                                         sum(r[f"{stage}_completion_tokens"] for r in rows)))
        return merge(*out)

    def _row(self, row: dict, st: dict, latency: float) -> dict[str, Any]:
        """The output row of one question; one with an ``error`` is not scored (it counts as wrong)."""
        c = self.cfg
        if st.get("error"):
            s, sim = {"em": 0.0, "f1": 0.0, "correct": False}, {}
        else:
            s = metrics.score(row["dataset"], st.get("prediction"), list(row["answers"] or []), f1_threshold=c.drop_f1_threshold)
            subqs = st.get("subquestions")
            sim = decomposition_similarity(subqs, gold_pairs(row)[0]) if subqs is not None and row.get("gold_subquestions") else {}
        return {**{k: row.get(k) for k in QUESTION_SCHEMA.names}, "request_id": row["request_id"], "setting": c.setting,
                "mode": c.mode, "decomposer": self.decomposer.name if self.decomposer else None, "solver": self.solver.name,
                "prompt_version": prompts.PROMPT_VERSION, "subquestions": st.get("subquestions"),
                "decomposition_parsed": st.get("decomposition_parsed"), "subanswers": st.get("subanswers"),
                "decomposer_text": st.get("decomposer_text"), "solver_text": st.get("solver_text"),
                "prediction": st.get("prediction"), "em": s["em"], "f1": s["f1"], "correct": bool(s["correct"]),
                "rouge_l": sim.get("rouge_l"), "count_match": sim.get("count_match"), **st["tally"].fields(),
                "latency_s": latency, "error": st.get("error")}


def _input_problem(row: dict[str, Any]) -> Optional[str]:
    """Why ``infer`` cannot work on an input row (a missing field, a dataset without a metric), else None."""
    missing = input_problem(row, ("id", "question", "dataset"))
    if missing:
        return missing
    if row["dataset"] not in metrics.METRIC_NAME:
        return f"unknown dataset {row['dataset']!r} (no metric; known: {sorted(metrics.METRIC_NAME)})"
    return None


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
    counts, usage, _ = run_sharded_job(cfg, as_requests(filtered_rows(cfg.input)), InferWorker, f"infer[{cfg.setting}]",
                                       started)
    manifest = Manifest.of("infer", cfg, inputs={"questions": cfg.input.path}, counts=counts, started_at=started,
                           usage=usage, extra={"setting": cfg.setting, "mode": cfg.mode}).write(cfg.output.dir)
    log.info("infer[%s] done: %s -> %s", cfg.setting, counts, cfg.output.dir)
    return manifest
