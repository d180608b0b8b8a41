"""Serve the distilled decomposer (and a solver) over HTTP with Ray Serve.

``from pipeline.serving import ServeConfig, build_app, start, shutdown``; Ray is imported
only when an app is built or started.
"""

from __future__ import annotations

from typing import Any

from pipeline.serving.config import ServeConfig

__all__ = ["ServeConfig", "app_builder", "build_app", "load_serve_config", "shutdown", "start"]


def __getattr__(name: str) -> Any:
    if name in ("app_builder", "build_app", "load_serve_config", "shutdown", "start"):
        from pipeline.serving import app

        return getattr(app, name)
    raise AttributeError(f"module 'pipeline.serving' has no attribute {name!r}")
