"""``divconq <job> --config FILE [key=value ...]``: dispatch to ``ray_jobs.<job>.main`` (a shell over the
job's library call ``run(cfg) -> Manifest``)."""

from __future__ import annotations

import importlib
import sys

JOBS = ("prepare", "generate", "solve", "select", "train", "serve", "infer", "evaluate", "quickstart", "estimate")


def config_model(job: str):
    """The pydantic model that validates ``job``'s config (``ray_jobs.<job>.<Job>Config``)."""
    return getattr(importlib.import_module(f"ray_jobs.{job}"), f"{job.capitalize()}Config")


USAGE = "usage: divconq <job> [--config FILE] [key.sub=value ...]\njobs: " + ", ".join(JOBS)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    job, rest = argv[0], argv[1:]
    if job not in JOBS:
        print(f"divconq: unknown job {job!r}\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"ray_jobs.{job}")
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
