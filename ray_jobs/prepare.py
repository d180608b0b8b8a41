"""prepare: load raw corpora (local, s3:// or hf://) into the normalized question schema.

    divconq prepare --config configs/prepare.yaml [output.dir=s3://bucket/prepared]
    ray job submit --working-dir . -- python -m ray_jobs.prepare --config configs/prepare.yaml
"""

from __future__ import annotations

import logging
import sys
import time

from pipeline.jobs import parse_job_args, run_main
from pipeline.manifest import write_manifest
from pipeline.preparation import PrepareConfig, prepare

log = logging.getLogger("divconq.prepare")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args("prepare", PrepareConfig, argv, __doc__)

    def body() -> None:
        started = time.time()
        counts = prepare(cfg)
        write_manifest(cfg.output.dir, "prepare", cfg, inputs={"sources": [s.path for s in cfg.sources]},
                       counts=counts, started_at=started)
        log.info("prepare: %d rows in, %d out, %d quarantined -> %s", counts["rows_in"], counts["rows_out"],
                 counts["quarantined"], cfg.output.dir)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
