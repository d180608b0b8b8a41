"""generate: a teacher LLM writes decompositions for every question, n samples each, on Ray Data.

    divconq generate --config configs/generate.yaml [teacher.concurrency=32 sampling.n=4]
    ray job submit --working-dir . -- python -m ray_jobs.generate --config configs/generate.yaml

Killed midway? Run the same command again: committed shards are kept, the rest are redone.
"""

from __future__ import annotations

import logging
import sys
import time

from pipeline.generation import DecomposeWorker, GenerateConfig, expand_samples
from pipeline.cost import add_cost
from pipeline.jobs import init_ray, parse_job_args, run_main
from pipeline.manifest import write_manifest
from pipeline.outputs import filtered_rows
from pipeline.sharded import Layout, run_shards, run_summary, stage_requests

log = logging.getLogger("divconq.generate")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args("generate", GenerateConfig, argv, __doc__)

    def body() -> None:
        started = time.time()
        init_ray(cfg.ray)
        layout = Layout(cfg.output.dir)
        fingerprint = {"input": cfg.input.model_dump(), "teacher": cfg.teacher.model_dump(),
                       "sampling": cfg.sampling.model_dump(), "few_shot": cfg.few_shot, "shard_size": cfg.output.shard_size}
        requests = expand_samples(filtered_rows(cfg.input), cfg.sampling.n)
        shards = stage_requests(layout, requests, cfg.output.shard_size, fingerprint, cfg.output.overwrite)
        worker_kwargs = dict(teacher=cfg.teacher.model_dump(), sampling=cfg.sampling.model_dump(), few_shot=cfg.few_shot,
                             max_subquestions=cfg.max_subquestions, cache_dir=cfg.cache_dir, batch_size=cfg.pool.batch_size)
        totals = run_shards(layout, shards, DecomposeWorker, worker_kwargs, cfg.pool, "generate",
                            secret_env=[getattr(cfg.teacher, "api_key_env", None)])
        counts, usage = run_summary(totals, cfg.pricing, time.time() - started)
        add_cost(usage, totals, cfg.pricing)  # actual tokens and cost per stage, model and mode
        write_manifest(cfg.output.dir, "generate", cfg, inputs={"questions": cfg.input.path}, counts=counts,
                       started_at=started, usage=usage)
        log.info("generate done: %s | tokens %d | est. cost %.4f %s -> %s", counts, usage["total_tokens"],
                 usage["estimated_cost"], usage["currency"], cfg.output.dir)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
