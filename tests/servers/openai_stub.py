"""A real OpenAI-compatible HTTP server for tests (stand-in for an external teacher API).

It listens on 127.0.0.1 on a free port, served by aiohttp in a background thread with
its own event loop, and can misbehave on demand::

    with OpenAIStubServer(latency_s=0.05, fail_rate_429=0.1, seed=0) as srv:
        client(base_url=srv.base_url)          # http://127.0.0.1:PORT/v1
        srv.fail_rate_500 = 0.2                 # change behaviour at runtime
        srv.stop(); ...; srv.start()            # connection refused meanwhile, same port
        srv.requests, srv.status_counts         # what it saw

Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``, the Files API (``POST /v1/files``,
``GET /v1/files/{id}[/content]``) and the Batch API (``POST/GET /v1/batches``, ``GET /v1/batches/{id}``,
``POST /v1/batches/{id}/cancel``; see ``batch_*`` and :meth:`force_batches`), with optional provider
rate limits (``rpm_limit``/``tpm_limit`` with ``x-ratelimit-*`` headers). Completion text comes
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
        # Provider rate limits (None: off). Over the limit in a sliding window of rate_window_s seconds the
        # server answers 429 with Retry-After; every answer carries the x-ratelimit-* headers.
        self.rpm_limit: Optional[int] = None
        self.tpm_limit: Optional[int] = None
        self.rate_window_s = 60.0
        # Batch API behaviour: seconds in "validating" and "in_progress"; hold keeps batches in_progress;
        # forced outcomes for the next created batches: "completed", "failed", ("expired", k) (only the
        # first k requests done), "cancelled".
        self.batch_validating_s = 0.0
        self.batch_latency_s = 0.0
        self.batch_hold = False
        self.batch_max_requests: Optional[int] = None
        self._batch_forced: collections.deque = collections.deque()
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.batch_requests = 0  # chat requests answered inside batches
        self.file_download_times: list[float] = []  # time.monotonic() of each file content download

        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._forced: collections.deque = collections.deque()
        # Observations (read them after requests finish, or take counters()).
        self.requests: list[dict] = []  # every parsed chat request body, in arrival order
        self.request_times: list[float] = []  # time.monotonic() at arrival
        self.request_log: list[tuple[float, dict]] = []  # (arrival time, body) of chat requests, together
        self._window: collections.deque = collections.deque()  # (time, tokens) of admitted requests
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
        app = web.Application(client_max_size=512 * 1024 * 1024)  # batch input files are large
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/files", self._file_upload)
        app.router.add_get("/v1/files/{file_id}", self._file_get)
        app.router.add_get("/v1/files/{file_id}/content", self._file_content)
        app.router.add_post("/v1/batches", self._batch_create)
        app.router.add_get("/v1/batches", self._batch_list)
        app.router.add_get("/v1/batches/{batch_id}", self._batch_get)
        app.router.add_post("/v1/batches/{batch_id}/cancel", self._batch_cancel)
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
            self.request_log.clear()
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
        arrived = time.monotonic()
        with self._lock:
            self.request_count += 1
            arrival = self.request_count
            self.request_times.append(arrived)
            self.auth_headers.append(request.headers.get("Authorization"))
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            await self._hold(request, arrival)
            if request.transport is None:  # the client went away while held
                return web.Response(status=499)
            return await self._chat_inner(request, arrived)
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

    async def _chat_inner(self, request: web.Request, arrived: float) -> web.Response:
        raw = await request.read()
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("body is not an object")
        except ValueError as e:
            return self._respond(400, _error_body(f"We could not parse the JSON body of your request: {e}", "invalid_request_error"))
        with self._lock:
            self.requests.append(body)
            self.request_log.append((arrived, body))
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

        limited = self._rate_limit_check(body)
        if limited is not None:
            return limited
        status, payload, headers = self._completion(body)
        return self._respond(status, payload, {**self._rate_limit_headers(), **headers})

    def _completion(self, body: dict) -> tuple[int, dict, dict]:
        """(status, JSON body, extra headers) of one chat completion request: shared by the online and the batch endpoints."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return 400, _error_body("'messages' must be a non-empty array.", "invalid_request_error"), {}
        prompt_tokens = sum(_ntok(str(m.get("content") or "")) for m in messages if isinstance(m, dict))
        if self.max_prompt_tokens is not None and prompt_tokens > self.max_prompt_tokens:
            return 400, _error_body(
                f"This model's maximum context length is {self.max_prompt_tokens} tokens. "
                f"However, your messages resulted in {prompt_tokens} tokens.",
                "invalid_request_error", "context_length_exceeded"), {}
        try:
            text = self.responder(messages, body)
        except StubHTTPError as e:
            kind = "server_error" if e.status >= 500 else "invalid_request_error"
            return e.status, _error_body(e.message, kind), e.headers
        if isinstance(text, dict):
            return 200, text, {}

        finish = "stop"
        max_tokens = body.get("max_tokens")
        words = text.split()
        if isinstance(max_tokens, int) and len(words) > max_tokens:
            text, finish = " ".join(words[:max_tokens]), "length"
        completion_tokens = _ntok(text)
        with self._lock:
            n = self.request_count
        return 200, {
            "id": f"chatcmpl-stub-{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }, {}

    # ------------------------------------------------------------ provider rate limits
    def _prune_window(self, now: float) -> None:
        while self._window and now - self._window[0][0] >= self.rate_window_s:
            self._window.popleft()

    def _rate_limit_headers(self) -> dict[str, str]:
        if self.rpm_limit is None and self.tpm_limit is None:
            return {}
        now = time.monotonic()
        with self._lock:
            self._prune_window(now)
            used_requests = len(self._window)
            used_tokens = sum(t for _, t in self._window)
            reset = max(0.0, self.rate_window_s - (now - self._window[0][0])) if self._window else 0.0
        headers = {}
        for kind, limit, used in (("requests", self.rpm_limit, used_requests), ("tokens", self.tpm_limit, used_tokens)):
            if limit is not None:
                headers[f"x-ratelimit-limit-{kind}"] = str(limit)
                headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, limit - used))
                headers[f"x-ratelimit-reset-{kind}"] = f"{int(reset * 1000)}ms"
        return headers

    def _rate_limit_check(self, body: dict) -> Optional[web.Response]:
        """Admit the request into the window, or answer 429 (with Retry-After) when a limit is used up."""
        if self.rpm_limit is None and self.tpm_limit is None:
            return None
        tokens = sum(_ntok(str(m.get("content") or "")) for m in body.get("messages") or [] if isinstance(m, dict))
        tokens += int(body.get("max_tokens") or 0)
        now = time.monotonic()
        with self._lock:
            self._prune_window(now)
            over = (self.rpm_limit is not None and len(self._window) >= self.rpm_limit) or (
                self.tpm_limit is not None and sum(t for _, t in self._window) + tokens > self.tpm_limit)
            retry = max(0.001, self.rate_window_s - (now - self._window[0][0])) if over and self._window else 0.0
            if not over:
                self._window.append((now, tokens))
        if not over:
            return None
        headers = {**self._rate_limit_headers(), "Retry-After": f"{retry:.3f}"}
        return self._respond(429, _error_body("Rate limit reached for requests.", "requests", "rate_limit_exceeded"), headers)

    # ------------------------------------------------------------ Files API
    def _file_object(self, file_id: str) -> dict:
        f = self.files[file_id]
        return {"id": file_id, "object": "file", "bytes": len(f["content"]), "created_at": f["created_at"],
                "filename": f["filename"], "purpose": f["purpose"], "status": "processed"}

    def _new_file(self, content: bytes, filename: str, purpose: str) -> str:
        with self._lock:
            file_id = f"file-stub{len(self.files) + 1:05d}"
            self.files[file_id] = {"content": content, "filename": filename, "purpose": purpose, "created_at": int(time.time())}
        return file_id

    async def _file_upload(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._respond(401, _error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"))
        form = await request.post()
        upload, purpose = form.get("file"), form.get("purpose")
        if purpose not in ("batch", "fine-tune", "assistants") or not hasattr(upload, "file"):
            return self._respond(400, _error_body("'file' and a valid 'purpose' are required.", "invalid_request_error"))
        file_id = self._new_file(upload.file.read(), upload.filename or "upload.jsonl", str(purpose))
        return self._respond(200, self._file_object(file_id))

    async def _file_get(self, request: web.Request) -> web.Response:
        file_id = request.match_info["file_id"]
        if file_id not in self.files:
            return self._respond(404, _error_body(f"No such File object: {file_id}", "invalid_request_error"))
        return self._respond(200, self._file_object(file_id))

    async def _file_content(self, request: web.Request) -> web.Response:
        file_id = request.match_info["file_id"]
        if file_id not in self.files:
            return self._respond(404, _error_body(f"No such File object: {file_id}", "invalid_request_error"))
        with self._lock:
            self.status_counts[200] += 1
            self.file_download_times.append(time.monotonic())
        return web.Response(body=self.files[file_id]["content"], content_type="application/octet-stream")

    # ------------------------------------------------------------ Batch API
    def force_batches(self, *outcomes: Union[str, tuple]) -> None:
        """Outcomes of the next created batches, in order (see ``batch_*`` attributes)."""
        with self._lock:
            self._batch_forced.extend(outcomes)

    def _validate_batch_input(self, content: bytes, endpoint: str) -> list[dict]:
        errors, lines, seen = [], [], set()
        for i, raw in enumerate(content.decode("utf-8").splitlines(), 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
                assert isinstance(line, dict) and isinstance(line.get("body"), dict)
            except (ValueError, AssertionError):
                errors.append({"code": "invalid_json", "message": f"Line {i} is not a valid request object.", "param": None, "line": i})
                continue
            if line.get("method") != "POST" or line.get("url") != endpoint:
                errors.append({"code": "invalid_url", "message": f"Line {i}: url must be {endpoint}.", "param": "url", "line": i})
            if not line.get("custom_id") or line["custom_id"] in seen:
                errors.append({"code": "duplicate_custom_id", "message": f"Line {i}: custom_id missing or repeated.", "param": "custom_id", "line": i})
            if not line["body"].get("model"):
                errors.append({"code": "missing_required_parameter", "message": f"Line {i}: body.model is required.", "param": "body.model", "line": i})
            seen.add(line.get("custom_id"))
            lines.append(line)
        if self.batch_max_requests is not None and len(lines) > self.batch_max_requests:
            errors.append({"code": "too_many_requests", "message": f"A batch may hold at most {self.batch_max_requests} requests.", "param": None, "line": None})
        if errors:
            raise ValueError(json.dumps(errors))
        return lines

    async def _batch_create(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._respond(401, _error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"))
        try:
            body = await request.json()
        except ValueError:
            return self._respond(400, _error_body("Invalid JSON body.", "invalid_request_error"))
        file_id, endpoint = body.get("input_file_id"), body.get("endpoint")
        if file_id not in self.files or endpoint != "/v1/chat/completions" or body.get("completion_window") != "24h":
            return self._respond(400, _error_body("input_file_id, endpoint and completion_window '24h' are required.", "invalid_request_error"))
        now = int(time.time())
        with self._lock:
            batch_id = f"batch_stub{len(self.batches) + 1:05d}"
            forced = self._batch_forced.popleft() if self._batch_forced else "completed"
            self.batches[batch_id] = {
                "id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None, "input_file_id": file_id,
                "completion_window": "24h", "status": "validating", "output_file_id": None, "error_file_id": None,
                "created_at": now, "in_progress_at": None, "expires_at": now + 86400, "finalizing_at": None,
                "completed_at": None, "failed_at": None, "expired_at": None, "cancelled_at": None,
                "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": body.get("metadata"),
                "_created": time.monotonic(), "_outcome": forced}
        return self._respond(200, self._batch_view(batch_id, advance=False))

    def _batch_view(self, batch_id: str, advance: bool = True) -> dict:
        if advance:  # batches move on when they are looked at (polled), like time passing at the provider
            self._advance_batch(self.batches[batch_id])
        return {k: v for k, v in self.batches[batch_id].items() if not k.startswith("_")}

    def _advance_batch(self, b: dict) -> None:
        """Move a batch along validating -> in_progress -> completed / failed / expired as time passes."""
        age = time.monotonic() - b["_created"]
        if b["status"] == "validating" and age >= self.batch_validating_s:
            try:
                b["_lines"] = self._validate_batch_input(self.files[b["input_file_id"]]["content"], b["endpoint"])
            except ValueError as e:
                b.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": json.loads(str(e))})
                return
            if b["_outcome"] == "failed":
                b.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": [
                    {"code": "server_error", "message": "Batch failed to process.", "param": None, "line": None}]})
                return
            b.update(status="in_progress", in_progress_at=int(time.time()))
            b["request_counts"]["total"] = len(b["_lines"])
        if b["status"] == "in_progress" and not self.batch_hold and age >= self.batch_validating_s + self.batch_latency_s:
            self._finish_batch(b)

    def _finish_batch(self, b: dict) -> None:
        outcome = b["_outcome"]
        done_upto = outcome[1] if isinstance(outcome, tuple) else len(b["_lines"])
        outputs, errors = [], []
        for i, line in enumerate(b["_lines"]):
            rid = f"batch_req_{b['id']}_{i}"
            if i >= done_upto:
                errors.append({"id": rid, "custom_id": line["custom_id"], "response": None, "error": {
                    "code": "batch_expired", "message": "This request could not be executed before the completion window expired."}})
                continue
            status, payload, _ = self._completion(line["body"])
            with self._lock:
                self.batch_requests += 1
            entry = {"id": rid, "custom_id": line["custom_id"],
                     "response": {"status_code": status, "request_id": f"req_{i}", "body": payload}, "error": None}
            (outputs if status == 200 else errors).append(entry)
        final = {"expired": "expired", "cancelled": "cancelled"}.get(outcome[0] if isinstance(outcome, tuple) else outcome, "completed")
        now = int(time.time())
        b["status"] = final
        b[f"{final}_at"] = now
        b["finalizing_at"] = now
        b["request_counts"] = {"total": len(b["_lines"]), "completed": len(outputs), "failed": len(errors)}
        as_jsonl = lambda rows: "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")  # noqa: E731
        if outputs:
            b["output_file_id"] = self._new_file(as_jsonl(outputs), f"{b['id']}_output.jsonl", "batch_output")
        if errors:
            b["error_file_id"] = self._new_file(as_jsonl(errors), f"{b['id']}_error.jsonl", "batch_output")

    async def _batch_get(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["batch_id"]
        if batch_id not in self.batches:
            return self._respond(404, _error_body(f"No such Batch object: {batch_id}", "invalid_request_error"))
        return self._respond(200, self._batch_view(batch_id))

    async def _batch_list(self, request: web.Request) -> web.Response:
        limit = int(request.query.get("limit", "20"))
        after = request.query.get("after")
        ids = sorted(self.batches, reverse=True)  # newest first, like the real API
        if after in ids:
            ids = ids[ids.index(after) + 1:]
        page = [self._batch_view(i) for i in ids[:limit]]
        return self._respond(200, {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                                   "last_id": page[-1]["id"] if page else None, "has_more": len(ids) > limit})

    async def _batch_cancel(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["batch_id"]
        if batch_id not in self.batches:
            return self._respond(404, _error_body(f"No such Batch object: {batch_id}", "invalid_request_error"))
        b = self.batches[batch_id]
        if b["status"] in ("validating", "in_progress"):
            b["_outcome"] = ("cancelled", 0)
            self._finish_batch(b) if b["status"] == "in_progress" else b.update(status="cancelled", cancelled_at=int(time.time()))
        return self._respond(200, self._batch_view(batch_id))
