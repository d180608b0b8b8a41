"""infer: run a two-stage (static or dynamic) or single-stage system over a whole dataset.

    divconq infer --config configs/infer.yaml [mode=dynamic decomposer.base_url=http://head:8000/v1]

The decomposer/solver may be in-process models held by Ray Data actors (type: hf / vllm)
or a running serve app / OpenAI-compatible endpoint (type: openai). Resumable like generate.
"""

from __future__ import annotations

import logging
import sys
import time

from pipeline.inference import InferConfig, InferWorker, as_requests
from pipeline.config import UsageError
from pipeline.cost import add_cost
from pipeline.jobs import init_ray, parse_job_args, run_main
from pipeline.manifest import write_manifest
from pipeline.outputs import filtered_rows
from pipeline.sharded import Layout, run_shards, run_summary, stage_requests

log = logging.getLogger("divconq.infer")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args("infer", InferConfig, argv, __doc__)

    def body() -> None:
        started = time.time()
        if cfg.mode in ("static", "dynamic") and cfg.decomposer is None:
            raise UsageError(f"mode {cfg.mode!r} needs a `decomposer` backend in the config")
        init_ray(cfg.ray)
        layout = Layout(cfg.output.dir)
        fingerprint = cfg.model_dump(include={"input", "setting", "mode", "decomposer", "solver", "decomposer_sampling",
                                              "solver_sampling", "decomposer_few_shot", "solver_few_shot"})
        fingerprint["shard_size"] = cfg.output.shard_size
        shards = stage_requests(layout, as_requests(filtered_rows(cfg.input)), cfg.output.shard_size, fingerprint, cfg.output.overwrite)
        secrets = [getattr(b, "api_key_env", None) for b in (cfg.decomposer, cfg.solver) if b is not None]
        totals = run_shards(layout, shards, InferWorker, {"cfg": cfg.model_dump(), "batch_size": cfg.pool.batch_size},
                            cfg.pool, f"infer[{cfg.setting}]", secret_env=secrets)
        counts, usage = run_summary(totals, cfg.pricing, time.time() - started)
        add_cost(usage, totals, cfg.pricing)  # actual tokens and cost per stage, model and mode
        write_manifest(cfg.output.dir, "infer", cfg, inputs={"questions": cfg.input.path}, counts=counts,
                       started_at=started, usage=usage, extra={"setting": cfg.setting, "mode": cfg.mode})
        log.info("infer[%s] done: %s -> %s", cfg.setting, counts, cfg.output.dir)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
