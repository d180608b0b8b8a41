"""select: build the distillation training sets (S_D-T, S_D-R, S_E-T, S_E-A) in chat form from a solve output.

    divconq select --config configs/select.yaml [input.path=runs/solve output.dir=runs/select per_question=2]
    ray job submit --working-dir . -- python -m ray_jobs.select --config configs/select.yaml

No Ray needed: a deterministic group-by on the driver. A rerun replaces the previous select output.
"""

from __future__ import annotations

import logging
import sys
import time

from pipeline.jobs import parse_job_args, run_main
from pipeline.manifest import write_manifest
from pipeline.selection import SelectConfig, counts_of, select

log = logging.getLogger("divconq.select")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args("select", SelectConfig, argv, __doc__)

    def body() -> None:
        started = time.time()
        summary = select(cfg)
        write_manifest(cfg.output.dir, "select", cfg, inputs={"solved": cfg.input.path}, counts=counts_of(summary),
                       started_at=started,
                       extra={k: summary[k] for k in ("variants", "lineage", "warnings", "teachers", "solvers",
                                                      "prompt_version", "input_prompt_versions")})
        log.info("select done: %s -> %s", {v: c["splits"] for v, c in summary["variants"].items()}, cfg.output.dir)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
