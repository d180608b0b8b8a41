"""What Ray Train's metrics reports cost a small model's training: every 10 steps vs at most every 30 s.

    python -m benchmarks.bench_report_interval [--quick] [--steps 300]

``ray.train.report`` waits for the controller's next poll of the worker. The recipe reported metrics
every ``schedule.log_every_steps`` (10) steps; it now sends metrics-only reports to Ray Train at most
every ``schedule.report_every_s`` (checkpoints always). Both runs train the same tiny Llama
(bench_training's h128/l4 on its GSM8K SFT rows) for the same steps in one process with Ray started
once: the figure is the ratio of their whole-job tokens/s (baseline: ``report_every_s: 0``, every 10
steps), the loss must be identical (reports do not touch the training).
"""

from __future__ import annotations

import os
import sys
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.bench_train_fixed_cost import job_config, run_job  # noqa: E402
from benchmarks.bench_training import write_sft_data  # noqa: E402

NAME = "bench_report_interval"


def main(argv: Optional[list[str]] = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="steps of each job (default 300, quick 40)")
    args = p.parse_args(argv)
    rep = common.Report(NAME, args, "Ray Train metrics reports: every 10 steps vs at most every 30 s")
    steps = args.steps or (40 if rep.quick else 300)
    model_dir = common.tiny_model(hidden=128, layers=4)
    work = common.scratch("report_interval")
    data_dir = write_sft_data(common.prepared_questions(), os.path.join(work, "sft"))
    common.shutdown_ray()
    common.start_local_ray(2)
    rows, results = [], {}
    try:
        for label, every_s in (("every 10 steps (report_every_s 0, the old behaviour)", 0.0), ("at most every 30 s", 30.0)):
            cfg = job_config(model_dir, data_dir, os.path.join(work, str(every_s)), names=["m"], steps=steps, workers=1)
            cfg = cfg.model_copy(update={"schedule": cfg.schedule.model_copy(update={"log_every_steps": 10,
                                                                                     "report_every_s": every_s})})
            r = results[label] = run_job(cfg)
            rows.append([label, steps, int(r["tokens"]), r["tokens"] / r["wall_s"], r["wall_s"]])
            print(f"{label}: {r['wall_s']:.1f} s, {r['tokens'] / r['wall_s']:.0f} tokens/s", flush=True)
    finally:
        common.shutdown_ray()
    base, new = (results[k] for k in results)
    ratio = (new["tokens"] / new["wall_s"]) / (base["tokens"] / base["wall_s"])
    table = common.md_table(["metrics reports", "steps", "tokens", "tokens/s whole job", "job s"], rows)
    rep.write({"results": results, "speedup": ratio}, table, f"Whole-job speed-up: **{ratio:.2f}x** (1 worker, 1 CPU).\n",
              params={"steps": steps})
    return 0


if __name__ == "__main__":
    sys.exit(main())
