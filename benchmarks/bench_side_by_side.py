"""The quickstart's students: one train job against single-worker jobs side by side.

    python -m benchmarks.bench_side_by_side --run runs/quickstart [--quick] [--steps 600]

Each of the quickstart's models trains on one Ray Train worker with one torch thread (two gloo workers
on two cores spin more than they compute: benchmarks/results/probe_world.md), so one job at a time
leaves a 2-core machine's second core idle. The quickstart deals its students over as many jobs as the
cluster has CPUs and runs them side by side (``Quickstart.student_jobs`` / ``steps_together``). This
trains the four students of a finished quickstart run (its ``select/`` sets and ``student_base/model``)
both ways, with Ray started once: the baseline is all of them in one job (the quickstart's arrangement
before), the variant two jobs side by side. The figure is the stage's wall time as a ratio; each
student's final loss is shown for both arrangements (the same schedule and seed train the same model).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

NAME = "bench_side_by_side"


def quickstart_copy(run: str, out: str, steps: int):
    """A Quickstart in ``out`` holding ``run``'s training sets and students' base, its students at ``steps``."""
    from pipeline.quickstart import FineTune, Quickstart, QuickstartConfig

    qs = Quickstart(QuickstartConfig(out=out))
    for part in ("select", os.path.join("student_base", "model")):
        shutil.copytree(os.path.join(run, part), qs.p(part))
    plan = qs.plan
    qs.plan = dataclasses.replace(plan, decomposer=FineTune(steps, plan.decomposer.lr), solver=FineTune(steps, plan.solver.lr))
    return qs


def train(run: str, out: str, steps: int, jobs: int) -> dict:
    """The students of ``run`` in ``jobs`` side-by-side train jobs: wall time and each student's final loss."""
    from pipeline.manifest import read_manifest
    from pipeline.quickstart import STUDENTS
    from training.job import run as train_job

    qs = quickstart_copy(run, out, steps)
    names = [n for n in STUDENTS if os.path.isdir(qs.p("select", STUDENTS[n], "train"))]
    t0 = time.perf_counter()
    qs.steps_together({", ".join(group): (lambda cfg=cfg: train_job(cfg)) for group, cfg in qs.student_jobs(names, jobs)})
    wall = time.perf_counter() - t0
    loss = {n: read_manifest(qs.p("students", n))["metrics"]["loss"] for n in names}
    return {"jobs": jobs, "students": names, "wall_s": wall, "loss": loss, "stage_s": qs.timings}


def main(argv: Optional[list[str]] = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished quickstart run (its select/ and student_base/model)")
    p.add_argument("--steps", type=int, default=None, help="steps of each student (default the quickstart's 600, quick 60)")
    args = p.parse_args(argv)
    rep = common.Report(NAME, args, "The quickstart's students: one train job against two side by side")
    steps = args.steps or (60 if rep.quick else 600)
    scratch = common.scratch(NAME)
    common.shutdown_ray()
    common.start_local_ray(2)
    try:
        results = {f"{jobs} job(s)": train(args.run, os.path.join(scratch, f"jobs{jobs}"), steps, jobs) for jobs in (1, 2)}
    finally:
        common.shutdown_ray()
    base = results["1 job(s)"]
    rows = [[r["jobs"], steps, f"{r['wall_s']:.0f}", f"{base['wall_s'] / r['wall_s']:.2f}x",
             ", ".join(f"{n} {r['loss'][n]:.4f}" for n in r["students"])] for r in results.values()]
    table = common.md_table(["train jobs", "steps per student", "stage wall s", "speed vs one job", "final loss"], rows)
    rep.write(results, table, params={"run": args.run, "steps": steps})
    return 0


if __name__ == "__main__":
    sys.exit(main())
