"""estimate: requests, prompt tokens and the expected price (online and batch) of a job, before anything is spent.

    divconq estimate --config configs/generate.yaml [sampling.n=4 teacher.model=gpt-4o-mini]
    divconq estimate --config configs/infer.yaml --job infer

The job is taken from the config's keys (teacher: generate; decomposer/setting/mode: infer; solver:
solve) unless --job names it. Only the input rows are read: no Ray, no request to any model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.config import ConfigError, load_config, load_yaml
from pipeline.estimate import ESTIMATORS, estimate, render
from pipeline.jobs import run_main, setup_logging

log = logging.getLogger("divconq.estimate")


def job_of(data: dict) -> str:
    """Which job a config file is for, from its top-level keys."""
    if "teacher" in data:
        return "generate"
    if {"decomposer", "setting", "mode"} & set(data):
        return "infer"
    if "solver" in data:
        return "solve"
    raise ConfigError("cannot tell which job this config is for (no teacher, solver or decomposer key); pass --job")


def main(argv: list[str] | None = None) -> int:
    from ray_jobs.cli import config_model

    setup_logging()
    parser = argparse.ArgumentParser(prog="divconq estimate", description=__doc__)
    parser.add_argument("--config", "-c", required=True, help="a generate, solve or infer config (local or s3://)")
    parser.add_argument("--job", choices=sorted(ESTIMATORS), default=None, help="the job the config is for")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sampling.n=4")
    args = parser.parse_args(argv)
    try:
        job = args.job or job_of(load_yaml(args.config))
        cfg = load_config(config_model(job), args.config, args.overrides)
    except ConfigError as e:
        print(f"divconq estimate: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    def body() -> None:
        result = estimate(job, cfg)
        print(json.dumps(result, indent=2) if args.json else render(result))

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
