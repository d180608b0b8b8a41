"""solve: a solver LLM answers every decomposition (two-stage static reasoning) and each answer is scored, on Ray Data.

    divconq solve --config configs/solve.yaml [solver.concurrency=32 input.path=runs/generate]
    ray job submit --working-dir . -- python -m ray_jobs.solve --config configs/solve.yaml

Killed midway? Run the same command again: committed shards are kept, the rest are redone.
"""

from __future__ import annotations

import logging
import sys
import time

from pipeline.cost import add_cost
from pipeline.jobs import init_ray, parse_job_args, run_main
from pipeline.manifest import write_manifest
from pipeline.outputs import filtered_rows
from pipeline.sharded import Layout, run_shards, run_summary, stage_requests
from pipeline.solving import SolveConfig, SolveWorker, accuracy_summary, input_schema, solve_schema

log = logging.getLogger("divconq.solve")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args("solve", SolveConfig, argv, __doc__)

    def body() -> None:
        started = time.time()
        schema = solve_schema(input_schema(cfg.input.path))
        init_ray(cfg.ray)
        layout = Layout(cfg.output.dir)
        fingerprint = {"input": cfg.input.model_dump(), "solver": cfg.solver.model_dump(), "sampling": cfg.sampling.model_dump(),
                       "few_shot": cfg.few_shot, "drop_f1_threshold": cfg.drop_f1_threshold, "shard_size": cfg.output.shard_size}
        shards = stage_requests(layout, filtered_rows(cfg.input), cfg.output.shard_size, fingerprint, cfg.output.overwrite)
        worker_kwargs = dict(solver=cfg.solver.model_dump(), sampling=cfg.sampling.model_dump(), few_shot=cfg.few_shot,
                             drop_f1_threshold=cfg.drop_f1_threshold, schema=schema, cache_dir=cfg.cache_dir,
                             batch_size=cfg.pool.batch_size)
        totals = run_shards(layout, shards, SolveWorker, worker_kwargs, cfg.pool, "solve",
                            secret_env=[getattr(cfg.solver, "api_key_env", None)])
        counts, usage = run_summary(totals, cfg.pricing, time.time() - started)
        add_cost(usage, totals, cfg.pricing)  # actual tokens and cost per stage, model and mode
        accuracy = accuracy_summary(totals)
        counts["parse_warnings"] = int(totals.get("parse_warnings", 0))
        write_manifest(cfg.output.dir, "solve", cfg, inputs={"decompositions": cfg.input.path}, counts=counts,
                       started_at=started, usage=usage, extra={"accuracy": accuracy})
        log.info("solve done: %s | accuracy %s | tokens %d | est. cost %.4f %s -> %s", counts,
                 {k: v["accuracy"] for k, v in accuracy.items()}, usage["total_tokens"], usage["estimated_cost"],
                 usage["currency"], cfg.output.dir)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
