"""``ServeConfig``: the validated configuration of the Ray Serve application.

Layout (see ``configs/serve.yaml``)::

    ray:        RayConfig (address / num_cpus / runtime_env) for ``divconq serve``
    http:       {host, port}                      Serve's HTTP proxy (default 127.0.0.1:8000)
    app_name, route_prefix, blocking, auth_token_env
    decomposer: the distilled student (a local HF model dir, hub name or s3:// dir), its served name
                + sampling defaults + deployment options
    solver:     {backend: {type: hf, ...} | {type: openai, ...}}, its served name + sampling + deployment options
    method:     the two-stage method's settings for /v1/solve (pipeline.method.MethodConfig: the one
                subquestion cap, few-shot prompts per stage), as in the solve and infer jobs
    ingress:    deployment options of the FastAPI ingress
    colocate:   the models inside the ingress replica (one deployment) instead of their own deployments
    limits:     request size limits enforced by the ingress

Deployment options (``decomposer``, ``solver``): ``max_batch_size`` and
``batch_wait_timeout_s`` feed ``@serve.batch``; ``num_replicas`` *or* ``autoscaling``
({min_replicas, max_replicas, target_ongoing_requests, upscale_delay_s, downscale_delay_s,
look_back_period_s}); ``max_ongoing_requests``
(default ``max(2 * max_batch_size, 16)``: with fewer, waiting requests back off in the router instead of
queueing in the replica; it must be at least ``max_batch_size`` or a batch can
never fill); ``ray_actor_options`` ({num_cpus, num_gpus, resources}).
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal, Mapping, Optional, Union

from pydantic import Field, field_validator, model_validator

from pipeline.backends.base import SamplingParams
from pipeline.backends.hf_local import HFBackendConfig
from pipeline.backends.openai_http import OpenAIBackendConfig
from pipeline.config import Overrides, RayConfig, Strict, load_config
from pipeline.method import MethodConfig, legacy_method_keys

__all__ = [
    "ActorOptions",
    "AutoscalingOptions",
    "DecomposerConfig",
    "HTTPConfig",
    "IngressConfig",
    "LimitsConfig",
    "ServeConfig",
    "SolverBackendConfig",
    "SolverConfig",
    "load_serve_config",
]


class HTTPConfig(Strict):
    host: str = Field("127.0.0.1", description="Bind address of Serve's HTTP proxy (0.0.0.0 to listen on all interfaces).")
    port: int = Field(8000, ge=1, le=65535)
    access_log: bool = Field(True, description="Serve's access log line per request (proxy and replicas): off saves "
                             "their CPU where requests are many and small (the quickstart).")


class ActorOptions(Strict):
    """Per-replica Ray resources (``ray_actor_options``)."""

    num_cpus: float = Field(0.5, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources, e.g. {decomposer: 1}.")

    def to_ray(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            out["resources"] = dict(self.resources)
        return out


class AutoscalingOptions(Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    initial_replicas: Optional[int] = Field(None, ge=0)
    # Serve's own defaults when unset (30 s, 600 s, 30 s): scale up after load has lasted this long,
    # down after it has been gone this long, averaging load over the look-back window.
    upscale_delay_s: Optional[float] = Field(None, ge=0)
    downscale_delay_s: Optional[float] = Field(None, ge=0)
    look_back_period_s: Optional[float] = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "AutoscalingOptions":
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self

    def to_ray(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def _one_sample(v: SamplingParams) -> SamplingParams:
    if v.n != 1:
        raise ValueError("a served model answers each request once: sampling.n must be 1")
    return v


class _DeploymentOptions(Strict):
    max_batch_size: int = Field(8, ge=1, description="@serve.batch max_batch_size: requests generated together.")
    batch_wait_timeout_s: float = Field(0.05, ge=0.0, description="@serve.batch wait for a batch to fill.")
    num_replicas: Optional[int] = Field(None, ge=1, description="Fixed replica count (default 1); exclusive with autoscaling.")
    autoscaling: Optional[AutoscalingOptions] = None
    max_ongoing_requests: Optional[int] = Field(None, ge=1, description="Per replica; default max(2 * max_batch_size, 16).")
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)

    @model_validator(mode="after")
    def _check_deployment(self) -> "_DeploymentOptions":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set either num_replicas or autoscaling, not both (num_replicas=null drops a fixed count)")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or a batch can never fill")
        return self

    @field_validator("sampling", check_fields=False)
    @classmethod
    def _one_sample_per_request(cls, v: SamplingParams) -> SamplingParams:
        return _one_sample(v)

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        opts: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests or max(2 * self.max_batch_size, 16),
            "ray_actor_options": self.ray_actor_options.to_ray(),
        }
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling.to_ray()
        else:
            opts["num_replicas"] = self.num_replicas or 1
        return opts


class ServeVLLMOptions(Strict):
    """``decomposer.engine: vllm``: the Ray Serve LLM (vLLM) engine of each replica."""

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per replica.")
    accelerator_type: Optional[str] = Field(None, description="Ray accelerator type, e.g. L4, A10G, H100.")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="More vLLM engine args, e.g. {gpu_memory_utilization: 0.8}.")


class DecomposerConfig(_DeploymentOptions):
    """The distilled decomposer student: ``transformers`` (default, CPU or GPU; full, merged or
    LoRA-adapter dirs) or vLLM through Ray Serve LLM (``engine: vllm``, GPU; full or merged dirs)."""

    engine: Literal["hf", "vllm"] = Field("hf", description="hf: the transformers Decomposer; vllm: ray.serve.llm (GPU).")
    vllm: ServeVLLMOptions = Field(default_factory=ServeVLLMOptions)

    model: str = Field(..., min_length=1, description="Local HF model dir, hub name or s3:// dir (e.g. runs/train/export).")
    served_name: str = Field("divconq-decomposer", min_length=1,
                             description="Model id clients send in /v1/chat/completions and see in /v1/models.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    max_input_tokens: int = Field(2048, ge=16)
    wait_for: Optional[str] = Field(None, description="hf engine: a path that must exist before the model is loaded "
                                    "(its train job's completion marker); the replicas start and wait for it.")
    wait_timeout_s: float = Field(3600.0, gt=0, description="How long a replica waits for wait_for before failing.")
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(max_tokens=128),
                                    description="Defaults of the decomposer's requests (a chat request may override them).")

    def backend_config(self) -> HFBackendConfig:
        # One Serve batch is one generate() call: the backend's chunk size is the batch size.
        return HFBackendConfig(model=self.model, device=self.device, dtype=self.dtype, batch_size=self.max_batch_size,
                               trust_remote_code=self.trust_remote_code, max_input_tokens=self.max_input_tokens,
                               wait_for=self.wait_for, wait_timeout_s=self.wait_timeout_s)


# A served solver must be a real model: local HF or an OpenAI-compatible endpoint (vLLM, OpenAI, ...).
SolverBackendConfig = Annotated[Union[HFBackendConfig, OpenAIBackendConfig], Field(discriminator="type")]


class SolverConfig(_DeploymentOptions):
    backend: SolverBackendConfig
    served_name: str = Field("divconq-solver", min_length=1,
                             description="Model id clients send in /v1/chat/completions to reach the solver; in /v1/models.")
    sampling: SamplingParams = Field(default_factory=SamplingParams,
                                     description="Defaults of the solver's requests (a chat request may override them).")

    def backend_config(self) -> Union[HFBackendConfig, OpenAIBackendConfig]:
        if self.backend.type == "hf":
            return self.backend.model_copy(update={"batch_size": self.max_batch_size})
        return self.backend


class IngressConfig(Strict):
    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(256, ge=1, description="Concurrent HTTP requests per ingress replica.")
    ray_actor_options: ActorOptions = Field(default_factory=lambda: ActorOptions(num_cpus=0.1))


class LimitsConfig(Strict):
    max_question_chars: int = Field(4000, ge=1)
    max_context_chars: int = Field(20000, ge=0)
    max_tokens: int = Field(1024, ge=1, description="Cap on max_tokens a chat request may ask for.")
    max_messages: int = Field(64, ge=1)
    max_message_chars: int = Field(32000, ge=1, description="Total characters over all chat messages.")
    max_stop: int = Field(8, ge=0, description="Stop sequences per chat request.")
    max_body_bytes: int = Field(1 << 20, ge=256, description="Larger request bodies get 413.")


class ServeConfig(Strict):
    ray: RayConfig = Field(default_factory=RayConfig)
    http: HTTPConfig = Field(default_factory=HTTPConfig)
    app_name: str = Field("divconq", min_length=1)
    route_prefix: str = "/"
    blocking: bool = Field(True, description="divconq serve: block until Ctrl-C/SIGTERM (false: deploy and return).")
    auth_token_env: Optional[str] = Field(
        None, description="Name of an env var holding a bearer token; when set and present in the ingress "
                          "replica's environment, every route but /healthz needs 'Authorization: Bearer <token>'.")
    decomposer: DecomposerConfig
    solver: SolverConfig
    method: MethodConfig = Field(default_factory=MethodConfig, description="The method of /v1/solve (pipeline/method.py).")
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    colocate: bool = Field(
        False, description="Run both models inside the ingress replica (one deployment; scale it with ingress.*): "
                           "no actor hop per request, for small CPU models whose forward pass costs less than the hop. "
                           "The models keep their batching; their replica and resource options do not apply.")

    @model_validator(mode="before")
    @classmethod
    def _legacy_keys(cls, data: Any) -> Any:
        return legacy_method_keys(data, {"decomposer.few_shot": "decomposer_few_shot",
                                         "decomposer.max_subquestions": "max_subquestions", "solver.few_shot": "solver_few_shot"})

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if not self.route_prefix.startswith("/"):
            raise ValueError("route_prefix must start with '/'")
        if self.route_prefix != "/" and self.route_prefix.endswith("/"):
            raise ValueError("route_prefix must not end with '/'")
        for stage in ("decomposer", "solver"):
            if getattr(self, stage).sampling.max_tokens > self.limits.max_tokens:
                raise ValueError(f"{stage}.sampling.max_tokens exceeds limits.max_tokens")
        if self.decomposer.engine != "hf" and self.decomposer.wait_for:
            raise ValueError("decomposer.wait_for: only the hf engine waits for its model; unset it for engine "
                             f"{self.decomposer.engine}")
        if self.colocate:
            for stage in ("decomposer", "solver"):
                opts = getattr(self, stage)
                if opts.num_replicas is not None or opts.autoscaling is not None:
                    raise ValueError(f"colocate: the models run in the ingress's replicas; set ingress.num_replicas, "
                                     f"not {stage}.num_replicas or {stage}.autoscaling")
                own = opts.ray_actor_options
                if own.num_gpus or own.resources:
                    raise ValueError(f"colocate: the models run in the ingress's replicas; give ingress.ray_actor_options "
                                     f"the GPUs and resources, not {stage}.ray_actor_options")
                if self.ingress.max_ongoing_requests < opts.max_batch_size:
                    raise ValueError(f"colocate: ingress.max_ongoing_requests ({self.ingress.max_ongoing_requests}) must be "
                                     f">= {stage}.max_batch_size ({opts.max_batch_size}), or a batch can never fill")
            if self.decomposer.engine == "vllm":
                raise ValueError("colocate: a vLLM decomposer runs in its own Serve LLM deployment; set colocate: false")
        if self.decomposer.served_name == self.solver.served_name:
            raise ValueError(f"decomposer.served_name and solver.served_name are both {self.solver.served_name!r}: "
                             "a chat request names the model it wants, so they must differ")
        return self

    def served_models(self) -> dict[str, str]:
        """``{served name: stage}``: the models /v1/chat/completions routes to and /v1/models lists."""
        return {self.decomposer.served_name: "decomposer", self.solver.served_name: "solver"}

    def base_url(self) -> str:
        """``http://host:port[/prefix]`` clients should use (wildcard hosts become 127.0.0.1)."""
        host = self.http.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        prefix = "" if self.route_prefix == "/" else self.route_prefix
        return f"http://{host}:{self.http.port}{prefix}"


def project_root() -> str:
    """The directory holding ``pipeline/`` (the repository root for a source checkout)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def find_config_file(path: str) -> str:
    """``path`` as given, else relative to the project root (``serve deploy`` runs builders
    in a cluster process whose working directory is not the checkout)."""
    if "://" in path or os.path.isabs(path) or os.path.exists(path):
        return path
    alt = os.path.join(project_root(), path)
    return alt if os.path.exists(alt) else path


def load_serve_config(path: Optional[str] = None, overrides: Overrides = None,
                      sections: Optional[Mapping[str, Any]] = None) -> ServeConfig:
    """:func:`pipeline.config.load_config` for a :class:`ServeConfig`, the file also looked up from the
    project root: YAML file + nested ``sections`` + dotted ``overrides`` (``["decomposer.model=x"]`` or
    ``{"decomposer.model": "x"}``), validated."""
    return load_config(ServeConfig, find_config_file(path) if path else None, overrides, sections)
