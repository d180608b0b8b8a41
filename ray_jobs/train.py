"""``divconq train``: distill the decomposer (or solver) into a student with DeepSpeed on Ray Train.

Recipe: config -> Ray -> base model (tiny built from the training text, or any HF causal
LM) -> TorchTrainer(DeepSpeed loop, checkpoints + fault tolerance) -> export the final
Hugging Face model -> manifest.json. Re-running with the same output.checkpoint_dir and
output.run_name resumes from the run's latest checkpoint.

    python -m ray_jobs.train --config configs/train.yaml deepspeed.zero_stage=3
"""

from __future__ import annotations

import sys
from typing import Optional

from training.config import TrainConfig
from training.job import run
from ray_jobs._shell import job_main


def main(argv: Optional[list[str]] = None) -> int:
    return job_main("train", TrainConfig, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
