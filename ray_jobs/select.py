"""select: build the distillation training sets (S_D-T, S_D-R, S_E-T, S_E-A) in chat form from a solve output.

    divconq select --config configs/select.yaml [input.path=runs/solve output.dir=runs/select per_question=2]
    ray job submit --working-dir . -- python -m ray_jobs.select --config configs/select.yaml

No Ray needed: a deterministic group-by on the driver. A rerun replaces the previous select output.
"""

from __future__ import annotations

import sys

from pipeline.selection import SelectConfig, run
from ray_jobs._shell import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("select", SelectConfig, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
