"""Build, start and stop the Serve application.

* :func:`build_app` ``(cfg) -> Application``: ``Ingress(Decomposer, Solver)`` with the
  deployment options of the config.
* :func:`app_builder` ``(args) -> Application``: the same, for Serve config files
  (``import_path: pipeline.serving.app:app_builder``, ``args: {config: configs/serve.yaml,
  overrides: [...], <section>: {...}}``); used by ``serve run|deploy configs/serve_deploy.yaml``.
* :func:`start` ``(cfg) -> base_url``: start Serve's HTTP proxy on ``cfg.http`` and run the
  app under ``cfg.app_name`` / ``cfg.route_prefix``, returning once ``/healthz`` answers.
* :func:`shutdown` ``(app_name=None)``: delete one app, or shut Serve down.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any, Optional, Union

from pipeline import storage
from pipeline.config import ConfigError, apply_overrides, load_yaml
from pipeline.serving.config import ServeConfig, project_root

log = logging.getLogger("divconq.serve")

__all__ = ["app_builder", "build_app", "load_serve_config", "shutdown", "start"]


def _find_file(path: str) -> str:
    """``path`` as given, else relative to the project root (``serve deploy`` runs builders
    in a cluster process whose working directory is not the checkout)."""
    if not storage.is_local(path) or os.path.isabs(path) or os.path.exists(path):
        return path
    alt = os.path.join(project_root(), path)
    return alt if os.path.exists(alt) else path


def _resolve_model(path: str) -> str:
    """Relative local model dirs become absolute (replicas may run in another directory);
    hub names and storage URLs (s3://...) are left alone."""
    if not storage.is_local(path) or os.path.isabs(path):
        return path
    for base in (os.getcwd(), project_root()):
        cand = os.path.join(base, path)
        if os.path.isdir(cand):
            return os.path.abspath(cand)
    return path


def check_local_models(cfg: ServeConfig) -> None:
    """Fail fast, naming the key, when an hf model given as a local path does not exist
    (instead of replicas failing to start). Hub names (``org/name``) and storage URLs are not checked."""
    models = [("decomposer.model", cfg.decomposer.model)]
    if cfg.solver.backend.type == "hf":
        models.append(("solver.backend.model", cfg.solver.backend.model))
    for key, path in models:
        if not storage.is_local(path):
            continue
        looks_local = os.path.isabs(path) or path.startswith(".") or path.count("/") >= 2 or "\\" in path
        if looks_local and not os.path.isdir(_resolve_model(path)):
            raise ConfigError(f"{key}: model directory {path!r} not found (train/export the model first, "
                              f"or set {key}=<dir | hub name | s3://dir>)")


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def load_serve_config(path: Optional[str] = None, overrides: Union[list[str], dict[str, Any], None] = None,
                      sections: Optional[dict[str, Any]] = None) -> ServeConfig:
    """YAML file (optional) + nested ``sections`` merged in + dotted ``overrides``
    (``["decomposer.model=x"]`` or ``{"decomposer.model": "x"}``), validated."""
    data = load_yaml(_find_file(path)) if path else {}
    if sections:
        _deep_merge(data, sections)
    if isinstance(overrides, dict):
        for key, value in overrides.items():
            node = data
            parts = str(key).split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override {key!r}: {part!r} is not a section")
            node[parts[-1]] = value
    elif overrides:
        data = apply_overrides(data, list(overrides))
    from pydantic import ValidationError

    from pipeline.config import _format_validation_error

    try:
        return ServeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, path or "<serve args>")) from None


def build_app(cfg: ServeConfig, *, ingress_env: Optional[dict[str, str]] = None):
    """The Serve application ``Ingress(Decomposer, Solver)`` described by ``cfg``.

    ``ingress_env``: environment variables for the ingress replica only, via its
    ``runtime_env``. Meant for tests and local experiments (e.g. to hand the ingress an
    auth token on a Ray that was started before the variable existed): whatever is put
    here is stored in Serve's deployment config. In production leave it None and set the
    ``auth_token_env`` variable in the nodes' environment instead.
    """
    from pipeline.serving.deployments import Decomposer, Ingress, Solver

    dec_cfg = cfg.decomposer.backend_config()
    dec_cfg = dec_cfg.model_copy(update={"model": _resolve_model(dec_cfg.model)})
    sol_cfg = cfg.solver.backend_config()
    if sol_cfg.type == "hf":
        sol_cfg = sol_cfg.model_copy(update={"model": _resolve_model(sol_cfg.model)})

    if cfg.decomposer.engine == "vllm":  # GPU: Ray Serve LLM's vLLM server behind the Decomposer interface
        from pipeline.serving.llm_deployment import VLLMDecomposer, build_llm_server

        dec = cfg.decomposer.model_copy(update={"model": dec_cfg.model})
        decomposer = VLLMDecomposer.options(max_ongoing_requests=cfg.decomposer.deployment_options()["max_ongoing_requests"],
                                            ray_actor_options={"num_cpus": 0.1}).bind(build_llm_server(dec), dec.served_name)
    else:
        decomposer = Decomposer.options(**cfg.decomposer.deployment_options()).bind(
            dec_cfg.model_dump(), cfg.decomposer.max_batch_size, cfg.decomposer.batch_wait_timeout_s)
    solver = Solver.options(**cfg.solver.deployment_options()).bind(
        sol_cfg.model_dump(), cfg.solver.max_batch_size, cfg.solver.batch_wait_timeout_s)

    settings = {
        "served_name": cfg.decomposer.served_name,
        "solver_name": cfg.solver.backend.model,
        "decomposer_sampling": cfg.decomposer.sampling.model_dump(),
        "solver_sampling": cfg.solver.sampling.model_dump(),
        "decomposer_few_shot": cfg.decomposer.few_shot,
        "solver_few_shot": cfg.solver.few_shot,
        "max_subquestions": cfg.decomposer.max_subquestions,
        "limits": cfg.limits.model_dump(),
        "auth_token_env": cfg.auth_token_env,  # the variable's *name*; the value is read in the replica
    }
    actor_opts = cfg.ingress.ray_actor_options.to_ray()
    if ingress_env:
        actor_opts["runtime_env"] = {"env_vars": dict(ingress_env)}
    ingress = Ingress.options(num_replicas=cfg.ingress.num_replicas, max_ongoing_requests=cfg.ingress.max_ongoing_requests,
                              ray_actor_options=actor_opts)
    return ingress.bind(decomposer, solver, settings)


def app_builder(args: dict):
    """Application builder for Serve config files.

    ``args``: ``config`` (path to a ServeConfig YAML; relative paths are tried against the
    working directory, then the project root), ``overrides`` (list of ``key.sub=value`` or
    a mapping ``{key.sub: value}``), and any ServeConfig sections to merge in, e.g.
    ``decomposer: {model: s3://bucket/student}``. The ``ray``, ``http``, ``app_name`` and
    ``route_prefix`` settings are not used here: the Serve config file sets those.
    """
    args = dict(args or {})
    path = args.pop("config", None)
    overrides = args.pop("overrides", None)
    cfg = load_serve_config(path, overrides, sections=args)
    return build_app(cfg)


def _wait_healthy(url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=5.0)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = type(e).__name__
        time.sleep(0.25)
    raise RuntimeError(f"the app did not become healthy at {url} within {timeout_s:g}s (last: {last})")


def start(cfg: ServeConfig, *, ingress_env: Optional[dict[str, str]] = None, ready_timeout_s: float = 120.0) -> str:
    """Start (or join) Ray and Serve, run the app, wait for ``/healthz``; return the base URL.

    The base URL is ``http://host:port[route_prefix]``; OpenAI clients use ``<base>/v1``.
    Serve's HTTP options are cluster-wide and fixed when Serve first starts: a second app
    shares the first one's host and port.
    """
    from ray import serve

    from pipeline.jobs import init_ray

    if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):  # local Ray: paths are this machine's
        check_local_models(cfg)
    init_ray(cfg.ray)
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    serve.run(build_app(cfg, ingress_env=ingress_env), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    base = cfg.base_url()
    _wait_healthy(base + "/healthz", ready_timeout_s)
    log.info("serving %s (app %r) at %s", cfg.decomposer.served_name, cfg.app_name, base)
    return base


def shutdown(app_name: Optional[str] = None) -> None:
    """Delete the app ``app_name``; with no name, shut Serve down (all apps, proxies, controller)."""
    from ray import serve

    if app_name:
        serve.delete(app_name)
    else:
        serve.shutdown()
