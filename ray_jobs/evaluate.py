"""evaluate: prediction sets (infer outputs) -> report.md, results.json and PNG plots.

    divconq evaluate --config configs/evaluate.yaml
"""

from __future__ import annotations

import sys

from pipeline.evaluation import EvaluateConfig, run
from ray_jobs._shell import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("evaluate", EvaluateConfig, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
