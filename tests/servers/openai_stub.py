"""A real OpenAI-compatible HTTP server for tests (stand-in for an external teacher API).

It listens on 127.0.0.1 on a free port, served by aiohttp in a background thread with
its own event loop, and can misbehave on demand::

    with OpenAIStubServer(latency_s=0.05, fail_rate_429=0.1, seed=0) as srv:
        client(base_url=srv.base_url)          # http://127.0.0.1:PORT/v1
        srv.fail_rate_500 = 0.2                 # change behaviour at runtime
        srv.stop(); ...; srv.start()            # connection refused meanwhile, same port
        srv.requests, srv.status_counts         # what it saw

Endpoints: ``POST /v1/chat/completions`` and ``GET /v1/models``. Completion text comes
from ``responder(messages, body) -> str``, which may raise :class:`StubHTTPError` to
answer with an error, or return a dict: the whole 200 JSON body, as is (odd bodies on demand). Usage counts are whitespace token counts. It imports nothing
from the project.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import threading
import time
from typing import Any, Callable, Optional, Union

from aiohttp import web

Responder = Callable[[list, dict], str]

DECOMPOSITION_REPLY = "1. What is the first step?\n2. What is the final result?"
SOLUTION_REPLY = "A1: 1\nA2: 2\nThe answer is: 2"


class StubHTTPError(Exception):
    """Raise from a responder to answer with ``status`` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def default_responder(messages: list, body: dict) -> str:
    last_user = ""
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            last_user = str(m.get("content") or "")
            break
    return DECOMPOSITION_REPLY if "subquestion" in last_user.lower() else SOLUTION_REPLY


def _ntok(text: str) -> int:
    return len(text.split())


def _error_body(message: str, type_: str, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


class OpenAIStubServer:
    def __init__(
        self,
        *,
        model: str = "stub-model",
        latency_s: float = 0.0,
        fail_rate_429: float = 0.0,
        fail_rate_500: float = 0.0,
        garbage_rate: float = 0.0,
        slow_rate: float = 0.0,
        slow_s: float = 1.0,
        retry_after: Optional[float] = None,
        seed: int = 0,
        required_api_key: Optional[str] = None,
        responder: Optional[Responder] = None,
        max_prompt_tokens: Optional[int] = None,
        port: int = 0,
    ) -> None:
        # Behaviour: plain attributes, safe to reassign from any thread at runtime.
        self.model = model
        self.latency_s = latency_s
        self.fail_rate_429 = fail_rate_429
        self.fail_rate_500 = fail_rate_500
        self.garbage_rate = garbage_rate
        self.slow_rate = slow_rate
        self.slow_s = slow_s
        self.retry_after = retry_after
        self.required_api_key = required_api_key
        self.responder: Responder = responder or default_responder
        self.max_prompt_tokens = max_prompt_tokens
        self.port = port
        # Holds, so tests can stop a client at a chosen point instead of timing it. A held chat request
        # waits until its hold ends, its client disconnects, or hold_timeout_s passes:
        # hold_until_inflight=N holds every request until N have been in flight at once (does the client
        # overlap its requests?); hold_after_requests=N holds every request after the first N to arrive,
        # until set back to None (a job can finish exactly the work those N requests carry).
        self.hold_until_inflight: Optional[int] = None
        self.hold_after_requests: Optional[int] = None
        self.hold_timeout_s = 20.0
        self.held = 0

        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._forced: collections.deque = collections.deque()
        # Observations (read them after requests finish, or take counters()).
        self.requests: list[dict] = []  # every parsed chat request body, in arrival order
        self.request_times: list[float] = []  # time.monotonic() at arrival
        self.auth_headers: list[Optional[str]] = []
        self.request_count = 0
        self.status_counts: collections.Counter = collections.Counter()
        self.garbage_count = 0
        self.slow_count = 0
        self.inflight = 0
        self.max_inflight = 0

        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._runner: Optional[web.AppRunner] = None

    # ------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def down(self) -> bool:
        return self._runner is None

    @down.setter
    def down(self, value: bool) -> None:
        self.stop() if value else self.start()

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=loop.run_forever, name="openai-stub", daemon=True)
            self._thread.start()
            self._loop = loop
        return self._loop

    def _call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._ensure_loop()).result(timeout)

    def start(self) -> "OpenAIStubServer":
        """Open the listening socket (a free port the first time, the same port after)."""
        if self._runner is None:
            self._call(self._astart())
        return self

    def stop(self) -> None:
        """Close the listening socket and open connections: clients get connection refused."""
        if self._runner is not None and self._loop is not None:
            self._call(self._astop())

    def close(self) -> None:
        self.stop()
        loop = self._loop
        if loop is not None:
            self._call(self._cancel_pending())
            self._loop = None
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(5)
            loop.close()

    def __enter__(self) -> "OpenAIStubServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def _astart(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = runner.addresses[0][1]
        self._runner = runner

    async def _cancel_pending(self) -> None:
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _astop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # ------------------------------------------------------------ control
    def fail_next(self, *outcomes: Union[int, str]) -> None:
        """Force the next requests' outcomes, in order: an HTTP status (429, 500, 400, ...),
        ``"garbage"`` (200, non-JSON body), ``"garbage_json"`` (200, JSON without choices)
        or ``"slow"``. Forced outcomes come before the random failure rates."""
        with self._lock:
            self._forced.extend(outcomes)

    def counters(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.request_count,
                "by_status": dict(self.status_counts),
                "garbage": self.garbage_count,
                "slow": self.slow_count,
                "max_inflight": self.max_inflight,
                "held": self.held,
            }

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()
            self.request_times.clear()
            self.auth_headers.clear()
            self.request_count = 0
            self.status_counts.clear()
            self.garbage_count = self.slow_count = self.max_inflight = 0

    # ------------------------------------------------------------ handlers
    def _authorized(self, request: web.Request) -> bool:
        key = self.required_api_key
        return key is None or request.headers.get("Authorization") == f"Bearer {key}"

    def _respond(self, status: int, payload: Any, headers: Optional[dict] = None) -> web.Response:
        with self._lock:
            self.status_counts[status] += 1
        return web.json_response(payload, status=status, headers=headers)

    async def _models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._respond(401, _error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"))
        return self._respond(200, {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "stub"}]})

    async def _chat(self, request: web.Request) -> web.Response:
        with self._lock:
            self.request_count += 1
            arrival = self.request_count
            self.request_times.append(time.monotonic())
            self.auth_headers.append(request.headers.get("Authorization"))
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            await self._hold(request, arrival)
            if request.transport is None:  # the client went away while held
                return web.Response(status=499)
            return await self._chat_inner(request)
        finally:
            with self._lock:
                self.inflight -= 1

    def _must_hold(self, arrival: int) -> bool:
        target, after = self.hold_until_inflight, self.hold_after_requests
        return bool(target and self.max_inflight < target) or (after is not None and arrival > after)

    async def _hold(self, request: web.Request, arrival: int) -> None:
        if not self._must_hold(arrival):
            return
        deadline = time.monotonic() + self.hold_timeout_s
        with self._lock:
            self.held += 1
        try:
            while self._must_hold(arrival) and request.transport is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            with self._lock:
                self.held -= 1

    async def _chat_inner(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("body is not an object")
        except ValueError as e:
            return self._respond(400, _error_body(f"We could not parse the JSON body of your request: {e}", "invalid_request_error"))
        with self._lock:
            self.requests.append(body)
        if not self._authorized(request):
            return self._respond(401, _error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"))

        with self._lock:
            forced = self._forced.popleft() if self._forced else None
            u, v = self._rng.random(), self._rng.random()
        outcome: Union[int, str, None] = forced
        if outcome is None:
            if u < self.fail_rate_429:
                outcome = 429
            elif u < self.fail_rate_429 + self.fail_rate_500:
                outcome = 500
            elif u < self.fail_rate_429 + self.fail_rate_500 + self.garbage_rate:
                outcome = "garbage"
            elif v < self.slow_rate:
                outcome = "slow"

        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        if outcome == "slow":
            with self._lock:
                self.slow_count += 1
            await asyncio.sleep(self.slow_s)
        elif outcome == 429:
            headers = {}
            if self.retry_after is not None:
                ra = self.retry_after
                headers["Retry-After"] = str(int(ra)) if float(ra).is_integer() else str(ra)
            return self._respond(429, _error_body("Rate limit reached for requests.", "requests", "rate_limit_exceeded"), headers)
        elif outcome == "garbage":
            with self._lock:
                self.status_counts[200] += 1
                self.garbage_count += 1
            return web.Response(status=200, text="<html><body><h1>upstream hiccup</h1></body>", content_type="text/html")
        elif outcome == "garbage_json":
            with self._lock:
                self.garbage_count += 1
            return self._respond(200, {"id": "chatcmpl-broken", "object": "chat.completion", "choices": []})
        elif isinstance(outcome, int):
            kind = "server_error" if outcome >= 500 else "invalid_request_error"
            return self._respond(outcome, _error_body(f"Forced failure {outcome}.", kind))

        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return self._respond(400, _error_body("'messages' must be a non-empty array.", "invalid_request_error"))
        prompt_tokens = sum(_ntok(str(m.get("content") or "")) for m in messages if isinstance(m, dict))
        if self.max_prompt_tokens is not None and prompt_tokens > self.max_prompt_tokens:
            return self._respond(400, _error_body(
                f"This model's maximum context length is {self.max_prompt_tokens} tokens. "
                f"However, your messages resulted in {prompt_tokens} tokens.",
                "invalid_request_error", "context_length_exceeded"))
        try:
            text = self.responder(messages, body)
        except StubHTTPError as e:
            kind = "server_error" if e.status >= 500 else "invalid_request_error"
            return self._respond(e.status, _error_body(e.message, kind), e.headers)
        if isinstance(text, dict):
            return self._respond(200, text)

        finish = "stop"
        max_tokens = body.get("max_tokens")
        words = text.split()
        if isinstance(max_tokens, int) and len(words) > max_tokens:
            text, finish = " ".join(words[:max_tokens]), "length"
        completion_tokens = _ntok(text)
        with self._lock:
            n = self.request_count
        return self._respond(200, {
            "id": f"chatcmpl-stub-{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })
