"""Where a served setting's CPU goes: the quickstart's static teacher setting through the app vs in-process.

    python -m benchmarks.bench_serve_overhead --run /tmp/qs14/run [--quick]

On a finished quickstart run, the setting "teacher QD + teacher QA (static)" over every test question twice,
in one process with Ray started once: with the teacher in the infer actor (``hf`` backend, the baseline), and
through the served teacher (``divconq serve``, the ``openai`` backend over HTTP, what the quickstart does), the
app built twice: the models in their own deployments behind the ingress, and colocated in the ingress replica.
Each time, the CPU seconds of this process tree (``measure.TreeCPU``: the driver, local Ray and every
actor) over the infer job, grouped by role: the model replicas, Serve's HTTP proxy and ingress replica, the infer actor, Ray Data's
and Ray's own actors, and the rest. Answers: how much of the served infer stage is model compute, and how
much is the serving path around it (results/bench_serve_overhead.md).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, measure  # noqa: E402

NAME = "bench_serve_overhead"
# role of a process, by the first pattern its command line contains (checked in this order)
ROLES = (("model replicas", ("ServeReplica:divconq:Decomposer", "ServeReplica:divconq:Solver")),
         ("Serve proxy + ingress", ("ProxyActor", "ServeReplica:divconq:Ingress", "ServeController")),
         ("infer actor", ("MapBatches(InferWorker)",)),
         ("Ray Data + Ray actors", ("_StatsActor", "_AutoscalingCoordinatorActor", "ActorLocationTracker", "ray::")),
         ("Ray daemons", ("gcs_server", "raylet", "dashboard", "ray/_private")))


def role(cmd: str) -> str:
    for name, patterns in ROLES:
        if any(p in cmd for p in patterns):
            return name
    return "driver + other"


def measured(qs, setting, out_dir: str) -> dict[str, Any]:
    """Infer ``setting`` into ``out_dir``: wall seconds and CPU seconds by role."""
    from pipeline import inference
    from pipeline.config import updated

    cfg = updated(qs.infer_config(setting), {"output": {"dir": out_dir}})
    t0 = time.perf_counter()
    with measure.TreeCPU() as tree:  # polled: the infer actor, which exits with the job, is counted too
        inference.run(cfg)
    wall = time.perf_counter() - t0
    by_role = {k: round(v, 2) for k, v in tree.cpu_by(role).items()}
    return {"wall_s": round(wall, 2), "cpu_s": round(tree.cpu_s, 2), "by_role": by_role}


def main(argv: Optional[list[str]] = None) -> int:
    from pipeline.backends.hf_local import HFBackendConfig
    from pipeline.config import updated
    from pipeline.serving.app import shutdown, start
    from pipeline.quickstart import TEACHER_QA, TEACHER_QD, Quickstart, QuickstartConfig, Setting

    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished quickstart run (its teacher and test questions)")
    args = p.parse_args(argv)
    rep = common.Report(NAME, args, "Where a served setting's CPU goes (the quickstart's static teacher setting)")
    root = common.scratch(NAME)
    run = os.path.join(root, "run")
    shutil.copytree(args.run, run, ignore=shutil.ignore_patterns("infer", "report", "logs", "checkpoints"))
    qs = Quickstart(QuickstartConfig(out=run, port=common.free_port()))
    common.shutdown_ray()
    common.start_local_ray(2)
    results: dict[str, Any] = {}
    try:
        teacher = HFBackendConfig(model=qs.p("teacher", "model"), batch_size=64)
        local = Setting("teacher static, in-process", "in-process", "static", teacher, teacher, ("teacher", "teacher"))
        results["in-process"] = measured(qs, local, os.path.join(root, "in-process"))
        for way, colocate in (("served", False), ("served, colocated", True)):
            cfg = updated(qs.serve_config(qs.p("teacher", "model"), TEACHER_QD), {"colocate": colocate})
            base_url = start(cfg)
            try:
                served = Setting(f"teacher static, {way}", way, "static", qs.remote(base_url, TEACHER_QD),
                                 qs.remote(base_url, TEACHER_QA), ("teacher", "teacher"))
                results[way] = measured(qs, served, os.path.join(root, way.replace(", ", "-")))
            finally:
                shutdown(cfg.app_name)
    finally:
        common.shutdown_ray()
    roles = [name for name, _ in ROLES] + ["driver + other"]
    rows = [[way, f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", *(f"{r['by_role'].get(k, 0.0):.1f}" for k in roles)]
            for way, r in results.items()]
    base = results["in-process"]
    notes = " ".join(f"{way.capitalize()} / in-process: {results[way]['cpu_s'] / base['cpu_s']:.2f}x the CPU seconds, "
                     f"{results[way]['wall_s'] / base['wall_s']:.2f}x the wall time." for way in ("served", "served, colocated"))
    notes += (" In-process, the model runs inside the infer actor, so its CPU is in that column; colocated "
              "(`colocate: true`), it runs inside the ingress replica, so its CPU is in the proxy + ingress column.")
    rep.write(results, common.md_table(["teacher", "wall s", "CPU s", *roles], rows), notes,
              params={"run": args.run, "setting": "teacher QD + teacher QA (static)"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
