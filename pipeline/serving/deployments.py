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
  ``DeploymentHandle``\\ s. The FastAPI app is built per replica by
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

from ray import serve

from starlette.requests import Request as HTTPRequest

from pipeline.backends.base import BackendUnavailable, SamplingParams
from pipeline.backends.base import Request as BackendRequest
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

    def _setup(self, backend_config: dict[str, Any], max_batch_size: int, batch_wait_timeout_s: float) -> None:
        from pydantic import TypeAdapter

        from pipeline.backends import make_backend
        from pipeline.serving.config import SolverBackendConfig

        cfg = TypeAdapter(SolverBackendConfig).validate_python(backend_config)
        self.backend = make_backend(cfg)
        self.backend_type = cfg.type
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

    async def generate(self, messages: list[dict[str, str]], params: dict[str, Any]) -> dict[str, Any]:
        """One chat completion (batched with concurrent calls): text, token usage, finish reason
        or ``error``."""
        return await self._batched((messages, params))

    async def _run_batch(self, items: list[tuple[list[dict[str, str]], dict[str, Any]]]) -> list[dict[str, Any]]:
        self._batch_sizes[len(items)] += 1
        self._counts["requests"] += len(items)
        groups: dict[SamplingParams, list[int]] = {}
        for i, (_, p) in enumerate(items):
            temperature = float(p.get("temperature", 0.0))
            sp = SamplingParams(temperature=temperature, top_p=float(p.get("top_p", 1.0)),
                                max_tokens=int(p.get("max_tokens", 256)),
                                seed=int(p.get("seed", 0)) if temperature > 0 else 0,  # greedy: the seed is moot
                                stop=tuple(p.get("stop") or ()))
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

    def __del__(self) -> None:
        backend = getattr(self, "backend", None)
        if backend is not None:
            try:
                backend.close()
            except Exception:  # pragma: no cover
                pass


@serve.deployment(name="Decomposer")
class Decomposer(_BatchedModel):
    """The distilled decomposer student (``hf`` backend)."""

    role = "decomposer"

    def __init__(self, backend_config: dict[str, Any], max_batch_size: int = _DEFAULT_BATCH,
                 batch_wait_timeout_s: float = _DEFAULT_WAIT_S) -> None:
        if backend_config.get("type") != "hf":
            raise ValueError("the served decomposer uses the hf backend")
        self._setup(backend_config, max_batch_size, batch_wait_timeout_s)

    @serve.batch(max_batch_size=_DEFAULT_BATCH, batch_wait_timeout_s=_DEFAULT_WAIT_S)
    async def _batched(self, items: list[tuple]) -> list[dict[str, Any]]:
        return await self._run_batch(items)


@serve.deployment(name="Solver")
class Solver(_BatchedModel):
    """The solver: a local HF model (``hf``) or an upstream OpenAI-compatible endpoint (``openai``)."""

    role = "solver"

    def __init__(self, backend_config: dict[str, Any], max_batch_size: int = _DEFAULT_BATCH,
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

    ``settings`` (built by :func:`pipeline.serving.app.build_app`) holds no secrets. The
    auth token is read here, in the ingress replica's own process, from the environment
    variable *named* by ``settings["auth_token_env"]``: in production that variable is
    set on the nodes (the environment ``ray start`` runs in, e.g. from the cluster
    launcher or the instance's secret store), so the value never enters Serve's config,
    the deployment's init args, or its logs.
    """

    def __init__(self, decomposer: Any, solver: Any, settings: dict[str, Any]) -> None:
        from pipeline.serving.config import LimitsConfig

        self.decomposer = decomposer
        self.solver = solver
        self.settings = settings
        self.limits = LimitsConfig.model_validate(settings["limits"])
        self.served_name: str = settings["served_name"]
        self._created = int(time.time())
        self._pid = os.getpid()
        self._status: Counter = Counter()
        self._token: Optional[_Token] = None
        var = settings.get("auth_token_env")
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

    async def call_model(self, stage: str, messages: list[dict[str, str]], params: dict[str, Any],
                         param: Optional[str] = None) -> dict[str, Any]:
        from pipeline.serving.api import APIError

        handle = self.decomposer if stage == "decomposer" else self.solver
        try:
            out = await handle.generate.remote(messages, params)
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
        dec, sol = await asyncio.gather(self.decomposer.stats.remote(), self.solver.stats.remote())
        return {"decomposer": dec, "solver": sol,
                "ingress": {"pid": self._pid, "replica_id": _replica_id(), "auth": self.auth_enabled,
                            "responses_by_status": {str(k): v for k, v in sorted(self._status.items())}}}


def _sse(obj: Any) -> str:
    return "data: " + (obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))) + "\n\n"


def create_api(svc: Ingress):
    """The FastAPI app of one ingress replica (routes close over ``svc``)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from pipeline.parsing import ParseError, parse_solver_output, parse_subquestions
    from pipeline.prompts import decomposer_messages, solver_messages
    from pipeline.serving import api

    s = svc.settings
    limits = svc.limits
    app = FastAPI(title="divconq", docs_url=None, redoc_url=None, openapi_url=None)

    def err(e: api.APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(api.APIError)
    async def _api_error(_: HTTPRequest, e: api.APIError) -> JSONResponse:
        return err(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            msg = f"no route {request.method} {request.url.path}"
        elif e.status_code == 405:
            msg = f"method {request.method} is not allowed on {request.url.path}"
        else:
            msg = str(e.detail)
        return JSONResponse(api.error_body(msg, "invalid_request_error"), status_code=e.status_code)

    @app.middleware("http")
    async def _auth_and_errors(request: HTTPRequest, call_next):
        path = request.scope.get("path", "")
        root = request.scope.get("root_path", "") or ""
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if path != "/healthz" and not svc.authorized(request.headers.get("authorization")):
            response = err(api.APIError(401, "missing or invalid bearer token (send 'Authorization: Bearer <token>')",
                                        "authentication_error", code="invalid_api_key"))
        else:
            try:
                response = await call_next(request)
            except Exception as e:  # a bug in a route: answer 500 and keep serving
                logger.exception("unhandled error on %s %s", request.method, path)
                response = err(api.APIError(500, f"internal error: {type(e).__name__}", "server_error"))
        svc._status[response.status_code] += 1
        return response

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return api.ModelList(data=[api.ModelCard(id=svc.served_name, created=svc._created)]).model_dump()

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        return await svc.stats()

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        req = api.parse_body(api.ChatRequest, await request.body(), limits)
        req.check(limits, (svc.served_name,))
        params = req.sampling(s["decomposer_sampling"])
        out = await svc.call_model("decomposer", [m.to_backend() for m in req.messages], params, "messages")
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = api.ChatUsage(prompt_tokens=out["prompt_tokens"], completion_tokens=out["completion_tokens"],
                              total_tokens=out["prompt_tokens"] + out["completion_tokens"])
        if not req.stream:
            return api.ChatCompletionResponse(
                id=cid, created=created, model=svc.served_name, usage=usage,
                choices=[api.ChatChoice(message=api.ChatChoiceMessage(content=out["text"]),
                                        finish_reason=out["finish_reason"])],
            ).model_dump()

        # Streaming: the text is generated in one piece, then sent as OpenAI-style SSE chunks.
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict[str, Any], finish: Optional[str]) -> dict[str, Any]:
            c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": svc.served_name,
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
                yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": svc.served_name,
                            "choices": [], "usage": usage.model_dump()})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/solve")
    async def solve(request: HTTPRequest) -> dict[str, Any]:
        started = time.perf_counter()
        req = api.parse_body(api.SolveRequest, await request.body(), limits)
        req.check(limits)
        row = req.row()
        dec = await svc.call_model("decomposer", decomposer_messages(row, few_shot=s["decomposer_few_shot"]),
                                   s["decomposer_sampling"], "context" if req.context else "question")
        try:
            subqs, parsed = parse_subquestions(dec["text"], s["max_subquestions"]), True
        except ParseError:
            subqs, parsed = [], False  # unparseable: treated as "No decomposition"; the solver answers directly
        sol = await svc.call_model("solver", solver_messages(row, subqs, few_shot=s["solver_few_shot"]),
                                   s["solver_sampling"], "context" if req.context else "question")
        subanswers, answer = parse_solver_output(sol["text"])
        return api.SolveResponse(
            subquestions=subqs, subanswers=subanswers, answer=answer, decomposition_parsed=parsed,
            decomposer_text=dec["text"], solver_text=sol["text"],
            usage=api.SolveUsage(
                decomposer=api.StageUsage(prompt_tokens=dec["prompt_tokens"], completion_tokens=dec["completion_tokens"]),
                solver=api.StageUsage(prompt_tokens=sol["prompt_tokens"], completion_tokens=sol["completion_tokens"])),
            models={"decomposer": svc.served_name, "solver": s["solver_name"]},
            latency_s=round(time.perf_counter() - started, 4),
        ).model_dump()

    return app
