"""Serve the distilled decomposer (and a solver) over HTTP with Ray Serve.

``from pipeline.serving import ServeConfig, build_app, run, start, start_http, shutdown``; Ray is imported
only when an app is built or started.
"""

from __future__ import annotations

from typing import Any

from pipeline.serving.config import ServeConfig, load_serve_config

__all__ = ["ServeConfig", "app_builder", "build_app", "load_serve_config", "run", "shutdown", "start", "start_http"]

_APP_NAMES = ("app_builder", "build_app", "run", "shutdown", "start", "start_http")


def __getattr__(name: str) -> Any:
    if name in _APP_NAMES:
        # lazy: pipeline.serving.config (imported through this package) must stay cheap; app pulls in httpx and storage
        from pipeline.serving import app

        return getattr(app, name)
    raise AttributeError(f"module 'pipeline.serving' has no attribute {name!r}")
