"""prepare: load raw corpora (local, s3:// or hf://) into the normalized question schema.

    divconq prepare --config configs/prepare.yaml [output.dir=s3://bucket/prepared]
    ray job submit --working-dir . -- python -m ray_jobs.prepare --config configs/prepare.yaml
"""

from __future__ import annotations

import sys

from pipeline.preparation import PrepareConfig, run
from ray_jobs._shell import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("prepare", PrepareConfig, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
