"""generate: a teacher LLM writes decompositions for every question, n samples each, on Ray Data.

    divconq generate --config configs/generate.yaml [teacher.concurrency=32 sampling.n=4]
    ray job submit --working-dir . -- python -m ray_jobs.generate --config configs/generate.yaml

Killed midway? Run the same command again: committed shards are kept, the rest are redone.
"""

from __future__ import annotations

import sys

from pipeline.generation import GenerateConfig, run
from ray_jobs._shell import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("generate", GenerateConfig, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
