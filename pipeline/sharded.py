"""Sharded, resumable, exactly-once processing of row sets on a Ray Data actor pool.

Layout of a job output directory (local or ``s3://``)::

    <out>/_requests/shard-00000.parquet   deterministic work units, written once
    <out>/data/shard-00000.parquet        rows that succeeded
    <out>/quarantine/shard-00000.parquet  rows that failed, with an ``error`` column
    <out>/_done/shard-00000.json          commit marker: counts and token usage of the shard
    <out>/manifest.json                   the job summary (written at the end)

A shard is committed when its ``_done`` marker exists. A shard's writes go in a fixed
order: its data file (always, even when empty), then its quarantine file (written when it
has bad rows, *deleted* when it has none, so an earlier attempt's file cannot linger), then
the marker. A rerun (after a crash, ``ray job stop`` or a lost node) skips committed shards
and redoes the others, replacing every file of the same name, so every row lands exactly
once whichever write a crash came between, and whatever the redo's outcome is
(tests/test_exactly_once.py crashes a shard before each of those writes).

Per-row isolation: whatever goes wrong with one row (its input, its request, its response,
its parse, a value Parquet cannot store) puts that row in quarantine with an ``error``
naming the row, the stage and the cause; only infrastructure failures
(:data:`INFRASTRUCTURE_ERRORS`: a backend unreachable or refusing our credentials, storage
unreachable) stop the job, with committed shards kept. Ray Data runs the shards on an autoscaling actor
pool (``map_batches`` with a callable class), restarting actors on lost nodes and
retrying their tasks.

Why not Ray Data's own ``CheckpointConfig``: it filters rows by id at read time and commits
per written block. Re-measured on Ray 2.60.0 (benchmarks/check_ray_data_checkpoint.py, local Ray
with 2 CPUs and one 1-CPU model actor, 16 input files of 8 rows): (1) a resumed run adds a
``CheckpointFilter`` actor pool whose actors get Ray Data's default 1 CPU (plus a 1 GiB memory
reservation), and the resume did not finish in 240 s, with no CPU free: a 2-CPU local Ray with
one model actor still deadlocks; (2) a run that failed half-way had committed no block at all,
with the default blocks and with ``override_num_blocks=16`` alike (the small blocks coalesce
before the write), so a killed job resumes from the very start. It also writes one dataset, so
bad rows would share ``data/`` with good ones. Shard-level commits give a bounded redo window
(one shard per actor) on any cluster size.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa

from pipeline import storage, tables
from pipeline.backends.base import BackendUnavailable
from pipeline.cluster import init_ray
from pipeline.config import ActorPoolConfig, UsageError
from pipeline.cost import add_cost
from pipeline.job_config import ShardedJobConfig

log = logging.getLogger(__name__)


class ShardFailed(RuntimeError):
    """A shard could not be processed for a reason that stops the job (storage unreachable, ...)."""


class OutputMismatch(UsageError):
    """The output directory holds a different job's work (set output.overwrite=true or pick a new dir)."""


# What stops a job (after its retries, inside the backend or the S3 client); anything else raised
# while a shard's rows are handled is a problem of one row, and goes to quarantine.
INFRASTRUCTURE_ERRORS = (BackendUnavailable, ShardFailed, OSError)


def row_label(row: dict[str, Any]) -> str:
    """How an error names a row: its request id, else its question id, else ``?``."""
    return str(row.get("request_id") or row.get("id") or "?")


def row_error(row: dict[str, Any], stage: str, cause: str) -> str:
    """The ``error`` of a quarantined row: which row, at which stage, and why."""
    return f"request {row_label(row)}, stage {stage}: {cause}"


def missing_fields(row: dict[str, Any], required: tuple[str, ...]) -> Optional[str]:
    """Why an input row cannot be worked on (a required field missing or empty), else None."""
    missing = [f for f in required if row.get(f) is None or row.get(f) == ""]
    return f"input row has no {' or '.join(repr(f) for f in missing)}" if missing else None


def split_inputs(rows: Iterable[dict[str, Any]], *problems: Callable[[dict[str, Any]], Optional[str]]
                 ) -> tuple[list[dict], list[dict]]:
    """A shard's rows split before any call is spent: those no ``problem`` objects to, and the others as
    quarantine rows (``error``: the row, stage ``input``, the first problem found)."""
    todo: list[dict] = []
    bad: list[dict] = []
    for row in rows:
        why = next((p for p in (check(row) for check in problems) if p), None)
        if why:
            bad.append({**row, "error": row_error(row, "input", why)})
        else:
            todo.append(row)
    return todo, bad


def finish_each(rows: list[dict], results: list[Any], finish: Callable[[dict, Any], dict], stage: str,
                on_error: Optional[Callable[[dict, Any, str], dict]] = None) -> tuple[list[dict], list[dict]]:
    """``finish(row, result)`` for each row: the output rows, split into good and bad (an ``error`` set).
    A row whose finishing raises (an odd answer or gold field) is quarantined alone, its ``error`` naming
    the row, ``stage`` and the cause (``on_error(row, result, error)`` builds that row; default: the input
    row with the error)."""
    good: list[dict] = []
    bad: list[dict] = []
    for row, result in zip(rows, results):
        try:
            out = finish(row, result)
        except Exception as e:  # per row: this row only
            error = row_error(row, stage, exception_cause(e))
            out = on_error(row, result, error) if on_error else {**row, "error": error}
        (bad if out.get("error") else good).append(out)
    return good, bad


def exception_cause(e: BaseException) -> str:
    """``Type: message (in function, file:line)`` of the frame that raised ``e``."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (in {tb[-1].name}, {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {e}{where}"


class Layout:
    def __init__(self, root: str):
        self.root = root
        self.requests = storage.join(root, "_requests")
        self.data = storage.join(root, "data")
        self.quarantine = storage.join(root, "quarantine")
        self.done = storage.join(root, "_done")
        self.plan = storage.join(root, "_requests", "_plan.json")

    def shard_file(self, kind: str, shard: str) -> str:
        folder = {"requests": self.requests, "data": self.data, "quarantine": self.quarantine}[kind]
        return storage.join(folder, f"{shard}.parquet")

    def done_file(self, shard: str) -> str:
        return storage.join(self.done, f"{shard}.json")


def chunks(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """``rows`` in lists of ``size`` (the last one shorter)."""
    chunk: list[dict] = []
    for r in rows:
        chunk.append(r)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def stage_requests(layout: Layout, requests: Iterable[dict[str, Any]], shard_size: int, fingerprint: dict[str, Any],
                   overwrite: bool = False) -> list[str]:
    """Write the work units as shards once; later runs with the same fingerprint reuse them."""
    if overwrite and storage.exists(layout.root):
        storage.delete(layout.root)
    if storage.exists(layout.plan):
        plan = storage.read_json(layout.plan)
        if plan["fingerprint"] != json.loads(json.dumps(fingerprint, default=str)):
            raise OutputMismatch(
                f"{layout.root} already holds a run with different inputs or settings; "
                "set output.overwrite=true to start over, or choose another output.dir"
            )
        log.info("resuming: %d request shards already staged in %s", len(plan["shards"]), layout.requests)
        return plan["shards"]
    storage.delete(layout.requests)  # shards of an earlier staging that died before its plan was written
    shards, total = [], 0
    for i, chunk in enumerate(chunks(requests, shard_size)):
        name = f"shard-{i:05d}"
        tables.write_rows(layout.shard_file("requests", name), chunk)
        shards.append(name)
        total += len(chunk)
    storage.write_json(layout.plan, {"fingerprint": fingerprint, "shards": shards, "rows": total})
    log.info("staged %d requests in %d shards", total, len(shards))
    return shards


def pending_shards(layout: Layout, shards: list[str]) -> list[str]:
    done = {p.rsplit("/", 1)[-1][: -len(".json")] for p in storage.list_files(layout.done, ".json")}
    return [s for s in shards if s not in done]


class ShardWorker:
    """Base for the actor class of a sharded job: subclasses implement :meth:`process`.

    ``process(rows)`` returns ``(good_rows, bad_rows, usage)``; bad rows carry an
    ``error`` string. ``schema`` (a pyarrow schema including ``error``) fixes the output
    columns so shards always concatenate.
    """

    schema: pa.Schema

    def __init__(self, out_dir: str):
        self.layout = Layout(out_dir)

    def process(self, rows: list[dict[str, Any]]) -> tuple[list[dict], list[dict], dict[str, float]]:
        raise NotImplementedError

    def run_shard(self, shard: str) -> dict[str, Any]:
        start = time.perf_counter()
        for kind in ("data", "quarantine"):  # temp files of a write that a kill interrupted
            storage.delete_partial_writes(self.layout.shard_file(kind, shard))
        rows = tables.read_rows(self.layout.shard_file("requests", shard))
        good, bad, usage = self.process_isolated(rows)
        good, unstorable = split_storable(good, self.schema)
        bad = storable_rows(bad + [{**r, "error": row_error(r, "write", why)} for r, why in unstorable],
                            quarantine_schema(self.schema))
        stats = {"shard": shard, "rows_in": len(rows), "rows_out": len(good), "quarantined": len(bad),
                 "seconds": round(time.perf_counter() - start, 4), **{k: float(v) for k, v in usage.items()}}
        self.commit(shard, good, bad, stats)
        return stats

    def commit(self, shard: str, good: list[dict], bad: list[dict], stats: dict[str, Any]) -> None:
        """Data, then quarantine (or the removal of an earlier attempt's), then the marker."""
        tables.write_rows(self.layout.shard_file("data", shard), good, self.schema)
        quarantine = self.layout.shard_file("quarantine", shard)
        if bad:
            tables.write_rows(quarantine, bad, quarantine_schema(self.schema))
        else:
            storage.delete(quarantine)
        storage.write_json(self.layout.done_file(shard), stats)

    def process_isolated(self, rows: list[dict[str, Any]]) -> tuple[list[dict], list[dict], dict[str, float]]:
        """:meth:`process`, and when it raises for anything but infrastructure, :meth:`process` row by row
        so that only the row(s) that raise go to quarantine.

        Ray Data LLM's pattern (``should_continue_on_error=True``, errors in an ``__inference_error__``
        column of the output) is followed for the error column but not for the switch: bad rows are
        isolated always (one odd row must never cost a multi-hour batch), and they go to a separate
        ``quarantine/`` so that ``data/`` is clean input for the next stage. Jobs catch what they expect
        per row themselves (teacher errors, parse errors); this is the net for what they did not expect,
        and it costs a redo of that one shard's requests (cached backends answer them from the cache).
        """
        try:
            return self.process(rows)
        except INFRASTRUCTURE_ERRORS:
            raise
        except Exception:
            log.exception("%d rows failed together; processing them one by one to isolate the bad row(s)", len(rows))
        good: list[dict] = []
        bad: list[dict] = []
        usage: dict[str, float] = {}
        for row in rows:
            try:
                g, b, u = self.process([row])
            except INFRASTRUCTURE_ERRORS:
                raise
            except Exception as e:
                bad.append({**row, "error": row_error(row, "process", exception_cause(e))})
                continue
            good += g
            bad += b
            for k, v in u.items():
                usage[k] = usage.get(k, 0) + v
        return good, bad, usage

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out = []
        for s in batch["shard"]:
            try:
                out.append(json.dumps(self.run_shard(str(s))))
            except INFRASTRUCTURE_ERRORS as e:  # fatal for the job: report it, the driver stops
                out.append(json.dumps({"shard": str(s), "fatal": str(e), "type": type(e).__name__}))
        return {"stats": out}


def quarantine_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` with every field nullable: a bad row may lack what a good one must have (e.g. its id)."""
    return pa.schema([f.with_nullable(True) for f in schema])


def _unstorable(row: dict[str, Any], schema: pa.Schema) -> list[str]:
    """``field 'x' (Type: msg)`` for each value of ``row`` that Parquet cannot store as ``schema`` says."""
    problems = []
    for f in schema:
        if not f.nullable and row.get(f.name) is None:
            problems.append(f"field {f.name!r} (missing, and the schema requires it)")
            continue
        try:
            pa.array([row.get(f.name)], type=f.type)
        except (pa.ArrowException, ValueError, TypeError, OverflowError) as e:
            problems.append(f"field {f.name!r} ({type(e).__name__}: {e})")
    return problems


def split_storable(rows: list[dict], schema: pa.Schema) -> tuple[list[dict], list[tuple[dict, str]]]:
    """(rows Parquet can store, [(row, why not)] for the others, e.g. a lone surrogate in a string)."""
    try:
        table = pa.Table.from_pylist(rows, schema=schema)
        if not any(table.column(f.name).null_count for f in schema if not f.nullable):
            return rows, []
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        pass
    ok, unstorable = [], []
    for r in rows:
        problems = _unstorable(r, schema)
        if problems:
            unstorable.append((r, "cannot be stored in Parquet: " + "; ".join(problems)))
        else:
            ok.append(r)
    return ok, unstorable


def _escaped(value: Any) -> Any:
    """Strings (also in lists) with unencodable characters as backslash escapes."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, (list, tuple)):
        return [_escaped(v) for v in value]
    return value


def storable_rows(rows: list[dict], schema: pa.Schema) -> list[dict]:
    """Quarantine rows made storable: an unstorable value is escaped, or else emptied (its error says so)."""
    ok, unstorable = split_storable(rows, schema)
    if not unstorable:
        return rows
    fixed = []
    for r, _ in unstorable:
        r = {k: _escaped(v) for k, v in r.items()}
        emptied = [f.name for f in schema if _unstorable({f.name: r.get(f.name)}, pa.schema([f]))]
        r.update({name: None for name in emptied})
        if emptied:
            r["error"] = f"{r.get('error')} [unstorable field(s) {emptied} emptied]"
        fixed.append(r)
    return ok + fixed


def run_shards(
    layout: Layout,
    shards: list[str],
    worker_cls: type[ShardWorker],
    worker_kwargs: dict[str, Any],
    pool: ActorPoolConfig,
    label: str,
    on_progress: Optional[Callable[[dict[str, Any]], None]] = None,
    secret_env: Optional[list[str]] = None,
) -> dict[str, Any]:
    """Run every pending shard on an actor pool; returns totals over *all* committed shards.

    ``secret_env`` names environment variables (API keys) to hand from this driver to the
    actors as a constructor argument when they are set here (never a ``runtime_env``: Ray's
    runtime-env agent logs those verbatim), so a key exported where the job's driver runs
    reaches every actor without ever being written to a config, an output or a log.
    """
    import ray  # lazy: ray costs ~1 s to import, and the CLI imports this module to validate a config

    todo = pending_shards(layout, shards)
    log.info("%s: %d of %d shards to do", label, len(todo), len(shards))
    if todo:
        ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            _with_secrets(worker_cls),
            fn_constructor_kwargs={"out_dir": layout.root, **worker_kwargs, "_secrets": _secret_values(secret_env)},
            batch_size=1,
            compute=_actor_pool_strategy(pool),
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus or None,
            resources=pool.resources or None,
            **_restart_args(pool),
        )
        started, n, rows, tokens = time.perf_counter(), 0, 0, 0.0
        for item in ds.iter_rows():
            stats = json.loads(item["stats"])
            if "fatal" in stats:
                err = BackendUnavailable if stats["type"] == "BackendUnavailable" else ShardFailed
                raise err(f"{stats['fatal']} (shard {stats['shard']}; committed shards are kept, rerun to resume)")
            n += 1
            rows += stats["rows_in"]
            tokens += stats.get("prompt_tokens", 0) + stats.get("completion_tokens", 0)
            elapsed = time.perf_counter() - started
            log.info("%s: %d/%d shards, %d rows, %.0f tokens, %.1f rows/s", label, n + len(shards) - len(todo),
                     len(shards), rows, tokens, rows / max(elapsed, 1e-9))
            if on_progress:
                on_progress(stats)
    return totals(layout, shards)


def _actor_pool_strategy(pool: ActorPoolConfig) -> Any:
    """Ray Data's actor pool for ``pool``. A fixed pool of several actors takes one shard per actor at a time.
    Ray Data's default of two in flight queues a shard behind a running one while another actor of the pool
    is still starting, and it stays there: a fixed pool of 4 ran its 4 shards on 3 actors in CI, two of them
    one after the other on one actor. A shard is a long unit of work (a teacher's minutes), so pipelining
    buys little there. A single actor keeps the default (no other actor could take the shard), and so does
    an autoscaling pool, since Ray Data adds actors only past 1.75 tasks in flight per actor."""
    import ray  # lazy: see run_shards

    low = min(pool.min_actors, pool.max_actors)
    fixed = {"max_tasks_in_flight_per_actor": 1} if low == pool.max_actors > 1 else {}
    return ray.data.ActorPoolStrategy(min_size=low, max_size=pool.max_actors, **fixed)


def _restart_args(pool: ActorPoolConfig) -> dict[str, Any]:
    args = {k: v for k, v in (("max_restarts", pool.max_restarts), ("max_task_retries", pool.max_task_retries)) if v is not None}
    return {"ray_remote_args_fn": lambda: dict(args)} if args else {}


def _secret_values(names: Optional[list[str]]) -> dict[str, str]:
    return {n: os.environ[n] for n in (names or []) if n and os.environ.get(n)}


def _with_secrets(worker_cls: type) -> type:
    """``worker_cls`` taking a ``_secrets`` constructor argument that it puts into its own environment
    first (constructor arguments are never logged, unlike a runtime_env)."""

    class _Worker(worker_cls):  # type: ignore[misc, valid-type]
        def __init__(self, _secrets: Optional[dict[str, str]] = None, **kwargs: Any) -> None:
            os.environ.update(_secrets or {})
            super().__init__(**kwargs)

    _Worker.__name__ = _Worker.__qualname__ = worker_cls.__name__
    return _Worker


def totals(layout: Layout, shards: list[str]) -> dict[str, Any]:
    """Sum the commit markers of the given shards."""
    agg: dict[str, float] = {}
    committed = 0
    for s in shards:
        try:
            marker = storage.read_json(layout.done_file(s))  # one request per shard, not an exists() first
        except FileNotFoundError:
            continue
        committed += 1
        for k, v in marker.items():
            if isinstance(v, (int, float)):
                agg[k] = agg.get(k, 0) + v
    agg["shards"] = len(shards)
    agg["shards_committed"] = committed
    return agg


def run_summary(agg: dict[str, Any], pricing, wall_s: float) -> tuple[dict[str, int], dict[str, Any]]:
    """(counts, usage) for a manifest from shard totals, a pricing config and wall time."""
    prompt, completion = int(agg.get("prompt_tokens", 0)), int(agg.get("completion_tokens", 0))
    counts = {"rows_in": int(agg.get("rows_in", 0)), "rows_out": int(agg.get("rows_out", 0)),
              "quarantined": int(agg.get("quarantined", 0)), "shards": int(agg.get("shards", 0)),
              "shards_committed": int(agg.get("shards_committed", 0)),
              "truncated_prompts": int(agg.get("truncated_prompts", 0))}
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
             "cached_responses": int(agg.get("cached", 0)),
             "estimated_cost": round(pricing.cost(prompt, completion), 6), "currency": pricing.currency,
             "rows_per_s_this_run": round(counts["rows_in"] / max(wall_s, 1e-9), 3)}
    return counts, usage


def run_sharded_job(cfg: ShardedJobConfig, requests: Iterable[dict[str, Any]], worker_cls: type[ShardWorker], label: str,
                    started_at: float, **worker_kwargs: Any) -> tuple[dict[str, int], dict[str, Any], dict[str, Any]]:
    """What generate, solve and infer share: join Ray, stage ``requests`` as shards under ``cfg.output.dir``
    (resuming a run with the same ``cfg.fingerprint()``), run the pending ones on actors of ``worker_cls``
    (each built with ``cfg`` itself, plus ``worker_kwargs``), and price the result.

    Returns ``(counts, usage, shard totals)``.
    """
    init_ray(cfg.ray)
    layout = Layout(cfg.output.dir)
    shards = stage_requests(layout, requests, cfg.output.shard_size, cfg.fingerprint(), cfg.output.overwrite)
    totals = run_shards(layout, shards, worker_cls, {"cfg": cfg, **worker_kwargs}, cfg.pool, label,
                        secret_env=cfg.secret_env())
    counts, usage = run_summary(totals, cfg.pricing, time.time() - started_at)
    add_cost(usage, totals, cfg.pricing)  # actual tokens and cost per stage, model and mode
    return counts, usage, totals
