"""What configures a sharded job (generate, solve, infer): its input rows (:class:`InputConfig`, which
also reads them), its output directory (:class:`OutputConfig`), and their common base
(:class:`ShardedJobConfig`: Ray, actor pool, response cache, pricing, the resume fingerprint)."""

from __future__ import annotations

from typing import Any, ClassVar, Iterator, Optional

from pydantic import Field, model_validator

from pipeline import tables
from pipeline.config import ActorPoolConfig, PricingConfig, RayConfig, Strict
from pipeline.method import legacy_method_keys


class InputConfig(Strict):
    path: str = Field(..., description="A previous job's output dir, or a Parquet file/dir (local or s3://).")
    limit: Optional[int] = Field(None, ge=1, description="Use only the first N input rows.")
    datasets: Optional[list[str]] = Field(None, description="Keep only these datasets.")
    splits: Optional[list[str]] = Field(None, description="Keep only these splits.")

    def rows(self, columns: Optional[list[str]] = None) -> Iterator[dict[str, Any]]:
        """The input rows after the dataset/split filters and the limit."""
        n = 0
        for row in tables.iter_rows(self.path, columns=columns):
            if self.datasets and row.get("dataset") not in self.datasets:
                continue
            if self.splits and row.get("split") not in self.splits:
                continue
            yield row
            n += 1
            if self.limit and n >= self.limit:
                return


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
    # The keys a job had before its ``method:`` section (old key -> MethodConfig field), still read into it.
    legacy_method_keys: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _read_legacy_method_keys(cls, data: Any) -> Any:
        return legacy_method_keys(data, cls.legacy_method_keys)

    def fingerprint(self) -> dict[str, Any]:
        """The resume fingerprint: :attr:`fingerprint_fields` (``section.field`` for one field of a section)
        and the shard size."""
        include: dict[str, Any] = {}
        for name in self.fingerprint_fields:
            section, _, field = name.partition(".")
            if field:
                include.setdefault(section, {})[field] = True
            else:
                include[section] = True
        return {**self.model_dump(include=include), "shard_size": self.output.shard_size}

    def secret_env(self) -> list[str]:
        """Names of the environment variables holding the backends' API keys (never their values)."""
        backends = [getattr(self, name) for name in self.backend_fields]
        return [b.api_key_env for b in backends if getattr(b, "api_key_env", None)]
