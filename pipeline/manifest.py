"""``manifest.json``: what a job did, from what, with which versions, in how long, for how many tokens."""

from __future__ import annotations

import platform
import time
from importlib import metadata
from typing import Any, Optional

from pydantic import BaseModel

from pipeline import storage
from pipeline.config import config_to_dict

TRACKED_PACKAGES = ("divconq", "ray", "torch", "transformers", "deepspeed", "pyarrow", "vllm", "openai")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def write_manifest(
    out_dir: str,
    job: str,
    config: BaseModel,
    inputs: dict[str, Any],
    counts: dict[str, int],
    started_at: float,
    usage: Optional[dict[str, Any]] = None,
    extra: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Write ``<out_dir>/manifest.json`` and return it. ``config`` holds env-var *names*, never secrets."""
    manifest = {
        "job": job,
        "status": "complete",
        "config": config_to_dict(config),
        "inputs": inputs,
        "counts": counts,
        "usage": usage or {},
        "versions": package_versions(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
        "wall_time_s": round(time.time() - started_at, 3),
    }
    if extra:
        manifest.update(extra)
    storage.write_json(storage.join(out_dir, "manifest.json"), manifest)
    return manifest


def read_manifest(out_dir: str) -> Optional[dict[str, Any]]:
    path = storage.join(out_dir, "manifest.json")
    return storage.read_json(path) if storage.exists(path) else None
