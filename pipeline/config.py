"""Typed, validated job configuration.

Configs are YAML files (loaded with ``yaml.safe_load`` only) validated by pydantic
models that forbid unknown keys, so a typo, a wrong type or a missing required field
fails before any work starts, naming the key. ``key.sub=value`` overrides from the
command line are applied before validation; values are parsed as YAML scalars.
:func:`load_config` is the one loader (every job's CLI, ``serve``'s Serve-config builder, tests).
"""

from __future__ import annotations

import copy
import os
from typing import Any, Mapping, Optional, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Tagged(Strict):
    """A member of a discriminated union (a backend section, told apart by ``type``): its tag always counts as
    set, so a copy made by :func:`updated` (which keeps only the fields that were set) still names its member
    when the section was built in code with the tag left at its default."""

    def model_post_init(self, context: Any) -> None:
        self.model_fields_set.add("type")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending key."""


class UsageError(ValueError):
    """A job cannot run as asked (an input of the wrong kind, an output dir holding something else);
    the message says what to change. The CLI (``ray_jobs._shell.run_main``) reports it as one line; any
    other ValueError is a bug and keeps its traceback."""


# ---------------------------------------------------------------- shared sections
class RayConfig(Strict):
    address: Optional[str] = Field(None, description="Cluster address; None starts (or joins via RAY_ADDRESS) local Ray.")
    num_cpus: Optional[int] = Field(None, description="CPUs for a local Ray instance (default: all cores).")
    include_dashboard: bool = False
    runtime_env: dict[str, Any] = Field(default_factory=dict)


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
    bill_cached: bool = Field(False, description="Price replies from the response cache as if computed: the cost of "
                              "the system rather than of this run (an experiment whose settings share a cache).")

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


# ---------------------------------------------------------------- loading
def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {e}") from e
    return key, value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = str(key).split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


Overrides = Union[list[str], Mapping[str, Any], None]


def apply_overrides(data: dict[str, Any], overrides: Overrides) -> dict[str, Any]:
    """Set dotted keys in ``data`` (in place): ``["a.b=1", ...]`` (values parsed as YAML scalars) or
    ``{"a.b": 1}`` (values taken as they are)."""
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = [_parse_override(item) for item in overrides or []]
    for key, value in items:
        _set_dotted(data, key, value)
    return data


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``extra`` merged in: nested mappings key by key, anything else replaced."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


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
    from pipeline import storage  # lazy: storage pulls in pyarrow's filesystems; pipeline.config stays cheap

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


def load_config(model: type[M], path: Optional[str] = None, overrides: Overrides = None,
                sections: Optional[Mapping[str, Any]] = None) -> M:
    """The one config loader: ``path`` (YAML, local or s3://), then nested ``sections`` deep-merged in,
    then dotted ``overrides``; validated into ``model``. Any problem is a :class:`ConfigError` naming the key."""
    data = load_yaml(path) if path else {}
    if sections:
        data = deep_merge(data, sections)
    data = apply_overrides(data, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, path or "<overrides>")) from None


def _changed(data: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(data)
    for k, v in changes.items():
        out[k] = _changed(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def updated(cfg: M, changes: Mapping[str, Any]) -> M:
    """A copy of ``cfg`` with ``changes``: a mapping for a section updates that section key by key;
    anything else (a value, a list, a config object) replaces the field. Validated like a loaded config
    (a ConfigError names the key); fields the original left unset stay unset, so what depends on which
    fields were set (e.g. a flat price in :class:`PricingConfig`) keeps its meaning."""
    data = _changed(cfg.model_dump(exclude_unset=True), changes)
    try:
        return type(cfg).model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, f"<{type(cfg).__name__} update>")) from None


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """JSON-safe dump of a config, for manifests."""
    return cfg.model_dump(mode="json")


def secret_from_env(var: Optional[str]) -> Optional[str]:
    """Read a secret from the environment variable *named* in a config."""
    if not var:
        return None
    return os.environ.get(var)


# Names that moved to their own homes (backend schemas beside their backends, one sampling type); code
# written against the old place still imports them from here.
_MOVED = {"OpenAIBackendConfig": "pipeline.backends.openai_http", "OpenAIBatchConfig": "pipeline.backends.openai_http",
          "HFBackendConfig": "pipeline.backends.hf_local", "ReferenceBackendConfig": "pipeline.backends.reference",
          "VLLMBackendConfig": "pipeline.backends.vllm_engine", "BackendConfig": "pipeline.backends"}


def __getattr__(name: str) -> Any:
    if name == "SamplingConfig":
        name, where = "SamplingParams", "pipeline.backends.base"
    elif name in _MOVED:
        where = _MOVED[name]
    else:
        raise AttributeError(f"module 'pipeline.config' has no attribute {name!r}")
    import importlib  # lazy: only old-style imports of a moved name come here (the backends import this module)

    return getattr(importlib.import_module(where), name)
