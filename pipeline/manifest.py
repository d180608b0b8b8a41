"""``manifest.json``: what a job did, from what, with which versions, in how long, for how many tokens.

Every job's ``run(cfg)`` returns a :class:`Manifest`; the jobs with an output directory also write it
there as ``manifest.json`` (its fields, then the job's own extra keys, at the top level).
"""

from __future__ import annotations

import platform
import time
from importlib import metadata
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

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


class Manifest(BaseModel):
    """What one run of a job did. Job-specific keys (``accuracy``, ``variants``, ``history``, ...) are
    extra fields: ``manifest.accuracy`` or ``manifest.model_extra``. ``config`` holds env-var *names*,
    never secrets."""

    model_config = ConfigDict(extra="allow")

    job: str
    status: str = "complete"
    config: dict[str, Any] = Field(default_factory=dict)
    inputs: dict[str, Any] = Field(default_factory=dict)
    counts: dict[str, Any] = Field(default_factory=dict)
    usage: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=package_versions)
    started_at: str
    wall_time_s: float

    @classmethod
    def of(cls, job: str, config: BaseModel, *, inputs: dict[str, Any], counts: dict[str, Any], started_at: float,
           usage: Optional[dict[str, Any]] = None, extra: Optional[dict[str, Any]] = None) -> "Manifest":
        """The manifest of a run of ``job`` that began at ``started_at`` (``time.time()``) and ends now."""
        return cls(job=job, config=config_to_dict(config), inputs=inputs, counts=counts, usage=usage or {},
                   started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
                   wall_time_s=round(time.time() - started_at, 3), **(extra or {}))

    def to_dict(self) -> dict[str, Any]:
        """The ``manifest.json`` mapping: the fields, then the extras, at the top level."""
        return self.model_dump()

    def write(self, out_dir: str) -> "Manifest":
        """Write ``<out_dir>/manifest.json``; returns ``self``."""
        storage.write_json(storage.join(out_dir, "manifest.json"), self.to_dict())
        return self


def write_manifest(out_dir: str, job: str, config: BaseModel, inputs: dict[str, Any], counts: dict[str, Any],
                   started_at: float, usage: Optional[dict[str, Any]] = None,
                   extra: Optional[dict[str, Any]] = None) -> Manifest:
    """``Manifest.of(...).write(out_dir)``: build the manifest of a finished run and write it."""
    return Manifest.of(job, config, inputs=inputs, counts=counts, started_at=started_at, usage=usage,
                       extra=extra).write(out_dir)


def read_manifest(out_dir: str) -> Optional[dict[str, Any]]:
    """The ``manifest.json`` of a job output as a plain mapping (any version of it), or None when absent."""
    path = storage.join(out_dir, "manifest.json")
    return storage.read_json(path) if storage.exists(path) else None
