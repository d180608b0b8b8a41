"""estimate: requests, prompt tokens and the expected price (online and batch) of a job, before anything is spent.

    divconq estimate --config configs/generate.yaml [sampling.n=4 teacher.model=gpt-4o-mini]
    divconq estimate --config configs/infer.yaml --job infer

The job is taken from the config's keys (teacher: generate; decomposer/setting/mode: infer; solver:
solve) unless --job names it. Only the input rows are read: no Ray, no request to any model.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.config import ConfigError, load_config, load_yaml
from pipeline.estimate import CONFIGS, job_of, render, run
from ray_jobs._shell import config_error, run_main, setup_logging


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(prog="divconq estimate", description=__doc__)
    parser.add_argument("--config", "-c", required=True, help="a generate, solve or infer config (local or s3://)")
    parser.add_argument("--job", choices=sorted(CONFIGS), default=None, help="the job the config is for")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sampling.n=4")
    args = parser.parse_args(argv)
    try:
        job = args.job or job_of(load_yaml(args.config))
        cfg = load_config(CONFIGS[job], args.config, args.overrides)
    except ConfigError as e:
        raise config_error("estimate", e) from None

    def body() -> None:
        result = run(cfg).estimate
        print(json.dumps(result, indent=2) if args.json else render(result))

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
