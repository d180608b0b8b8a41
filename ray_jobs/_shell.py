"""The shell every job's command shares: argument parsing, config errors, logging, exit codes.

A job is ``run(cfg) -> Manifest`` in the library; ``divconq <job>`` and ``python -m ray_jobs.<job>``
(what ``ray job submit`` runs) are :func:`job_main` over it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Optional, TypeVar

from pydantic import BaseModel

from pipeline.backends.base import BackendUnavailable
from pipeline.config import ConfigError, UsageError, load_config
from pipeline.sharded import ShardFailed

M = TypeVar("M", bound=BaseModel)

log = logging.getLogger("divconq")

# What the user can fix (a config or usage error, a backend or storage that cannot be reached: OSError
# covers S3 and missing files): one line. Anything else is a bug in divconq: its traceback.
USER_ERRORS = (ConfigError, UsageError, BackendUnavailable, ShardFailed, OSError)


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=os.environ.get("DIVCONQ_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def config_error(job: str, e: ConfigError) -> SystemExit:
    """Print ``divconq <job>: <message naming the key>``; the caller raises the returned exit 2."""
    print(f"divconq {job}: {e}", file=sys.stderr)
    return SystemExit(2)


def parse_job_args(job: str, model: type[M], argv: Optional[list[str]] = None, description: str = "") -> M:
    """Parse ``--config FILE`` plus ``key.sub=value`` overrides into a validated config.

    Exits with status 2 and a message naming the key on any config error.
    """
    setup_logging()
    parser = argparse.ArgumentParser(prog=f"divconq {job}", description=description)
    parser.add_argument("--config", "-c", default=None, help="YAML config file (local or s3://)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. teacher.concurrency=16")
    args = parser.parse_args(argv)
    try:
        return load_config(model, args.config, args.overrides)
    except ConfigError as e:
        raise config_error(job, e) from None


def run_main(fn: Callable[[], object]) -> int:
    """Run a job body and turn its outcome into an exit status: ``fn``'s own int, else 0; 1 with a
    one-line message for :data:`USER_ERRORS`; 1 with the full traceback for anything else."""
    try:
        result = fn()
    except USER_ERRORS as e:
        log.error("%s: %s", type(e).__name__, e)
        return 1
    except Exception:
        log.exception("unexpected error: a bug in divconq, not in the input or config; please report it with this traceback")
        return 1
    return result if isinstance(result, int) else 0


def job_main(job: str, model: type[M], run: Callable[[M], object], argv: Optional[list[str]] = None,
             description: str = "") -> int:
    """``divconq <job> --config F k=v ...``: parse and validate the config, then ``run(cfg)``."""
    cfg = parse_job_args(job, model, argv, description)
    return run_main(lambda: run(cfg))
