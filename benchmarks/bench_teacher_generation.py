"""Teacher generation throughput: the real ``generate`` job (Ray Data actor pool, OpenAI backend)
against a local OpenAI-compatible stub with a fixed per-request latency, versus a plain
sequential loop with the same client (``OpenAIBackend``, concurrency 1, one request at a time).

    python -m benchmarks.bench_teacher_generation [--quick] [--actors 2 --concurrency 8 --latency 0.05]

Figures: requests/s (one request = one (question, sample) pair) end to end (the whole job
including Ray start, staging and actor start-up), end to end without Ray start, and steady
state (from the stub's request arrival times, middle 80 %, and from the shard commit times),
each as a fraction of the ideal ``actors * concurrency / latency``. Target: steady state
>= 80 % of ideal.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, measure  # noqa: E402

NAME = "bench_teacher_generation"


def decomposition_responder(messages: list, body: dict) -> str:
    """Always a parseable decomposition (the stub's default keys on the word 'subquestion')."""
    from tests.servers.openai_stub import DECOMPOSITION_REPLY

    return DECOMPOSITION_REPLY


def start_stub(latency_s: float):
    from tests.servers.openai_stub import OpenAIStubServer

    return OpenAIStubServer(latency_s=latency_s, responder=decomposition_responder).start()


def generate_argv(prepared: str, out_dir: str, base_url: str, *, actors: int, concurrency: int, limit: int, n: int,
                  shard_size: int, batch_size: int, cpus_per_actor: float, ray_num_cpus: Optional[int],
                  ray_address: Optional[str] = None, resources: Optional[dict[str, float]] = None) -> list[str]:
    argv = [
        "--config", os.path.join(common.REPO, "configs", "generate.yaml"),
        f"input.path={prepared}", "input.datasets=[gsm8k]", "input.splits=[train]", f"input.limit={limit}",
        f"output.dir={out_dir}", "output.overwrite=true", f"output.shard_size={shard_size}",
        ("teacher={type: openai, base_url: '" + base_url + "', model: stub-model, api_key_env: null, "
         f"concurrency: {concurrency}, max_retries: 2, timeout_s: 30}}"),
        f"sampling.n={n}", "sampling.temperature=0.7", "sampling.max_tokens=64",
        f"pool.min_actors={actors}", f"pool.max_actors={actors}", f"pool.num_cpus={cpus_per_actor}",
        f"pool.batch_size={batch_size}",
    ]
    if ray_num_cpus:
        argv.append(f"ray.num_cpus={ray_num_cpus}")
    if ray_address:
        argv.append(f"ray.address={ray_address}")
    if resources:
        argv.append("pool.resources={" + ", ".join(f"{k}: {v}" for k, v in resources.items()) + "}")
    return argv


def commit_stats(out_dir: str, actors: int) -> dict[str, Any]:
    """Per-shard commit markers: steady-state rate between commits (after the first round) and
    the actors' in-shard rate (rows / seconds inside ``run_shard``, times the actor count)."""
    commits = []
    for path in glob.glob(os.path.join(out_dir, "_done", "*.json")):
        with open(path) as f:
            d = json.load(f)
        commits.append((os.path.getmtime(path), d["rows_in"], d["seconds"]))
    commits.sort()
    out: dict[str, Any] = {"shards": len(commits)}
    if len(commits) > actors + 1:
        k = actors  # the first round of commits (one per actor) ends the ramp-up
        rows = sum(c[1] for c in commits[k:])
        span = commits[-1][0] - commits[k - 1][0]
        out["steady_rows_per_s_commits"] = rows / span if span > 0 else None
    busy = sum(c[2] for c in commits)
    out["in_shard_rows_per_s_per_actor"] = sum(c[1] for c in commits) / busy if busy else None
    out["mean_shard_s"] = busy / len(commits) if commits else None
    return out


def run_generate_job(stub, prepared: str, out_dir: str, *, actors: int, concurrency: int, limit: int, n: int,
                     shard_size: int, batch_size: int, cpus_per_actor: float = 0.5, ray_num_cpus: Optional[int] = 4,
                     ray_address: Optional[str] = None, resources: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """Run ``ray_jobs.generate.main`` once against ``stub``; returns its throughput figures.

    Ray is started by the job itself unless it is already initialized (then that start-up
    is not in ``wall_s``)."""
    import ray

    from ray_jobs import generate

    ray_was_up = ray.is_initialized()
    stub.reset_counters()
    argv = generate_argv(prepared, out_dir, stub.base_url, actors=actors, concurrency=concurrency, limit=limit, n=n,
                         shard_size=shard_size, batch_size=batch_size, cpus_per_actor=cpus_per_actor,
                         ray_num_cpus=None if ray_address else ray_num_cpus, ray_address=ray_address, resources=resources)
    t0m = time.monotonic()
    with measure.TreeCPU() as cpu:
        wall, manifest = common.run_job(generate.main, argv, out_dir)
    counts = manifest["counts"]
    times = list(stub.request_times)
    requests = len(times)
    res: dict[str, Any] = {
        "actors": actors, "concurrency": concurrency, "ideal_rows_per_s": actors * concurrency / stub.latency_s,
        "rows": counts["rows_in"], "rows_out": counts["rows_out"], "quarantined": counts["quarantined"],
        "server_requests": requests, "server_max_inflight": stub.max_inflight, "wall_s": wall,
        "ray_started_by_job": not ray_was_up,
        "e2e_rows_per_s": counts["rows_in"] / wall,
        "cpu_s_all_processes": cpu.cpu_s,
        "cpu_ms_per_request_e2e": 1000 * cpu.cpu_s / max(counts["rows_in"], 1),
        "steady_rows_per_s_arrivals": measure.steady_rate(times),
        "first_request_after_s": (min(times) - t0m) if times else None,
        "after_last_request_s": (t0m + wall - max(times)) if times else None,
        **commit_stats(out_dir, actors),
    }
    if len(times) >= 10:  # CPU of all our processes during the steady window (10th..90th pct of arrivals)
        ts = sorted(times)
        t_a, t_b = ts[int(0.1 * (len(ts) - 1))], ts[int(0.9 * (len(ts) - 1))]
        cores = cpu.cores_between(t_a, t_b)
        machine = cpu.cores_between(t_a, t_b, machine=True)
        res["steady_cores_used"] = cores
        res["steady_machine_busy_cores"] = machine
        if cores is not None and machine is not None:
            res["steady_other_cores"] = max(0.0, machine - cores)  # other people's work during the window
        res["steady_round_trip_s"] = concurrency * actors / res["steady_rows_per_s_arrivals"] if res["steady_rows_per_s_arrivals"] else None
        if cores is not None and res["steady_rows_per_s_arrivals"]:
            res["steady_cpu_ms_per_request"] = 1000 * cores / res["steady_rows_per_s_arrivals"]
    for key in ("e2e_rows_per_s", "steady_rows_per_s_arrivals", "steady_rows_per_s_commits"):
        if res.get(key):
            res[key.replace("rows_per_s", "frac_ideal")] = res[key] / res["ideal_rows_per_s"]
    return res


def run_sequential(stub, prepared: str, n_requests: int) -> dict[str, Any]:
    """Baseline: the same client, concurrency 1, one request per ``generate`` call, in a loop."""
    from pipeline import tables
    from pipeline.backends import Request, SamplingParams
    from pipeline.backends.openai_http import OpenAIBackend
    from pipeline.prompts import decomposer_messages

    rows = [r for r in tables.iter_rows(prepared) if r["split"] == "train"]
    backend = OpenAIBackend({"type": "openai", "base_url": stub.base_url, "model": "stub-model", "api_key_env": None,
                             "concurrency": 1, "max_retries": 2, "timeout_s": 30})
    params = SamplingParams(temperature=0.7, max_tokens=64)
    backend.generate([Request(messages=decomposer_messages(rows[0]), row=rows[0])], params)  # connect once
    stub.reset_counters()
    t0 = time.perf_counter()
    errors = 0
    for i in range(n_requests):
        row = rows[i % len(rows)]
        out = backend.generate([Request(messages=decomposer_messages(row), sample_index=i // len(rows), row=row)], params)
        errors += int(out[0].error is not None)
    wall = time.perf_counter() - t0
    backend.close()
    return {"requests": n_requests, "errors": errors, "wall_s": wall, "rows_per_s": n_requests / wall,
            "ideal_rows_per_s": 1 / stub.latency_s, "frac_ideal": n_requests / wall * stub.latency_s,
            "per_request_overhead_ms": (wall / n_requests - stub.latency_s) * 1000}


def measure_ray_start(num_cpus: int) -> float:
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    dt = time.perf_counter() - t0
    ray.shutdown()
    return dt


def main(argv: Optional[list[str]] = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--latency", type=float, default=0.05)
    args = p.parse_args(argv)
    rep = common.Report(NAME, args, "Teacher generation: `generate` on Ray vs a sequential client loop")
    quick = rep.quick
    questions, n = (200, 4) if quick else (1000, 8)
    shard_size = 50 if quick else 200
    seq_requests = 60 if quick else 200
    batch_size = shard_size
    ray_num_cpus = max(2, os.cpu_count() or 2, args.actors)
    params = {"latency_s": args.latency, "actors": args.actors, "concurrency_per_actor": args.concurrency,
              "questions": questions, "samples_per_question": n, "requests": questions * n, "shard_size": shard_size,
              "pool_batch_size": batch_size, "pool_num_cpus": 0.5, "ray_num_cpus": ray_num_cpus,
              "baseline_requests": seq_requests, "stub": "tests/servers/openai_stub.py, in the benchmark process"}

    prepared = common.prepared_questions()
    common.shutdown_ray()
    ray_start = measure_ray_start(ray_num_cpus)
    stub = start_stub(args.latency)
    try:
        seq = run_sequential(stub, prepared, seq_requests)
        print(f"sequential loop: {seq['rows_per_s']:.1f} req/s", flush=True)
        out_dir = common.scratch("teacher_generation")
        job = run_generate_job(stub, prepared, out_dir, actors=args.actors, concurrency=args.concurrency, limit=questions,
                               n=n, shard_size=shard_size, batch_size=batch_size, ray_num_cpus=ray_num_cpus)
    finally:
        common.shutdown_ray()
        stub.close()
    job["ray_start_s"] = ray_start
    job["e2e_minus_ray_start_rows_per_s"] = job["rows"] / max(job["wall_s"] - ray_start, 1e-9)
    job["e2e_minus_ray_start_frac_ideal"] = job["e2e_minus_ray_start_rows_per_s"] / job["ideal_rows_per_s"]

    ideal = job["ideal_rows_per_s"]
    steady = job.get("steady_rows_per_s_arrivals") or 0.0
    target_met = steady >= 0.8 * ideal
    rows = [
        ["sequential loop (baseline): OpenAIBackend, concurrency 1", seq["requests"], seq["wall_s"], seq["rows_per_s"],
         seq["ideal_rows_per_s"], seq["frac_ideal"], 1.0],
        ["generate job, end to end (incl. Ray start, staging, actor start)", job["rows"], job["wall_s"], job["e2e_rows_per_s"],
         ideal, job["e2e_frac_ideal"], job["e2e_rows_per_s"] / seq["rows_per_s"]],
        ["generate job, end to end minus Ray start (measured separately)", job["rows"], job["wall_s"] - ray_start,
         job["e2e_minus_ray_start_rows_per_s"], ideal, job["e2e_minus_ray_start_frac_ideal"],
         job["e2e_minus_ray_start_rows_per_s"] / seq["rows_per_s"]],
        ["generate job, steady state (stub arrivals, middle 80 %)", None, None, job.get("steady_rows_per_s_arrivals"), ideal,
         job.get("steady_frac_ideal_arrivals"), (job.get("steady_rows_per_s_arrivals") or 0) / seq["rows_per_s"]],
        ["generate job, steady state (shard commits after the first round)", None, None, job.get("steady_rows_per_s_commits"),
         ideal, job.get("steady_frac_ideal_commits"), (job.get("steady_rows_per_s_commits") or 0) / seq["rows_per_s"]],
    ]
    table = common.md_table(["system", "requests", "seconds", "requests/s", "ideal req/s", "fraction of ideal", "× baseline"], rows)
    fmt = common.fmt
    cpu_ms = job.get("steady_cpu_ms_per_request")
    cap = (os.cpu_count() or 1) * 1000 / cpu_ms if cpu_ms else None
    job["cpu_bound_cap_rows_per_s"] = cap
    overhead_ms = (1 / (job["in_shard_rows_per_s_per_actor"] or 1) * args.concurrency - args.latency) * 1000
    notes = f"""
Setup: {questions} GSM8K questions × {n} samples = {questions * n} requests; stub latency {args.latency * 1000:.0f} ms per request;
{args.actors} actors × concurrency {args.concurrency}, so ideal = {args.actors}·{args.concurrency}/{args.latency:g} s = **{ideal:.0f} requests/s**
(the sequential loop's ideal is 1/{args.latency:g} s = {1 / args.latency:.0f} requests/s). Shards of {shard_size} requests, one backend batch
per shard; Ray with {ray_num_cpus} logical CPUs, 0.5 CPU per actor. A request is one (question, sample) pair, i.e. one teacher call.

Which figure is which:
- *end to end* is the wall time of `ray_jobs.generate.main` including Ray start-up ({ray_start:.1f} s when measured alone), reading
  and staging the requests, actor start-up, the last shard and the manifest; the first request reached the stub
  {job['first_request_after_s']:.1f} s after the job started, and the job ended {job['after_last_request_s']:.1f} s after the last one.
- *steady state* excludes those fixed costs: the rate of request arrivals at the stub between the 10th and 90th
  percentile of arrival times, and, independently, rows committed per second between the end of the first round of
  shard commits and the last commit. The two agree within noise when the pipeline is saturated.

**Target (steady state ≥ 80 % of ideal at concurrency {args.concurrency}): {'met' if target_met else 'missed'}** —
{100 * (job.get('steady_frac_ideal_arrivals') or 0):.0f} % of ideal from arrivals, {100 * (job.get('steady_frac_ideal_commits') or 0):.0f} % from commits;
{job['e2e_rows_per_s'] / seq['rows_per_s']:.1f}× the sequential loop end to end.
Inside a shard each actor ran {job['in_shard_rows_per_s_per_actor']:.1f} requests/s (ideal {args.concurrency / args.latency:.0f}), i.e. about
{overhead_ms:.1f} ms per round trip on top of the {args.latency * 1000:.0f} ms stub latency; the sequential loop pays
{seq['per_request_overhead_ms']:.1f} ms per request on top of the latency.
Where the gap to ideal comes from on this machine: the stub server (aiohttp, one event loop thread in the benchmark
process), the actors' httpx clients (each actor one Python process with its own event loop), Ray Data's scheduling and the
driver all share {os.cpu_count()} cores; every request costs roughly a millisecond of Python CPU on each side (JSON, HTTP parsing,
asyncio), so at a few hundred requests/s a large part of both cores is busy with overhead rather than waiting on the
latency, and each shard ends with a short drain (the last requests of a batch wait for the slowest one) plus a Parquet
write and a commit marker. With an external API the server side costs nothing here and the same job is limited by the API.
Measured CPU (all of this benchmark's processes: stub, driver, Raylet/GCS, actors) during the steady window:
{fmt(job.get('steady_cores_used'))} cores, i.e. {fmt(job.get('steady_cpu_ms_per_request'))} CPU-ms per request, so {os.cpu_count()} cores cap this setup at about
{fmt(cap)} requests/s even on an idle machine (less when other work shares the cores; in that window other processes used
{fmt(job.get('steady_other_cores'))} cores). Each in-flight slot saw a round trip of {fmt((job.get('steady_round_trip_s') or float('nan')) * 1000)} ms
for the {args.latency * 1000:.0f} ms stub latency. See bench_scaling for the same model over 1–16 actors.
End to end, fixed costs (Ray start, actor start) are amortized only over the run: {job['rows']} requests take
{job['wall_s']:.0f} s, of which ~{job['first_request_after_s']:.0f} s are before the first request.
"""
    rep.write({"baseline_sequential": seq, "generate_job": job, "target_steady_frac_ideal": 0.8, "target_met": target_met},
              table, notes, params=params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
