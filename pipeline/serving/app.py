"""Build, start, run and stop the Serve application.

* :func:`build_app` ``(cfg) -> Application``: ``Ingress(Decomposer, Solver)`` with the
  deployment options of the config (with ``colocate``: the ingress alone, holding both models).
* :func:`app_builder` ``(args) -> Application``: the same, for Serve config files
  (``import_path: pipeline.serving.app:app_builder``, ``args: {config: configs/serve.yaml,
  overrides: [...], <section>: {...}}``); used by ``serve run|deploy configs/serve_deploy.yaml``.
* :func:`start` ``(cfg) -> base_url``: start Serve's HTTP proxy on ``cfg.http`` and run the
  app under ``cfg.app_name`` / ``cfg.route_prefix``, returning once ``/healthz`` answers.
  :func:`start_http` ``(cfg)``: Serve's controller and proxy alone, ahead of the app.
* :func:`run` ``(cfg) -> Manifest``: the serve job (``divconq serve``): :func:`start`, print the
  URL and, with ``cfg.blocking``, serve until SIGINT/SIGTERM, then delete the app.
* :func:`shutdown` ``(app_name=None)``: delete one app, or shut Serve down.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any, Optional

import httpx

from pipeline import storage
from pipeline.cluster import init_ray
from pipeline.backends.hf_local import HFBackendConfig
from pipeline.config import ConfigError
from pipeline.manifest import Manifest
from pipeline.serving.config import ServeConfig, SolverBackendConfig, load_serve_config, project_root

log = logging.getLogger("divconq.serve")

__all__ = ["app_builder", "build_app", "load_serve_config", "run", "shutdown", "start", "start_http"]

SHUTDOWN_TIMEOUT_S = 30


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
    (instead of replicas failing to start). Hub names (``org/name``), storage URLs and models that a replica is to
    wait for (``wait_for``: still being trained) are not checked."""
    models = [("decomposer.model", cfg.decomposer.model, cfg.decomposer.wait_for)]
    if cfg.solver.backend.type == "hf":
        models.append(("solver.backend.model", cfg.solver.backend.model, cfg.solver.backend.wait_for))
    for key, path, wait_for in models:
        if wait_for or not storage.is_local(path):
            continue
        looks_local = os.path.isabs(path) or path.startswith(".") or path.count("/") >= 2 or "\\" in path
        if looks_local and not os.path.isdir(_resolve_model(path)):
            raise ConfigError(f"{key}: model directory {path!r} not found (train/export the model first, "
                              f"or set {key}=<dir | hub name | s3://dir>)")


def _backend_configs(cfg: ServeConfig) -> tuple[HFBackendConfig, SolverBackendConfig]:
    """The decomposer's and the solver's backend configs, local model dirs made absolute."""
    dec_cfg = cfg.decomposer.backend_config()
    dec_cfg = dec_cfg.model_copy(update={"model": _resolve_model(dec_cfg.model)})
    sol_cfg = cfg.solver.backend_config()
    if sol_cfg.type == "hf":
        sol_cfg = sol_cfg.model_copy(update={"model": _resolve_model(sol_cfg.model)})
    return dec_cfg, sol_cfg


def build_app(cfg: ServeConfig, *, ingress_env: Optional[dict[str, str]] = None):
    """The Serve application ``Ingress(Decomposer, Solver)`` described by ``cfg``. The replicas get typed
    config sections; the ingress gets ``cfg`` itself (it holds env-var *names*, never secrets).

    ``ingress_env``: environment variables for the ingress replica only, via its
    ``runtime_env``. Meant for tests and local experiments (e.g. to hand the ingress an
    auth token on a Ray that was started before the variable existed): whatever is put
    here is stored in Serve's deployment config. In production leave it None and set the
    ``auth_token_env`` variable in the nodes' environment instead.
    """
    # lazy: importing the deployments imports ray.serve (~2 s); validating a serve config must not pay it
    from pipeline.serving.deployments import Decomposer, Ingress, Solver

    dec_cfg, sol_cfg = _backend_configs(cfg)
    actor_opts = cfg.ingress.ray_actor_options.to_ray()
    if ingress_env:
        actor_opts["runtime_env"] = {"env_vars": dict(ingress_env)}
    ingress = Ingress.options(num_replicas=cfg.ingress.num_replicas, max_ongoing_requests=cfg.ingress.max_ongoing_requests,
                              ray_actor_options=actor_opts)
    if cfg.colocate:  # the ingress builds both models in its own process from their backend configs
        return ingress.bind(dec_cfg, sol_cfg, cfg)
    if cfg.decomposer.engine == "vllm":  # GPU: Ray Serve LLM's vLLM server behind the Decomposer interface
        # lazy: ray.serve.llm needs vLLM, which only GPU nodes have
        from pipeline.serving.llm_deployment import VLLMDecomposer, build_llm_server

        dec = cfg.decomposer.model_copy(update={"model": dec_cfg.model})
        decomposer = VLLMDecomposer.options(max_ongoing_requests=cfg.decomposer.deployment_options()["max_ongoing_requests"],
                                            ray_actor_options={"num_cpus": 0.1}).bind(build_llm_server(dec), dec.served_name)
    else:
        decomposer = Decomposer.options(**cfg.decomposer.deployment_options()).bind(
            dec_cfg, cfg.decomposer.max_batch_size, cfg.decomposer.batch_wait_timeout_s)
    solver = Solver.options(**cfg.solver.deployment_options()).bind(
        sol_cfg, cfg.solver.max_batch_size, cfg.solver.batch_wait_timeout_s)
    return ingress.bind(decomposer, solver, cfg)


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
    base = deploy(cfg, ingress_env=ingress_env)
    wait_ready(cfg, ready_timeout_s)
    return base


def deploy(cfg: ServeConfig, *, ingress_env: Optional[dict[str, str]] = None) -> str:
    """Start (or join) Ray and Serve and deploy the app without waiting for it; return the base URL. For an app
    whose replicas wait for their model (``wait_for``): they start now, and :func:`wait_ready` waits later."""
    from ray import serve  # lazy: ~2 s to import; validating a serve config must not pay it

    if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):  # local Ray: paths are this machine's
        check_local_models(cfg)
    start_http(cfg)
    app = serve.RunTarget(target=build_app(cfg, ingress_env=ingress_env), name=cfg.app_name, route_prefix=cfg.route_prefix,
                          logging_config={"enable_access_log": cfg.http.access_log})
    # run_many, not run: run waits for the app to be running, and a replica that waits for its model is not, yet
    serve.run_many([app], wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    return cfg.base_url()


def wait_ready(cfg: ServeConfig, timeout_s: float = 120.0) -> None:
    """Wait until Serve reports the deployed app running (every deployment's replicas up), then for its
    ``/healthz``; a failed deployment raises with Serve's message."""
    from ray import serve  # lazy: ~2 s to import; validating a serve config must not pay it
    from ray.serve.schema import ApplicationStatus  # lazy: as serve

    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(cfg.app_name)
        status = app.status if app else ApplicationStatus.NOT_STARTED
        if status == ApplicationStatus.RUNNING:
            break
        if status == ApplicationStatus.DEPLOY_FAILED:
            raise RuntimeError(f"deploying app {cfg.app_name!r} failed: {app.message}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"app {cfg.app_name!r} was not running within {timeout_s:g}s (status {status.value})")
        time.sleep(0.25)  # polling, as serve.run does: Serve's public API has no wait for an app deployed without blocking
    _wait_healthy(cfg.base_url() + "/healthz", max(1.0, deadline - time.monotonic()))
    log.info("serving %s (app %r) at %s", " and ".join(cfg.served_models()), cfg.app_name, cfg.base_url())


def start_http(cfg: ServeConfig) -> None:
    """Start (or join) Ray, then Serve's controller and HTTP proxy on ``cfg.http``, with no app yet: a caller
    that knows it will serve soon can pay their start-up while it waits for the model (:func:`start` then
    only adds the app)."""
    from ray import serve  # lazy: ~2 s to import; validating a serve config must not pay it

    init_ray(cfg.ray)
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port},
                logging_config={"enable_access_log": cfg.http.access_log})


def shutdown(app_name: Optional[str] = None) -> None:
    """Delete the app ``app_name``; with no name, shut Serve down (all apps, proxies, controller)."""
    from ray import serve  # lazy: ~2 s to import; validating a serve config must not pay it

    if app_name:
        serve.delete(app_name)
    else:
        serve.shutdown()


def _quiet_shutdown(app_name: str) -> None:
    try:
        shutdown(app_name)
        log.info("app %r deleted", app_name)
    except Exception as e:  # pragma: no cover - Ray already gone
        log.warning("could not delete app %r: %s", app_name, e)


def serve_until_signal(app_name: str) -> None:
    """Block until SIGINT or SIGTERM (main thread only), then delete the app, never hanging on exit
    (e.g. when Ray itself got the signal too)."""
    stop = threading.Event()

    def _on_signal(signum, _frame) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        done = threading.Thread(target=_quiet_shutdown, args=(app_name,), daemon=True)
        done.start()
        done.join(SHUTDOWN_TIMEOUT_S)
        if done.is_alive():
            log.warning("app %r not confirmed deleted after %ds; exiting anyway", app_name, SHUTDOWN_TIMEOUT_S)


def run(cfg: ServeConfig) -> Manifest:
    """The serve job: start the app and print its URL; with ``cfg.blocking`` (the default) serve in the
    foreground until SIGINT/SIGTERM, then delete the app. With ``blocking=false`` it returns once the
    app is up: use that with a cluster, because a local Ray started by this process ends with it."""
    started = time.time()
    base = start(cfg)
    print(f"divconq serve: {' and '.join(cfg.served_models())} at {base}  (OpenAI base_url: {base}/v1)", flush=True)
    if cfg.blocking:
        serve_until_signal(cfg.app_name)
    return Manifest.of("serve", cfg, inputs={"decomposer": cfg.decomposer.model, "solver": cfg.solver.backend.model},
                       counts={}, started_at=started, extra={"base_url": base})
