"""Config sections shared by the sharded jobs (generate, solve, infer): input, output, and their common base."""

from __future__ import annotations

from typing import Any, ClassVar, Optional

from pydantic import Field

from pipeline import tables
from pipeline.config import ActorPoolConfig, PricingConfig, RayConfig, Strict


class InputConfig(Strict):
    path: str = Field(..., description="A previous job's output dir, or a Parquet file/dir (local or s3://).")
    limit: Optional[int] = Field(None, ge=1, description="Use only the first N input rows.")
    datasets: Optional[list[str]] = Field(None, description="Keep only these datasets.")
    splits: Optional[list[str]] = Field(None, description="Keep only these splits.")


class OutputConfig(Strict):
    dir: str = Field(..., description="Output directory (local or s3://).")
    overwrite: bool = Field(False, description="Delete an existing output first instead of resuming it.")
    shard_size: int = Field(64, ge=1, le=100_000, description="Rows per work unit (the redo window on a crash).")


class ShardedJobConfig(Strict):
    """What every job run over shards by an actor pool has; each job adds its backends and options."""

    ray: RayConfig = Field(default_factory=RayConfig)
    input: InputConfig
    output: OutputConfig
    pool: ActorPoolConfig = Field(default_factory=ActorPoolConfig)
    cache_dir: Optional[str] = Field(None, description="Response cache (local or s3://); None disables it.")
    pricing: PricingConfig = Field(default_factory=PricingConfig)

    # The sections that decide "the same job": a rerun into the same output.dir resumes only when they
    # (and output.shard_size, which fixes the work units) are unchanged.
    fingerprint_fields: ClassVar[tuple[str, ...]] = ("input",)
    # The backend sections, whose API-key variables the actors get from the driver.
    backend_fields: ClassVar[tuple[str, ...]] = ()

    def fingerprint(self) -> dict[str, Any]:
        """The resume fingerprint: :attr:`fingerprint_fields` and the shard size."""
        return {**self.model_dump(include=set(self.fingerprint_fields)), "shard_size": self.output.shard_size}

    def secret_env(self) -> list[str]:
        """Names of the environment variables holding the backends' API keys (never their values)."""
        backends = [getattr(self, name) for name in self.backend_fields]
        return [b.api_key_env for b in backends if getattr(b, "api_key_env", None)]


def filtered_rows(inp: InputConfig, columns: Optional[list[str]] = None):
    """Input rows after the dataset/split filters and the limit."""
    n = 0
    for row in tables.iter_rows(inp.path, columns=columns):
        if inp.datasets and row.get("dataset") not in inp.datasets:
            continue
        if inp.splits and row.get("split") not in inp.splits:
            continue
        yield row
        n += 1
        if inp.limit and n >= inp.limit:
            return
