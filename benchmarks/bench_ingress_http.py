"""The ingress replica's HTTP layer: CPU per request with its plain-ASGI middleware vs Starlette's BaseHTTPMiddleware.

    python -m benchmarks.bench_ingress_http [--quick] [--requests 2000]

The serve app's ingress (``pipeline.serving.deployments.Ingress``, colocated: a tiny Llama as both models, built
in this process as Serve would build the replica) and its FastAPI app (``create_api``), driven in-process through
``httpx.ASGITransport``: no Ray, no proxy, no network, so only the HTTP layer and the route are timed. Its auth /
error / status-count middleware is plain ASGI; the baseline is the same app with that middleware written as
``@app.middleware("http")`` (Starlette's BaseHTTPMiddleware: a task group and memory streams per request), the
way the app had it before, in the same run. The routes reach no model (a model call needs Serve's replica
context, for ``@serve.batch``): ``GET /v1/models``, and ``POST /v1/chat/completions`` with a request the route
refuses (400: body read and validated, the error shape written). The middleware's work is the same on every
route. CPU seconds of this process per request (client included: the same in both), median of interleaved rounds;
the quickstart sends its served teacher about ten thousand requests (results/bench_ingress_http.md).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

NAME = "bench_ingress_http"
SERVED = "bench-model"


def ingress(model: str):
    """A colocated ingress replica's object, built as Serve builds it (its class under the deployment)."""
    from pipeline.serving.app import _backend_configs
    from pipeline.serving.config import ServeConfig
    from pipeline.serving.deployments import Ingress

    cfg = ServeConfig.model_validate({"colocate": True, "decomposer": {"model": model, "served_name": SERVED},
                                      "solver": {"backend": {"type": "hf", "model": model}, "served_name": SERVED + "-qa"}})
    dec, sol = _backend_configs(cfg)
    # the class under Serve's ASGI wrapper (``@serve.ingress`` subclasses it with an async __init__)
    cls = next(c for c in Ingress.func_or_class.__mro__[1:] if c.__name__ == "Ingress")
    return cls(dec, sol, cfg)


def with_base_http_middleware(svc) -> Any:
    """The app with its middleware as ``@app.middleware("http")``, as it was written before (same work)."""
    from starlette.requests import Request

    from pipeline.serving import deployments as D
    from pipeline.serving.api import APIError

    app = D.create_api(svc)
    app.user_middleware = [m for m in app.user_middleware if m.cls is not D._AuthAndErrors]

    @app.middleware("http")
    async def _auth_and_errors(request: Request, call_next):
        path = D._route_path(request.scope)
        if path != "/healthz" and not svc.authorized(request.headers.get("authorization")):
            response = D._error_response(APIError(401, "missing or invalid bearer token", "authentication_error"))
        else:
            try:
                response = await call_next(request)
            except Exception as e:
                response = D._error_response(APIError(500, f"internal error: {type(e).__name__}", "server_error"))
        svc._status[response.status_code] += 1
        return response

    return app


async def cpu_per_request(app, method: str, path: str, body: Optional[dict], n: int, status: int) -> float:
    """CPU microseconds of this process per request, after a warm-up."""
    import httpx

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
        for _ in range(max(20, n // 10)):
            r = await client.request(method, path, json=body)
        assert r.status_code == status, r.text
        t0 = time.process_time()
        for _ in range(n):
            await client.request(method, path, json=body)
        return 1e6 * (time.process_time() - t0) / n


def main(argv: Optional[list[str]] = None) -> int:
    from pipeline.serving.deployments import create_api

    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=None, help="requests per round and route (default 2000, quick 300)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each way")
    args = p.parse_args(argv)
    rep = common.Report(NAME, args, "The ingress replica's HTTP layer: plain-ASGI middleware vs BaseHTTPMiddleware")
    import torch

    torch.set_num_threads(1)
    n = args.requests or (300 if rep.quick else 2000)
    svc = ingress(common.tiny_model(hidden=64, layers=2))
    apps = {"BaseHTTPMiddleware (before)": with_base_http_middleware(svc), "plain ASGI (ours)": create_api(svc)}
    # max_tokens 0 is refused (400) after the body is read and validated
    chat = {"model": SERVED, "messages": [{"role": "user", "content": "In which city was the founder of Acme born?"}],
            "max_tokens": 0, "temperature": 0}
    routes = {"GET /v1/models": ("GET", "/v1/models", None, 200),
              "POST /v1/chat/completions (400)": ("POST", "/v1/chat/completions", chat, 400)}
    runs: dict[str, dict[str, list[float]]] = {r: {w: [] for w in apps} for r in routes}
    for _ in range(args.rounds):
        for route, (method, path, body, status) in routes.items():
            for way, app in apps.items():
                runs[route][way].append(asyncio.run(cpu_per_request(app, method, path, body, n, status)))
    rows, results = [], {}
    for route, ways in runs.items():
        base = statistics.median(ways["BaseHTTPMiddleware (before)"])
        for way, us in ways.items():
            med = statistics.median(us)
            results[f"{route} | {way}"] = {"us_per_request": us, "median_us": med}
            rows.append([route, way, n, f"{med:.0f}", f"{base - med:+.0f}" if way != "BaseHTTPMiddleware (before)" else "–",
                         f"{base / med:.2f}x"])
    table = common.md_table(["route", "middleware", "requests/round", "CPU µs/request (median)", "µs saved", "× before"], rows)
    notes = ("CPU of this one process (client and app); no Ray Serve around it. In a served app each request also "
             "crosses Serve's proxy and the replica's request path (benchmarks/results/bench_serve_overhead.md), which "
             "this does not change.")
    rep.write(results, table, notes, params={"requests": n, "rounds": args.rounds})
    return 0


if __name__ == "__main__":
    sys.exit(main())
