"""Typed, validated job configuration.

Configs are YAML files (loaded with ``yaml.safe_load`` only) validated by pydantic
models that forbid unknown keys, so a typo, a wrong type or a missing required field
fails before any work starts, naming the key. ``key.sub=value`` overrides from the
command line are applied before validation; values are parsed as YAML scalars.
"""

from __future__ import annotations

import copy
import os
from typing import Annotated, Any, Literal, Optional, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending key."""


class UsageError(ValueError):
    """A job cannot run as asked (an input of the wrong kind, an output dir holding something else);
    the message says what to change. ``run_main`` reports it as one line; any other ValueError is a
    bug and keeps its traceback."""


# ---------------------------------------------------------------- shared sections
class RayConfig(Strict):
    address: Optional[str] = Field(None, description="Cluster address; None starts (or joins via RAY_ADDRESS) local Ray.")
    num_cpus: Optional[int] = Field(None, description="CPUs for a local Ray instance (default: all cores).")
    include_dashboard: bool = False
    runtime_env: dict[str, Any] = Field(default_factory=dict)


class SamplingConfig(Strict):
    n: int = Field(1, ge=1, description="Samples per question.")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1, le=32768)
    seed: int = 0
    stop: list[str] = Field(default_factory=list)


class ModelPrice(Strict):
    prompt_per_1m: float = Field(..., ge=0.0, description="Price per 1M prompt tokens.")
    completion_per_1m: float = Field(..., ge=0.0, description="Price per 1M completion tokens.")
    batch_discount: float = Field(0.5, ge=0.0, le=1.0, description="Fraction of the online price paid in batch mode.")


class PricingConfig(Strict):
    """Prices for the cost ledger. Set ``prompt_per_1k``/``completion_per_1k`` to price every model the same;
    otherwise each model is priced from ``models`` here, then ``table`` (a YAML file), then the shipped
    ``pipeline/prices.yaml`` (unknown models cost 0 and are flagged ``unpriced``)."""

    prompt_per_1k: float = Field(0.0, ge=0.0, description="Price per 1k prompt tokens (any currency).")
    completion_per_1k: float = Field(0.0, ge=0.0)
    currency: str = "USD"
    models: dict[str, ModelPrice] = Field(default_factory=dict, description="Per-model prices overriding the table.")
    table: Optional[str] = Field(None, description="A price table YAML (local or s3://) replacing the shipped one.")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens / 1000 * self.prompt_per_1k + completion_tokens / 1000 * self.completion_per_1k


class ActorPoolConfig(Strict):
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(2, ge=1)
    batch_size: int = Field(16, ge=1, description="Rows per map_batches call.")
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per actor, e.g. {teacher: 1}.")
    max_restarts: Optional[int] = Field(None, ge=-1, description="Actor restarts (None: Ray Data's default, unlimited).")
    max_task_retries: Optional[int] = Field(None, ge=-1, description="Task retries on a restarted actor (None: unlimited).")


class OpenAIBackendConfig(Strict):
    type: Literal["openai"] = "openai"
    base_url: str = "https://api.openai.com/v1"
    model: str
    api_key_env: Optional[str] = Field("OPENAI_API_KEY", description="Name of the env var holding the key (never the key).")
    concurrency: int = Field(8, ge=1, description="In-flight requests per actor.")
    requests_per_minute: Optional[float] = Field(None, gt=0, description="Request rate limit of the whole job (see rate_limit_scope).")
    tokens_per_minute: Optional[float] = Field(None, gt=0, description="Token rate limit of the whole job (see rate_limit_scope).")
    rate_limit_scope: Literal["job", "actor"] = Field("job", description="job: the limits are shared by all actors of a job "
                                                      "(a limiter actor); actor: each actor gets the full limit.")
    rate_limit_burst_s: float = Field(1.0, gt=0, description="Burst allowance of the limiters, in seconds of the limit.")
    adaptive_concurrency: bool = Field(True, description="Follow the provider's x-ratelimit-* headers and 429s: shrink "
                                       "in-flight requests, grow back to `concurrency` when headroom returns.")
    mode: Literal["online", "batch"] = Field("online", description="batch: the provider's Batch API (half price, hours).")
    batch: "OpenAIBatchConfig" = Field(default_factory=lambda: OpenAIBatchConfig())
    structured_output: bool = Field(False, description="Ask for the subquestion list as JSON (response_format json_schema).")
    tokenizer: Optional[str] = Field(None, description="Local HF tokenizer dir for `divconq estimate` (else ~4 chars/token).")
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(6, ge=0)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    extra_body: dict[str, Any] = Field(default_factory=dict)


class OpenAIBatchConfig(Strict):
    completion_window: str = "24h"
    poll_interval_s: float = Field(30.0, gt=0, description="Seconds between status polls of an in-flight batch.")
    max_requests: int = Field(50_000, ge=1, description="Provider limit: requests per batch (larger shards are split).")
    max_file_bytes: int = Field(200 * 1024 * 1024, ge=1024, description="Provider limit: size of a batch input file.")
    max_submissions: int = Field(3, ge=1, description="Batches per request set: expired/failed requests are resubmitted.")
    max_wait_s: Optional[float] = Field(None, gt=0, description="Give up (job stops, resumable) after this long.")


OpenAIBackendConfig.model_rebuild()


class HFBackendConfig(Strict):
    type: Literal["hf"] = "hf"
    model: str = Field(..., description="Hub name, local directory or s3:// directory of a causal LM.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(8, ge=1)
    trust_remote_code: bool = False
    max_input_tokens: int = Field(2048, ge=16)
    truncate_prompts: bool = Field(False, description="A prompt longer than the model takes (max_input_tokens, "
                                   "the model's context less one): false = quarantine its row; true = cut its "
                                   "oldest tokens and count it in the manifest (counts.truncated_prompts).")
    generation_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra model.generate() kwargs, e.g. {repetition_penalty: 1.2}.")


class ReferenceBackendConfig(Strict):
    type: Literal["reference"] = "reference"
    model: str = "reference-gold"
    role: Literal["decomposer", "solver"] = "decomposer"
    coverage_threshold: float = Field(0.8, ge=0.0, le=1.0, description="Oracle solver: ROUGE-L recall of the gold steps needed to answer correctly.")


class VLLMBackendConfig(Strict):
    """GPU generation through Ray Data LLM (``pipeline/backends/vllm_engine.py``)."""

    type: Literal["vllm"] = "vllm"
    engine: Literal["vllm", "sglang"] = Field("vllm", description="vLLMEngineProcessorConfig or SGLangEngineProcessorConfig.")
    model: str = Field(..., description="Hub name or a model dir every GPU node can read (s3:// is fetched to the local disk).")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict,
                                          description="Engine arguments, e.g. {max_model_len: 4096, gpu_memory_utilization: 0.9}.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine replica (tensor parallel).")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages per engine replica.")
    concurrency: int = Field(1, ge=1, description="Engine replicas (each tensor x pipeline parallel GPUs).")
    batch_size: int = Field(64, ge=1, description="Rows per batch sent to an engine replica.")
    accelerator_type: Optional[str] = Field(None, description="Ray accelerator type of the engine's GPUs, e.g. A10G, H100.")
    structured_output: bool = Field(False, description="vLLM guided decoding of the subquestion list as JSON.")

    @model_validator(mode="after")
    def _parallelism_in_one_place(self) -> "VLLMBackendConfig":
        for key in ("tensor_parallel_size", "pipeline_parallel_size", "tp_size", "pp_size"):
            if key in self.engine_kwargs:
                raise ValueError(f"set tensor_parallel_size / pipeline_parallel_size as fields, not engine_kwargs.{key}")
        return self


BackendConfig = Annotated[
    Union[OpenAIBackendConfig, HFBackendConfig, ReferenceBackendConfig, VLLMBackendConfig],
    Field(discriminator="type"),
]


# ---------------------------------------------------------------- loading
def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, section by section (a copy; neither input changes)."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {e}") from e
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        kind = e["type"]
        if kind == "extra_forbidden":
            msg = "unknown key"
        elif kind == "missing":
            msg = "missing required field"
        else:
            msg = e["msg"]
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


M = TypeVar("M", bound=BaseModel)


def load_yaml(path: str) -> dict[str, Any]:
    from pipeline import storage

    try:
        data = yaml.safe_load(storage.read_text(path)) if path else {}
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    return data


def load_config(model: type[M], path: Optional[str] = None, overrides: Optional[list[str]] = None) -> M:
    """Load ``path`` (YAML), apply dotted overrides, validate into ``model``."""
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides or []))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, path or "<overrides>")) from None


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """JSON-safe dump of a config, for manifests."""
    return cfg.model_dump(mode="json")


def secret_from_env(var: Optional[str]) -> Optional[str]:
    """Read a secret from the environment variable *named* in a config."""
    if not var:
        return None
    return os.environ.get(var)
