"""infer: run a two-stage (static or dynamic) or single-stage system over a whole dataset.

    divconq infer --config configs/infer.yaml [mode=dynamic decomposer.base_url=http://head:8000/v1]

The decomposer/solver may be in-process models held by Ray Data actors (type: hf / vllm)
or a running serve app / OpenAI-compatible endpoint (type: openai). Resumable like generate.
"""

from __future__ import annotations

import sys

from pipeline.inference import InferConfig, run
from ray_jobs._shell import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("infer", InferConfig, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
