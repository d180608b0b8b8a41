"""solve: a solver LLM answers every decomposition (two-stage static reasoning) and each answer is scored, on Ray Data.

    divconq solve --config configs/solve.yaml [solver.concurrency=32 input.path=runs/generate]
    ray job submit --working-dir . -- python -m ray_jobs.solve --config configs/solve.yaml

Killed midway? Run the same command again: committed shards are kept, the rest are redone.
"""

from __future__ import annotations

import sys

from pipeline.solving import SolveConfig, run
from ray_jobs._shell import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("solve", SolveConfig, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
