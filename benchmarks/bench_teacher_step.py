"""The quickstart teacher's training speed: micro-batch and threads of its one Ray Train worker.

    python -m benchmarks.bench_teacher_step [--quick] [--steps 300]

The teacher is the quickstart's largest cost (6,000 steps of 32 rows). Its model is tiny (64 wide,
2 layers), so a step's fixed costs (Python, DeepSpeed's engine, the optimizer over many small
tensors) weigh as much as its arithmetic; a bigger micro-batch or a second intra-op thread may buy
rows per second. Each configuration trains the quickstart's own teacher (its world, corpus, word
tokenizer and size) for the same number of steps in one process with Ray started once; the figure
is rows/s in the training loop (the manifest's elapsed time) as a ratio to the quickstart's setting
(32 rows, one thread).
"""

from __future__ import annotations

import os
import sys
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.bench_train_fixed_cost import run_job  # noqa: E402

NAME = "bench_teacher_step"
SETTINGS = ((32, 1), (64, 1), (128, 1), (32, 2), (64, 2), (128, 2))  # (micro-batch rows, CPUs = torch threads)


def teacher_config(teacher, batch: int, cpus: int, steps: int):
    """The quickstart's teacher job with ``batch`` rows per step on ``cpus`` threads, in its own output dirs."""
    from pipeline.config import updated

    name = f"teacher-b{batch}-c{cpus}"
    return updated(teacher, {"deepspeed": {"micro_batch_size": batch}, "scaling": {"cpus_per_worker": cpus},
                             "schedule": {"max_steps": steps, "checkpoint_every_steps": 10 * steps}, "failure": {"max_failures": 0},
                             "output": {"dir": os.path.join(os.path.dirname(teacher.output.dir), name), "run_name": name}})


def main(argv: Optional[list[str]] = None) -> int:
    from pipeline.quickstart import Quickstart, QuickstartConfig

    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="steps of each job (default 300, quick 30)")
    args = p.parse_args(argv)
    rep = common.Report(NAME, args, "The quickstart teacher's training step: micro-batch and threads")
    steps = args.steps or (30 if rep.quick else 300)
    teacher = Quickstart(QuickstartConfig(out=common.scratch(NAME))).teacher_job()
    common.shutdown_ray()
    common.start_local_ray(2)
    results, rows = {}, []
    try:
        for batch, cpus in SETTINGS:
            r = results[f"b{batch}-c{cpus}"] = run_job(teacher_config(teacher, batch, cpus, steps))
            r["rows_per_s"] = batch * steps / r["loop_s"]
            r["tokens_per_s"] = r["tokens"] / r["loop_s"]
            print(f"batch {batch}, {cpus} thread(s): {r['rows_per_s']:.0f} rows/s, {r['tokens_per_s']:.0f} tokens/s in the loop", flush=True)
    finally:
        common.shutdown_ray()
    base = results["b32-c1"]
    for key, r in results.items():
        batch, cpus = (int(x[1:]) for x in key.split("-"))
        rows.append([batch, cpus, steps, f"{r['rows_per_s']:.0f}", f"{r['tokens_per_s']:.0f}",
                     f"{r['rows_per_s'] / base['rows_per_s']:.2f}x", f"{r['wall_s']:.0f}"])
    table = common.md_table(["rows/step", "threads", "steps", "rows/s (loop)", "tokens/s (loop)", "vs 32 rows, 1 thread", "job s"], rows)
    rep.write(results, table, params={"steps": steps, "settings": SETTINGS})
    return 0


if __name__ == "__main__":
    sys.exit(main())
