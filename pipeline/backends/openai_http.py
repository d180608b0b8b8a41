"""Teacher backend for any OpenAI-compatible ``/chat/completions`` endpoint, over httpx.

``generate`` is synchronous (it runs inside a Ray Data ``map_batches`` actor): it drives
a private asyncio event loop, created lazily on first use and reused across calls, and
sends the batch's requests concurrently, at most ``config.concurrency`` in flight,
through a rate limiter: the job-wide one (:mod:`pipeline.backends.cluster_limit`) inside Ray
actors, else an :class:`~pipeline.backends.rate_limit.AsyncRateLimiter`. The number in flight
follows the provider (:class:`~pipeline.backends.rate_limit.AdaptiveConcurrency`): every
response's ``x-ratelimit-*`` headers and 429s narrow it, headroom widens it back to the cap.
With ``structured_output`` decomposer requests carry ``response_format`` (:mod:`pipeline.structured`).

Failure policy, per request:

* 429, 408, 5xx (except 501/505), timeouts, connection errors, and a 200 whose body is
  not JSON or lacks ``choices[0].message.content``: retried with exponential backoff and
  full jitter (``backoff_base_s * 2**attempt`` capped at ``backoff_max_s``); a
  ``Retry-After`` header (seconds or HTTP-date) on 429/503 is honoured, capped at
  ``2 * backoff_max_s``.
* other 4xx: ``Completion.error = "HTTP 400: <server message>"``, no retry.
* 401/403: :class:`BackendUnavailable` (every request would fail); the rest of the batch
  stops retrying.
* retries exhausted: if the last failure was a timeout, connection error or 5xx, the
  batch finishes and then :class:`BackendUnavailable` is raised; if it was 429 or a
  garbage 200, the request gets an error Completion.

The API key is read from the environment variable *named* by ``config.api_key_env``
inside the process that generates (e.g. the Ray actor); it is never pickled, logged,
shown by ``repr`` or put into error text (server messages are scrubbed of it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal, Optional, Union

import httpx
from pydantic import Field

from pipeline.backends.base import Backend, BackendUnavailable, Completion, Request, SamplingParams
from pipeline.backends.cluster_limit import make_rate_limiter
from pipeline.backends.rate_limit import AdaptiveConcurrency, AsyncRateLimiter
from pipeline.structured import structured_request_fields
from pipeline.config import Strict, Tagged, secret_from_env

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- config (type: openai)
class OpenAIBackendConfig(Tagged):
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

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
NON_RETRYABLE_5XX = frozenset({501, 505})
RETRY_AFTER_STATUS = frozenset({429, 503})
AUTH_STATUS = frozenset({401, 403})
_MAX_MSG = 300
_warned_missing_key: set[str] = set()


class _Secret:
    """Holds the key so that repr()/vars() of the backend never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<redacted>"

    def __reduce__(self) -> Any:  # never travels through pickle
        raise TypeError("API keys are not picklable")


@dataclass
class _Failure:
    kind: str  # "http" | "garbage" | "timeout" | "connection" | "auth" | "config"
    message: str
    status: Optional[int] = None
    retryable: bool = True
    fatal: bool = False  # counts as "endpoint unreachable" when retries run out
    retry_after: Optional[float] = None


class _Unreachable(Exception):
    pass


class _FatalAbort(Exception):
    pass


def parse_retry_after(value: Optional[str], now: Optional[datetime] = None) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


def _token_count(usage: dict, key: str) -> int:
    """A usage count; ValueError for one that is not a non-negative integer (e.g. ``"n/a"``)."""
    v = usage.get(key)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != int(v):
        raise ValueError(f"usage.{key} is {v!r}, not a token count")
    return int(v)


def _server_message(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        data = None
    msg: Any = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            msg = err.get("message")
        elif isinstance(err, str):
            msg = err
        msg = msg or data.get("detail") or data.get("message")
    if msg is None:
        msg = resp.text
    msg = " ".join(str(msg).split())
    return (msg[:_MAX_MSG] + "...") if len(msg) > _MAX_MSG else (msg or resp.reason_phrase or "no message")


class OpenAIBackend(Backend):
    """Chat completions against ``{base_url}/chat/completions``; see the module docstring."""

    def __init__(self, config: Union[OpenAIBackendConfig, dict]) -> None:
        if not isinstance(config, OpenAIBackendConfig):
            config = OpenAIBackendConfig.model_validate(config)
        self.config = config
        self.name = config.model
        self.base_url = config.base_url.rstrip("/")
        self._url = f"{self.base_url}/chat/completions"
        self._init_runtime()

    # ------------------------------------------------------------ lifecycle
    def _init_runtime(self) -> None:
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._client: Optional[httpx.AsyncClient] = None
        self._limiter: Optional[AsyncRateLimiter] = None
        self._gate: Optional[AdaptiveConcurrency] = None
        self._secret: Optional[_Secret] = None
        self._run_lock = threading.Lock()
        self._rng = random.Random()
        self._stats: Counter = Counter()
        self._by_status: Counter = Counter()

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"])  # type: ignore[misc]

    def __repr__(self) -> str:
        c = self.config
        return (f"OpenAIBackend(model={c.model!r}, base_url={self.base_url!r}, "
                f"api_key_env={c.api_key_env!r}, concurrency={c.concurrency})")

    __str__ = __repr__

    def _load_key(self) -> Optional[str]:
        var = self.config.api_key_env
        key = secret_from_env(var)
        if key:
            self._secret = _Secret(key)
            return key
        self._secret = None
        if var and var not in _warned_missing_key:
            _warned_missing_key.add(var)
            logger.warning("environment variable %s is not set; calling %s without an API key", var, self.base_url)
        return None

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
            self._client = None
            self._limiter = None
            self._gate = None
        return self._loop

    def _ensure_client(self) -> httpx.AsyncClient:
        """Called on the backend's loop; builds the client (and reads the key) once."""
        if self._client is None:
            c = self.config
            key = self._load_key()
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            if key:
                headers["Authorization"] = f"Bearer {key}"
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(c.timeout_s),
                limits=httpx.Limits(max_connections=c.concurrency, max_keepalive_connections=c.concurrency),
                headers=headers,
            )
            self._limiter = make_rate_limiter(c)  # job-wide inside Ray actors, else this process's own
            self._gate = AdaptiveConcurrency(c.concurrency, enabled=c.adaptive_concurrency)
        return self._client

    def _run(self, coro: Any) -> Any:
        loop = self._ensure_loop()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return loop.run_until_complete(coro)
        # Called from inside a running event loop (e.g. an async caller): run our loop on a
        # helper thread instead of nesting.
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="openai-backend") as ex:
            return ex.submit(loop.run_until_complete, coro).result()

    def close(self) -> None:
        with self._run_lock:
            loop, client = self._loop, self._client
            if loop is not None and not loop.is_closed():
                try:
                    if client is not None:
                        self._run(client.aclose())
                    self._run(loop.shutdown_asyncgens())
                finally:
                    loop.close()
            self._loop = self._client = self._limiter = self._gate = None

    # ------------------------------------------------------------ helpers
    def _scrub(self, text: str) -> str:
        key = self._secret.reveal() if self._secret else None
        return text.replace(key, "***") if key and key in text else text

    def stats(self) -> dict[str, Any]:
        s = dict(self._stats)
        return {
            "requests": s.get("requests", 0),
            "retries": s.get("retries", 0),
            "by_status": dict(self._by_status),
            "completions": s.get("completions", 0),
            "errors": s.get("errors", 0),
            "give_ups": s.get("give_ups", 0),
            "prompt_tokens": s.get("prompt_tokens", 0),
            "completion_tokens": s.get("completion_tokens", 0),
            "rate_limit_wait_s": self._limiter.total_wait_s if self._limiter else 0.0,
            "throttled": self._gate.throttled if self._gate else 0,
            "min_concurrency": self._gate.min_width_seen if self._gate else self.config.concurrency,
            "concurrency": self._gate.limit if self._gate else self.config.concurrency,
        }

    def _body(self, req: Request, params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": req.messages,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
            "seed": params.seed + req.sample_index,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        body.update(structured_request_fields(self.config, req.role))
        body.update(self.config.extra_body)
        return body

    @staticmethod
    def _estimate_tokens(req: Request, params: SamplingParams) -> int:
        chars = sum(len(str(m.get("content") or "")) for m in req.messages)
        return chars // 4 + params.max_tokens

    def _backoff(self, attempt: int, failure: _Failure) -> float:
        c = self.config
        if failure.retry_after is not None:
            return min(failure.retry_after, 2 * c.backoff_max_s)
        return self._rng.uniform(0.0, min(c.backoff_max_s, c.backoff_base_s * 2 ** min(attempt, 60)))

    def _observe_limits(self, resp: httpx.Response) -> None:
        """Feed the provider's rate-limit headers (and 429s) to the in-flight gate."""
        if self._gate is None:
            return
        retry_after = None
        if resp.status_code == 429:
            ms = parse_retry_after(resp.headers.get("retry-after-ms"))
            retry_after = ms / 1000 if ms is not None else parse_retry_after(resp.headers.get("retry-after"))
            retry_after = min(retry_after, 2 * self.config.backoff_max_s) if retry_after is not None else None
        self._gate.observe(resp.status_code, resp.headers, retry_after)

    # ------------------------------------------------------------ one HTTP attempt
    async def _attempt(self, client: httpx.AsyncClient, body: dict[str, Any]) -> Union[Completion, _Failure]:
        try:
            resp = await client.post(self._url, json=body)
        except httpx.TimeoutException as e:
            self._by_status["timeout"] += 1
            return _Failure("timeout", f"timed out after {self.config.timeout_s:g}s ({type(e).__name__})", fatal=True)
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:
            return _Failure("config", f"bad base_url {self.base_url!r}: {self._scrub(str(e))}", retryable=False)
        except httpx.TransportError as e:
            self._by_status["connection_error"] += 1
            detail = self._scrub(str(e)) or "no detail"
            return _Failure("connection", f"{type(e).__name__}: {detail}", fatal=True)
        self._observe_limits(resp)

        status = resp.status_code
        self._by_status[str(status)] += 1
        if 200 <= status < 300:
            try:
                data = resp.json()
                choice = data["choices"][0]
                text = choice["message"]["content"]
                if not isinstance(text, str):
                    raise TypeError("content is not a string")
                usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
                tokens = [_token_count(usage, k) for k in ("prompt_tokens", "completion_tokens")]
                finish = choice.get("finish_reason")
            except (ValueError, KeyError, IndexError, TypeError, AttributeError, OverflowError) as e:
                self._by_status["garbage"] += 1
                snippet = self._scrub(" ".join(resp.text[:80].split()))
                return _Failure("garbage", f"malformed {status} response ({type(e).__name__}: {e}): {snippet!r}", status)
            return Completion(text=text, prompt_tokens=tokens[0], completion_tokens=tokens[1],
                              finish_reason=finish if isinstance(finish, str) else None)

        msg = self._scrub(_server_message(resp))
        if status in AUTH_STATUS:
            var = self.config.api_key_env
            if self._secret is None:
                hint = f"no API key was sent (environment variable {var} is not set)" if var else "no API key was sent (api_key_env is not configured)"
            else:
                hint = f"check the API key in environment variable {var}"
            return _Failure("auth", f"teacher endpoint {self.base_url} refused the request (HTTP {status}: {msg}); {hint}",
                            status, retryable=False)
        if status in RETRYABLE_STATUS or (status >= 500 and status not in NON_RETRYABLE_5XX):
            retry_after = None
            if status in RETRY_AFTER_STATUS:
                ms = parse_retry_after(resp.headers.get("retry-after-ms"))
                retry_after = ms / 1000 if ms is not None else parse_retry_after(resp.headers.get("retry-after"))
            return _Failure("http", f"HTTP {status}: {msg}", status, fatal=status >= 500 or status == 408,
                            retry_after=retry_after)
        return _Failure("http", f"HTTP {status}: {msg}", status, retryable=False)

    # ------------------------------------------------------------ one request, with retries
    async def _one(self, client: httpx.AsyncClient, sem: AdaptiveConcurrency, req: Request,
                   params: SamplingParams, abort: dict[str, str]) -> Completion:
        c = self.config
        body = self._body(req, params)
        est = self._estimate_tokens(req, params)
        assert self._limiter is not None
        t0: Optional[float] = None
        last: Optional[_Failure] = None
        for attempt in range(c.max_retries + 1):
            async with sem:
                if abort:  # another request hit a fatal error (e.g. 401): don't send more
                    return Completion(error=f"aborted: {abort['reason']}")
                if t0 is None:
                    t0 = time.monotonic()
                await self._limiter.acquire(est)
                self._stats["requests"] += 1
                outcome = await self._attempt(client, body)
            if isinstance(outcome, Completion):
                outcome.latency_s = time.monotonic() - t0
                self._limiter.refund(est - outcome.prompt_tokens - outcome.completion_tokens
                                     if outcome.prompt_tokens or outcome.completion_tokens else 0)
                self._stats["completions"] += 1
                self._stats["prompt_tokens"] += outcome.prompt_tokens
                self._stats["completion_tokens"] += outcome.completion_tokens
                return outcome
            if outcome.kind in ("auth", "config"):
                abort.setdefault("reason", outcome.message)
                raise _FatalAbort(outcome.message)
            if not outcome.retryable:
                self._stats["errors"] += 1
                return Completion(error=outcome.message, latency_s=time.monotonic() - t0)
            last = outcome
            if attempt == c.max_retries:
                break
            delay = self._backoff(attempt, outcome)
            self._stats["retries"] += 1
            logger.debug("%s: retry %d/%d in %.2fs after %s", self.name, attempt + 1, c.max_retries, delay, outcome.message)
            await asyncio.sleep(delay)

        assert last is not None and t0 is not None
        self._stats["give_ups"] += 1
        logger.warning("%s: giving up on a request after %d retries: %s", self.name, c.max_retries, last.message)
        if last.fatal:
            raise _Unreachable(last.message)
        self._stats["errors"] += 1
        return Completion(error=last.message, latency_s=time.monotonic() - t0)

    async def _generate_async(self, requests: list[Request], params: SamplingParams) -> list[Any]:
        client = self._ensure_client()
        sem = self._gate  # adaptive in-flight limit, kept across calls so what it learnt carries over
        abort: dict[str, str] = {}
        return await asyncio.gather(*(self._one(client, sem, r, params, abort) for r in requests),
                                    return_exceptions=True)

    # ------------------------------------------------------------ Backend API
    def generate(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        if not requests:
            return []
        with self._run_lock:
            results = self._run(self._generate_async(list(requests), params))
        for r in results:
            if isinstance(r, _FatalAbort):
                raise BackendUnavailable(self._scrub(str(r))) from None
        for r in results:
            if isinstance(r, _Unreachable):
                raise BackendUnavailable(self._scrub(
                    f"teacher endpoint {self.base_url} unreachable after {self.config.max_retries} retries: {r}")) from None
        # Anything else one request raised is that request's problem: an error Completion (its row goes
        # to quarantine), never an exception that would fail the whole batch.
        return [Completion(error=self._scrub(f"{type(r).__name__}: {r}")) if isinstance(r, BaseException) else r
                for r in results]
