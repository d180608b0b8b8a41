"""Joining or starting Ray: what every job that runs on a cluster does first."""

from __future__ import annotations

import logging
import os

from pipeline.config import RayConfig

SETUP_HOOK = "pipeline.cluster.quiet_without_dashboard"  # the import path Ray workers resolve


def init_ray(cfg: RayConfig) -> None:
    """Join the cluster in ``cfg.address`` / ``RAY_ADDRESS`` or start local Ray with this machine's cores."""
    import ray  # lazy: ~1 s to import, and the CLI imports this module just to validate a config

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
        env.setdefault("worker_process_setup_hook", SETUP_HOOK)
        kwargs["runtime_env"] = env
    ray.init(num_cpus=cfg.num_cpus or os.cpu_count(), **kwargs)


def shutdown_ray() -> None:
    """Leave Ray: a local Ray this process started stops, and the actors it owns (a Train job's controller) die."""
    import ray  # lazy: as init_ray

    if ray.is_initialized():
        ray.shutdown()


def cluster_cpus() -> float:
    """The CPUs of the Ray cluster this process has joined (logical: what Ray schedules by)."""
    import ray  # lazy: as init_ray

    return float(ray.cluster_resources().get("CPU", 1))


def quiet_without_dashboard() -> None:
    """Worker setup hook for local Ray without a dashboard: Ray Train's placement-group cleaner polls the
    state API (served by the dashboard) every few seconds and would log a warning each time it is absent."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
