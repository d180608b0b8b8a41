"""``divconq train``: distill the decomposer (or solver) into students with DeepSpeed on Ray Train.

The job itself is :func:`training.job.run` (one model, or several in one worker group: see
``training/config.py``). Re-running with the same output.checkpoint_dir and output.run_name
resumes each model from its latest checkpoint; a model already exported is skipped.

    python -m ray_jobs.train --config configs/train.yaml deepspeed.zero_stage=3
"""

from __future__ import annotations

import sys
from typing import Optional

from pipeline.jobs import parse_job_args, run_main
from training.config import TrainConfig
from training.job import run


def main(argv: Optional[list[str]] = None) -> int:
    cfg = parse_job_args("train", TrainConfig, argv, description=__doc__.splitlines()[0])

    def job() -> int:
        run(cfg)
        return 0

    return run_main(job)


if __name__ == "__main__":
    sys.exit(main())
