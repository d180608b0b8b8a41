"""Soak: ``generate`` over 10,000 requests against a flaky teacher, the driver SIGKILLed three times at
random points and one generation actor SIGKILLed once; each time the same command resumes. It ends with
every (question, sample) exactly once in ``data/`` or ``quarantine/``, and records the driver's peak
memory per run and the peak memory of staging 10k vs 40k requests (staging streams: it does not grow
with the corpus).

    python -m benchmarks.soak_generate [--quick] [--seed 7]     # ~5 min here; --quick: 2,000 requests

The teacher (benchmarks/flaky_teacher.py, in this process) answers 429 / 500 / slow / garbage (HTML 200,
``choices: []``, ``usage: "n/a"``) at random, and refuses 0.5 % of the questions outright (quarantined).
Drivers are ``python -m ray_jobs.generate`` subprocesses joining this process's local Ray.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import REPO, Report, base_parser, md_table, prepared_questions, scratch  # noqa: E402
from benchmarks.flaky_teacher import FlakyTeacher  # noqa: E402

KILL_WINDOWS = [(0.10, 0.30), (0.35, 0.55), (0.60, 0.80)]  # fractions of shards committed
ACTOR_KILL_WINDOW = (0.82, 0.95)


def driver_argv(address: str, prepared: str, out: str, base_url: str, questions: int, samples: int, shard: int) -> list[str]:
    teacher = ("teacher={type: openai, model: flaky, base_url: '" + base_url + "', api_key_env: null, concurrency: 16, "
               "max_retries: 10, backoff_base_s: 0.02, backoff_max_s: 0.2, timeout_s: 10}")
    return [sys.executable, "-m", "ray_jobs.generate", "--config", os.path.join(REPO, "configs", "generate.yaml"),
            f"ray.address={address}", f"input.path={prepared}", "input.splits=[train]", f"input.limit={questions}",
            f"output.dir={out}", f"output.shard_size={shard}", f"sampling.n={samples}",
            "pool={min_actors: 2, max_actors: 2, num_cpus: 0.5}", teacher]


def committed(out: str) -> int:
    d = os.path.join(out, "_done")
    return len([f for f in os.listdir(d) if f.endswith(".json")]) if os.path.isdir(d) else 0


def generation_actor_pids(exclude: set[int]) -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "DecomposeWorker" in cmd and p.info["pid"] not in exclude:
            pids.append(p.info["pid"])
    return pids


def one_run(argv: list[str], out: str, log_path: str, total: int, kill_at: int | None, actor_kill_at: int | None) -> dict:
    """Start a driver; SIGKILL it once ``kill_at`` shards are committed, or one actor at ``actor_kill_at``."""
    import psutil

    env = {**os.environ, "PYTHONPATH": REPO, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "DIVCONQ_LOG_LEVEL": "INFO"}
    start_commits, t0 = committed(out), time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    ps, peak, killed, actor_killed = psutil.Process(proc.pid), 0, False, None
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.Error:
            pass
        n = committed(out)
        if kill_at is not None and n >= kill_at:
            proc.send_signal(signal.SIGKILL)
            killed = True
        if actor_kill_at is not None and actor_killed is None and n >= actor_kill_at:
            pids = generation_actor_pids({proc.pid})
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                actor_killed = {"pid": pids[0], "at_commits": n}
        time.sleep(0.1)
    return {"rc": proc.returncode, "driver_killed": killed, "actor_killed": actor_killed,
            "commits_before": start_commits, "commits_after": committed(out), "of": total,
            "wall_s": round(time.perf_counter() - t0, 1), "driver_peak_rss_mb": round(peak / 2**20, 1)}


def staging_peak_rss_mb(prepared: str, questions: int, samples: int, shard: int) -> float:
    """Peak RSS of a fresh process that stages ``questions * samples`` requests (what a driver does first)."""
    code = (
        "import resource, sys, tempfile\n"
        "from pipeline.generation import expand_samples\n"
        "from pipeline.job_config import InputConfig\n"
        "from pipeline.sharded import Layout, stage_requests\n"
        f"inp = InputConfig(path={prepared!r}, splits=['train'], limit={questions})\n"
        "with tempfile.TemporaryDirectory() as d:\n"
        f"    stage_requests(Layout(d), expand_samples(inp.rows(), {samples}), {shard}, {{}})\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                         capture_output=True, text=True, check=True)
    return round(int(out.stdout.strip().splitlines()[-1]) / 1024, 1)


def check_exactly_once(out: str, prepared: str, questions: int, samples: int) -> dict[str, Any]:
    from pipeline import tables
    from pipeline.job_config import InputConfig

    ids = [r["id"] for r in InputConfig(path=prepared, splits=["train"], limit=questions).rows(columns=["id", "split"])]
    expected = {f"{i}#{k}" for i in ids for k in range(samples)}
    got = []
    for sub in ("data", "quarantine"):
        path = os.path.join(out, sub)
        if os.path.isdir(path):
            got += [r["request_id"] for r in tables.iter_rows(path, columns=["request_id"])]
    seen = set(got)
    return {"expected": len(expected), "rows": len(got), "duplicates": len(got) - len(seen),
            "missing": len(expected - seen), "unexpected": len(seen - expected),
            "exactly_once": len(got) == len(seen) == len(expected) and seen == expected}


def soak(args, prepared: str, out: str) -> dict[str, Any]:
    import ray

    questions, samples, shard = (200, 10, 25) if args.quick else (1000, 10, 50)
    total = -(-questions * samples // shard)
    rng = random.Random(args.seed)
    kills = [int(total * rng.uniform(a, b)) for a, b in KILL_WINDOWS]
    actor_kill = int(total * rng.uniform(*ACTOR_KILL_WINDOW))
    teacher = FlakyTeacher(seed=args.seed).start()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    runs: list[dict] = []
    t0 = time.perf_counter()
    try:
        argv = driver_argv(ray.get_runtime_context().gcs_address, prepared, out, teacher.base_url, questions, samples, shard)
        plan = [(k, None) for k in kills] + [(None, actor_kill)]
        while True:
            kill_at, actor_at = plan.pop(0) if plan else (None, None)
            runs.append(one_run(argv, out, os.path.join(out + "-logs", f"run{len(runs)}.log"), total, kill_at, actor_at))
            print(f"run {len(runs)}: {runs[-1]}", flush=True)
            if not plan and runs[-1]["rc"] == 0 and not runs[-1]["driver_killed"]:
                break
            if len(runs) > 10:
                raise RuntimeError("the soak did not finish in 10 runs")
    finally:
        ray.shutdown()
        teacher_figures = teacher.figures()
        teacher.close()
    import json

    manifest = json.load(open(os.path.join(out, "manifest.json")))
    return {"questions": questions, "samples": samples, "requests": questions * samples, "shards": total,
            "kill_plan": {"driver_at_commits": kills, "actor_at_commits": actor_kill}, "runs": runs,
            "wall_s": round(time.perf_counter() - t0, 1), "teacher": teacher_figures,
            "counts": manifest["counts"], "check": check_exactly_once(out, prepared, questions, samples)}


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    report = Report("soak_generate", args, "Soak: generate under a flaky teacher and four SIGKILLs")
    prepared = prepared_questions(train=1000, test=100)
    out = scratch("soak_generate")
    os.makedirs(out + "-logs", exist_ok=True)
    res = soak(args, prepared, out)
    q = res["questions"]
    res["staging_peak_rss_mb"] = {f"{q * 10} requests": staging_peak_rss_mb(prepared, q, 10, 50),
                                  f"{q * 40} requests": staging_peak_rss_mb(prepared, q, 40, 50)}
    rows = [[i + 1, r["rc"], "SIGKILL" if r["driver_killed"] else "-",
             f"pid {r['actor_killed']['pid']} at {r['actor_killed']['at_commits']}" if r["actor_killed"] else "-",
             f"{r['commits_before']} → {r['commits_after']} / {r['of']}", r["wall_s"], r["driver_peak_rss_mb"]]
            for i, r in enumerate(res["runs"])]
    table = md_table(["run", "exit", "driver", "actor killed", "shards committed", "wall s", "driver peak RSS MB"], rows)
    c, t = res["check"], res["teacher"]
    notes = (f"{res['requests']} requests ({q} questions × {res['samples']} samples) in {res['shards']} shards; "
             f"total wall {res['wall_s']} s.\n\n"
             f"**Exactly once: {c['exactly_once']}** — {c['rows']} rows for {c['expected']} (question, sample) pairs: "
             f"{c['duplicates']} duplicates, {c['missing']} missing, {c['unexpected']} unexpected; "
             f"{res['counts']['quarantined']} quarantined (refused questions and retries exhausted).\n\n"
             f"Teacher outcomes (all attempts): {t['outcomes']}; answers given again for a (question, seed) "
             f"already answered (work redone after the kills): {t['answered_again']}.\n\n"
             f"Staging peak RSS (fresh process, streams the input): {res['staging_peak_rss_mb']}.")
    report.write(res, table, notes, params={"seed": args.seed, "quick": args.quick})
    return 0 if c["exactly_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
