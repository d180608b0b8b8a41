"""What every job script shares: argument parsing, config errors, Ray start-up, logging."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Optional, TypeVar

from pydantic import BaseModel

from pipeline.config import ConfigError, RayConfig, UsageError, load_config

M = TypeVar("M", bound=BaseModel)

log = logging.getLogger("divconq")


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=os.environ.get("DIVCONQ_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


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
        print(f"divconq {job}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def init_ray(cfg: RayConfig) -> None:
    """Join the cluster in ``cfg.address`` / ``RAY_ADDRESS`` or start local Ray with this machine's cores."""
    import ray

    if ray.is_initialized():
        return
    kwargs = dict(include_dashboard=cfg.include_dashboard, log_to_driver=True, ignore_reinit_error=True)
    if cfg.runtime_env:
        kwargs["runtime_env"] = cfg.runtime_env
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        return
    if not cfg.include_dashboard:
        env = dict(kwargs.get("runtime_env") or {})
        env.setdefault("worker_process_setup_hook", "pipeline.jobs.quiet_without_dashboard")
        kwargs["runtime_env"] = env
    ray.init(num_cpus=cfg.num_cpus or os.cpu_count(), **kwargs)


def quiet_without_dashboard() -> None:
    """Worker setup hook for local Ray without a dashboard: Ray Train's placement-group cleaner polls the
    state API (served by the dashboard) every few seconds and would log a warning each time it is absent."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def run_main(fn: Callable[[], int | None]) -> int:
    """Run a job body: exit 1 with a one-line message for what the user can fix (a config or usage
    error, a backend or storage that cannot be reached: OSError covers S3 and missing files); exit 1
    with the full traceback for anything else, which is a bug in divconq."""
    from pipeline.backends.base import BackendUnavailable
    from pipeline.sharded import ShardFailed

    try:
        return fn() or 0
    except (ConfigError, UsageError, BackendUnavailable, ShardFailed, OSError) as e:
        log.error("%s: %s", type(e).__name__, e)
        return 1
    except Exception:
        log.exception("unexpected error: a bug in divconq, not in the input or config; please report it with this traceback")
        return 1
