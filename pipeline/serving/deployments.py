"""Ray Serve deployments: ``Decomposer`` and ``Solver`` (batched models) and the ``Ingress``.

* :class:`Decomposer` holds the distilled student (local Hugging Face backend);
  :class:`Solver` holds a local HF model or proxies an OpenAI-compatible endpoint (vLLM,
  OpenAI, ...) through :class:`~pipeline.backends.openai_http.OpenAIBackend`. Both collect
  concurrent ``generate`` calls with ``@serve.batch`` (size/timeout from the config, set in
  ``__init__``), split a batch by sampling parameters (``generate`` takes one
  ``SamplingParams`` per call), run the backend in a worker thread so the replica's event
  loop stays responsive, and keep a histogram of the batch sizes they ran (``stats()``).
  A backend failure becomes an error result for the requests of that batch, never an
  exception that takes the replica down.
* :class:`Ingress` is a FastAPI app (``@serve.ingress``) that composes the two through
  ``DeploymentHandle``\\ s or, with ``colocate``, holds both in its own process (one
  deployment, no actor hop per request). The FastAPI app is built per replica by
  ``__serve_build_asgi_app__`` (late-bound ingress), so limits, served name and auth come
  from the config instead of module globals. See :mod:`pipeline.serving.api` for routes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections import Counter
from typing import Any, Optional

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest

from pipeline import method
from pipeline.backends import make_backend
from pipeline.backends.base import BackendUnavailable, Completion, SamplingParams
from pipeline.backends.base import Request as BackendRequest
from pipeline.backends.hf_local import HFBackendConfig
from pipeline.serving import api
from pipeline.serving.api import APIError
from pipeline.serving.config import ServeConfig, SolverBackendConfig
from pipeline.chat import render_chat

logger = logging.getLogger("ray.serve")

_DEFAULT_BATCH = 8
_DEFAULT_WAIT_S = 0.05


def _replica_id() -> Optional[str]:
    try:
        ctx = serve.get_replica_context()
        rid = getattr(ctx, "replica_id", None)
        if rid is None:
            return getattr(ctx, "replica_tag", None)
        return getattr(rid, "unique_id", None) or str(rid)
    except Exception:  # pragma: no cover - outside a replica
        return None


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    first = text[-1] if text else ""
    return f"{type(exc).__name__}: {first}"[:limit]


class _BatchedModel:
    """Shared body of the two model deployments (the ``@serve.batch`` method lives on each
    subclass, so that their batch queues are never shared)."""

    role = "model"

    def _setup(self, backend_config: SolverBackendConfig, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.backend = make_backend(backend_config)
        self.backend_type = backend_config.type
        self.model_name = self.backend.name
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._batch_sizes: Counter = Counter()
        self._generate_sizes: Counter = Counter()
        self._counts: Counter = Counter()
        self._pid = os.getpid()
        self._started_at = time.time()
        logger.info("%s replica ready: %s backend %s, max_batch_size=%d, batch_wait_timeout_s=%g", self.role,
                    self.backend_type, self.model_name, max_batch_size, batch_wait_timeout_s)

    async def generate(self, messages: list[dict[str, str]], params: SamplingParams | dict[str, Any]) -> dict[str, Any]:
        """One chat completion (batched with concurrent calls): text, token usage, finish reason
        or ``error``. ``params``: a :class:`SamplingParams` or its fields."""
        return await self._batched((messages, params))

    async def _run_batch(self, items: list[tuple[list[dict[str, str]], dict[str, Any]]]) -> list[dict[str, Any]]:
        self._batch_sizes[len(items)] += 1
        self._counts["requests"] += len(items)
        groups: dict[SamplingParams, list[int]] = {}
        for i, (_, p) in enumerate(items):
            sp = SamplingParams.model_validate(p)
            if sp.temperature == 0:  # greedy: the seed is moot, so greedy requests batch together whatever their seed
                sp = sp.model_copy(update={"seed": 0})
            groups.setdefault(sp, []).append(i)
        results: list[dict[str, Any]] = [{} for _ in items]
        for sp, idxs in groups.items():
            fits = []
            for i in idxs:
                problem = self._prompt_too_long(items[i][0])
                if problem:
                    self._counts["rejected"] += 1
                    results[i] = {"error": problem, "status": 400, "code": "context_length_exceeded"}
                else:
                    fits.append(i)
            idxs = fits
            if not idxs:
                continue
            reqs = [BackendRequest(messages=items[i][0], role=self.role) for i in idxs]
            self._generate_sizes[len(reqs)] += 1
            try:
                completions = await asyncio.to_thread(self.backend.generate, reqs, sp)
            except Exception as e:  # keep the replica alive: every request of the group gets the error
                self._counts["errors"] += len(idxs)
                logger.warning("%s: generate failed for %d request(s): %s", self.role, len(idxs), _short(e))
                for i in idxs:
                    results[i] = {"error": _short(e), "unavailable": isinstance(e, BackendUnavailable)}
                continue
            for i, c in zip(idxs, completions):
                if c.error:
                    self._counts["errors"] += 1
                self._counts["prompt_tokens"] += c.prompt_tokens
                self._counts["completion_tokens"] += c.completion_tokens
                results[i] = {"text": c.text, "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                              "finish_reason": c.finish_reason or "stop", "error": c.error}
        self._counts["batches"] += 1
        return results

    def _prompt_too_long(self, messages: list[dict[str, str]]) -> Optional[str]:
        """For a local HF model: a message when the rendered prompt exceeds what the model
        takes (the backend would truncate it), else None."""
        tokenizer = getattr(self.backend, "tokenizer", None)
        if tokenizer is None:
            return None
        limit = int(getattr(self.backend, "max_input_tokens", 0) or 0)
        mcfg = getattr(getattr(self.backend, "model", None), "config", None)
        max_pos = getattr(mcfg, "max_position_embeddings", None) or getattr(mcfg, "n_positions", None)
        if max_pos:
            limit = min(limit, int(max_pos) - 1) if limit else int(max_pos) - 1
        if not limit:
            return None
        try:
            n = len(tokenizer(render_chat(tokenizer, messages), add_special_tokens=False)["input_ids"])
        except Exception:  # pragma: no cover - let generate() report it
            return None
        if n > limit:
            return f"the prompt is {n} tokens; the {self.role} model takes at most {limit}"
        return None

    def stats(self) -> dict[str, Any]:
        """Histogram of batch sizes run by this replica (``{size: count}``), and counters."""
        return {
            "role": self.role,
            "model": self.model_name,
            "backend": self.backend_type,
            "replica_id": _replica_id(),
            "pid": self._pid,
            "started_at": self._started_at,
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
            "batch_sizes": {str(k): v for k, v in sorted(self._batch_sizes.items())},
            "generate_sizes": {str(k): v for k, v in sorted(self._generate_sizes.items())},
            "requests": self._counts["requests"],
            "batches": self._counts["batches"],
            "errors": self._counts["errors"],
            "rejected_too_long": self._counts["rejected"],
            "prompt_tokens": self._counts["prompt_tokens"],
            "completion_tokens": self._counts["completion_tokens"],
        }

    def close(self) -> None:
        """Close the backend, once."""
        backend, self.backend = getattr(self, "backend", None), None
        if backend is not None:
            try:
                backend.close()
            except Exception:  # pragma: no cover
                pass

    def __del__(self) -> None:
        self.close()


@serve.deployment(name="Decomposer")
class Decomposer(_BatchedModel):
    """The distilled decomposer student (``hf`` backend)."""

    role = "decomposer"

    def __init__(self, backend_config: HFBackendConfig, max_batch_size: int = _DEFAULT_BATCH,
                 batch_wait_timeout_s: float = _DEFAULT_WAIT_S) -> None:
        if backend_config.type != "hf":
            raise ValueError("the served decomposer uses the hf backend")
        self._setup(backend_config, max_batch_size, batch_wait_timeout_s)

    @serve.batch(max_batch_size=_DEFAULT_BATCH, batch_wait_timeout_s=_DEFAULT_WAIT_S)
    async def _batched(self, items: list[tuple]) -> list[dict[str, Any]]:
        return await self._run_batch(items)


@serve.deployment(name="Solver")
class Solver(_BatchedModel):
    """The solver: a local HF model (``hf``) or an upstream OpenAI-compatible endpoint (``openai``)."""

    role = "solver"

    def __init__(self, backend_config: SolverBackendConfig, max_batch_size: int = _DEFAULT_BATCH,
                 batch_wait_timeout_s: float = _DEFAULT_WAIT_S) -> None:
        self._setup(backend_config, max_batch_size, batch_wait_timeout_s)

    @serve.batch(max_batch_size=_DEFAULT_BATCH, batch_wait_timeout_s=_DEFAULT_WAIT_S)
    async def _batched(self, items: list[tuple]) -> list[dict[str, Any]]:
        return await self._run_batch(items)


# ---------------------------------------------------------------- ingress
class _Token:
    """The bearer token; never shown by repr, never pickled."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value.encode()

    def matches(self, presented: str) -> bool:
        return hmac.compare_digest(presented.encode(), self._value)

    def __repr__(self) -> str:
        return "<redacted>"

    def __reduce__(self) -> Any:
        raise TypeError("the auth token is not picklable")


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """HTTP front door: validates requests, calls Decomposer then Solver, shapes responses.

    ``cfg`` (the app's :class:`~pipeline.serving.config.ServeConfig`) holds no secrets. The
    auth token is read here, in the ingress replica's own process, from the environment
    variable *named* by ``cfg.auth_token_env``: in production that variable is
    set on the nodes (the environment ``ray start`` runs in, e.g. from the cluster
    launcher or the instance's secret store), so the value never enters Serve's config,
    the deployment's init args, or its logs.
    """

    def __init__(self, decomposer: Any, solver: Any, cfg: ServeConfig) -> None:
        # colocated (cfg.colocate): the models live in this replica, built from their backend configs; else
        # decomposer and solver are DeploymentHandles of the model deployments
        self.colocated = cfg.colocate
        if self.colocated:
            decomposer = Decomposer.func_or_class(decomposer, cfg.decomposer.max_batch_size, cfg.decomposer.batch_wait_timeout_s)
            solver = Solver.func_or_class(solver, cfg.solver.max_batch_size, cfg.solver.batch_wait_timeout_s)
        self.decomposer = decomposer
        self.solver = solver
        self.cfg = cfg
        self.limits = cfg.limits
        self.served_models = cfg.served_models()  # {served name: stage}
        self._created = int(time.time())
        self._pid = os.getpid()
        self._status: Counter = Counter()
        self._token: Optional[_Token] = None
        var = cfg.auth_token_env
        if var:
            value = os.environ.get(var)
            if value:
                self._token = _Token(value)
                logger.info("bearer-token auth is on (token from env var %s)", var)
            else:
                logger.warning("auth_token_env=%s is configured but that variable is not set in the ingress "
                               "replica's environment: the API is served WITHOUT authentication", var)

    def __serve_build_asgi_app__(self):
        return create_api(self)

    def __del__(self) -> None:
        if getattr(self, "colocated", False):  # the models are this replica's own: close their backends with it
            for model in (getattr(self, "decomposer", None), getattr(self, "solver", None)):
                if model is not None:
                    model.close()

    # ------------------------------------------------------------ helpers used by the routes
    def authorized(self, header: Optional[str]) -> bool:
        if self._token is None:
            return True
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and self._token.matches(value.strip())

    @property
    def auth_enabled(self) -> bool:
        return self._token is not None

    async def call_model(self, stage: str, messages: list[dict[str, str]], params: SamplingParams,
                         param: Optional[str] = None) -> dict[str, Any]:
        model = self.decomposer if stage == "decomposer" else self.solver
        try:
            out = await (model.generate(messages, params) if self.colocated else model.generate.remote(messages, params))
        except Exception as e:  # replica died, back-pressure, ...
            name = type(e).__name__
            if name in ("BackPressureError", "DeploymentUnavailableError"):
                raise APIError(503, f"the {stage} is overloaded or unavailable; retry later", "server_error",
                               code="unavailable") from None
            raise APIError(502, f"the {stage} failed: {_short(e)}", "upstream_error", code=f"{stage}_error") from None
        if out.get("error") and out.get("status") == 400:
            raise APIError(400, f"{out['error']}; shorten the input", param=param, code=out.get("code"))
        if out.get("unavailable"):  # details (upstream URL, ...) stay in the replica's log
            raise APIError(503, f"the {stage}'s model endpoint is unavailable; retry later", "upstream_error",
                           code=f"{stage}_unavailable")
        if out.get("error"):
            raise APIError(502, f"the {stage} failed: {out['error']}", "upstream_error", code=f"{stage}_error")
        return out

    async def stats(self) -> dict[str, Any]:
        if self.colocated:
            dec, sol = self.decomposer.stats(), self.solver.stats()
        else:
            dec, sol = await asyncio.gather(self.decomposer.stats.remote(), self.solver.stats.remote())
        return {"decomposer": dec, "solver": sol,
                "ingress": {"pid": self._pid, "replica_id": _replica_id(), "auth": self.auth_enabled,
                            "responses_by_status": {str(k): v for k, v in sorted(self._status.items())}}}


def _sse(obj: Any) -> str:
    return "data: " + (obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))) + "\n\n"


def _error_response(e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _add_error_handling(app: FastAPI, svc: Ingress) -> None:
    """One error shape for every failure, bearer-token auth on every route but /healthz, and a 500
    (the replica keeps serving) for a bug in a route; counts responses by status."""

    @app.exception_handler(APIError)
    async def _api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            msg = f"no route {request.method} {request.url.path}"
        elif e.status_code == 405:
            msg = f"method {request.method} is not allowed on {request.url.path}"
        else:
            msg = str(e.detail)
        return JSONResponse(api.error_body(msg, "invalid_request_error"), status_code=e.status_code)

    app.add_middleware(_AuthAndErrors, svc=svc)


class _AuthAndErrors:
    """Bearer-token auth on every route but /healthz, a 500 for a bug in a route, and the count of responses by
    status. Plain ASGI, not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs each request through a
    task group and memory streams: 273-464 µs more CPU per request (benchmarks/bench_ingress_http)."""

    def __init__(self, app: Any, svc: Ingress) -> None:
        self.app, self.svc = app, svc

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        path = _route_path(scope)
        if path != "/healthz" and not self.svc.authorized(_header(scope, b"authorization")):
            await _error_response(APIError(401, "missing or invalid bearer token (send 'Authorization: Bearer <token>')",
                                           "authentication_error", code="invalid_api_key"))(scope, receive, counted)
        else:
            try:
                await self.app(scope, receive, counted)
            except Exception as e:  # a bug in a route: answer 500 and keep serving
                if status:  # the response has started: nothing else can be sent
                    raise
                logger.exception("unhandled error on %s %s", scope.get("method"), path)
                await _error_response(APIError(500, f"internal error: {type(e).__name__}", "server_error"))(scope, receive, counted)
        if status:
            self.svc._status[status[0]] += 1


def _route_path(scope: dict) -> str:
    """The request's path below the app's route prefix."""
    path, root = scope.get("path", ""), scope.get("root_path", "") or ""
    return (path[len(root):] or "/") if root and path.startswith(root) else path


def _header(scope: dict, name: bytes) -> Optional[str]:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _json(model: Any) -> Response:
    """A pydantic response model as JSON, serialized once by pydantic (a route that returns a dict has FastAPI
    walk it with ``jsonable_encoder`` first)."""
    return Response(model.model_dump_json(), media_type="application/json")


def _chat_stream(svc: Ingress, req: api.ChatRequest, out: dict[str, Any], cid: str, created: int,
                 usage: api.ChatUsage) -> StreamingResponse:
    """The finished text as OpenAI-style SSE chunks (it is generated in one piece)."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(delta: dict[str, Any], finish: Optional[str]) -> dict[str, Any]:
        c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if include_usage:
            c["usage"] = None
        return c

    async def events():
        yield _sse(chunk({"role": "assistant", "content": ""}, None))
        if out["text"]:
            yield _sse(chunk({"content": out["text"]}, None))
        yield _sse(chunk({}, out["finish_reason"]))
        if include_usage:
            yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                        "choices": [], "usage": usage.model_dump()})
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _chat(svc: Ingress, request: HTTPRequest):
    """POST /v1/chat/completions, OpenAI-style: the model the request names (the decomposer's or the
    solver's served name; any other is a 404)."""
    req = api.parse_body(api.ChatRequest, await request.body(), svc.limits)
    req.check(svc.limits, tuple(svc.served_models))
    stage = svc.served_models[req.model]
    params = req.sampling(getattr(svc.cfg, stage).sampling)
    out = await svc.call_model(stage, [m.to_backend() for m in req.messages], params, "messages")
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    usage = api.ChatUsage(prompt_tokens=out["prompt_tokens"], completion_tokens=out["completion_tokens"],
                          total_tokens=out["prompt_tokens"] + out["completion_tokens"])
    if req.stream:
        return _chat_stream(svc, req, out, cid, created, usage)
    return _json(api.ChatCompletionResponse(
        id=cid, created=created, model=req.model, usage=usage,
        choices=[api.ChatChoice(message=api.ChatChoiceMessage(content=out["text"]), finish_reason=out["finish_reason"])],
    ))


async def _solve(svc: Ingress, request: HTTPRequest) -> Response:
    """POST /v1/solve: the paper's static two-stage method (:func:`pipeline.method.static`, the same
    program the solve and infer jobs run), each call awaited on the Decomposer or Solver deployment."""
    started = time.perf_counter()
    req = api.parse_body(api.SolveRequest, await request.body(), svc.limits)
    req.check(svc.limits)
    param = "context" if req.context else "question"

    async def call(c: method.Call) -> Completion:  # a failed call raises the HTTP error; the program never sees one
        out = await svc.call_model(c.stage, c.messages, getattr(svc.cfg, c.stage).sampling, param)
        return Completion(text=out["text"], prompt_tokens=out["prompt_tokens"], completion_tokens=out["completion_tokens"],
                          finish_reason=out["finish_reason"])

    o = await method.run_async(method.static(req.row(), svc.cfg.method), call)
    stage_usage = {s: api.StageUsage(prompt_tokens=t.prompt_tokens, completion_tokens=t.completion_tokens)
                   for s, t in o.usage.stages.items()}
    return _json(api.SolveResponse(
        subquestions=o.subquestions or [], subanswers=o.subanswers or [], answer=o.prediction,
        decomposition_parsed=bool(o.decomposition_parsed), decomposer_text=o.decomposer_text or "",
        solver_text=o.solver_text or "", parse_warning=o.warning, usage=api.SolveUsage(**stage_usage),
        models={stage: name for name, stage in svc.served_models.items()},
        latency_s=round(time.perf_counter() - started, 4),
    ))


def create_api(svc: Ingress) -> FastAPI:
    """The FastAPI app of one ingress replica (routes close over ``svc``)."""
    app = FastAPI(title="divconq", docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handling(app, svc)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return api.ModelList(data=[api.ModelCard(id=name, created=svc._created) for name in svc.served_models]).model_dump()

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        return await svc.stats()

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        return await _chat(svc, request)

    @app.post("/v1/solve")
    async def solve(request: HTTPRequest) -> Response:
        return await _solve(svc, request)

    return app
