"""Asyncio token-bucket limiter for requests/minute and tokens/minute.

Each limit is a bucket refilled continuously at ``rate / 60`` per second, holding at
most ``burst_s`` seconds' worth (at least one request / one token). ``acquire(tokens)``
waits until both buckets can pay, then takes one request and ``tokens`` tokens. A
request bigger than the token bucket is let through once the bucket is full and puts
it into debt, so long-run throughput still respects the limit. Waiters are served in
FIFO order. A limiter belongs to one event loop (the backend's).

Also here: :func:`parse_rate_limit_headers` (the provider's ``x-ratelimit-*`` headers) and
:class:`AdaptiveConcurrency`, the in-flight gate that follows them. Job-wide limits shared by
every actor are in :mod:`pipeline.backends.cluster_limit`.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Optional


class _Bucket:
    def __init__(self, per_minute: float, burst_s: float, now: float) -> None:
        if per_minute <= 0:
            raise ValueError(f"rate must be > 0, got {per_minute}")
        self.rate = per_minute / 60.0  # units per second
        self.capacity = max(1.0, self.rate * burst_s)
        self.level = self.capacity
        self.updated = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` (clamped to capacity) is available; 0 if it is now."""
        need = min(amount, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate


class AsyncRateLimiter:
    """``await limiter.acquire(tokens)`` before each request. ``None`` limits are off."""

    def __init__(
        self,
        requests_per_minute: Optional[float],
        tokens_per_minute: Optional[float],
        *,
        burst_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        now = clock()
        self._requests = _Bucket(requests_per_minute, burst_s, now) if requests_per_minute else None
        self._tokens = _Bucket(tokens_per_minute, burst_s, now) if tokens_per_minute else None
        self._lock: Optional[asyncio.Lock] = None
        self.total_wait_s = 0.0

    @property
    def enabled(self) -> bool:
        return self._requests is not None or self._tokens is not None

    async def acquire(self, tokens: int = 0) -> float:
        """Wait for capacity for one request of ``tokens`` tokens; returns seconds waited."""
        if not self.enabled:
            return 0.0
        if self._lock is None:
            self._lock = asyncio.Lock()
        waited = 0.0
        async with self._lock:  # FIFO: the head waiter sleeps, the rest queue behind it
            while True:
                now = self._clock()
                delay = 0.0
                for bucket, amount in ((self._requests, 1), (self._tokens, tokens)):
                    if bucket is not None:
                        bucket.refill(now)
                        delay = max(delay, bucket.wait_for(amount))
                if delay <= 0:
                    break
                await asyncio.sleep(delay)
                waited += delay
            if self._requests is not None:
                self._requests.level -= 1
            if self._tokens is not None:
                self._tokens.level -= tokens
        self.total_wait_s += waited
        return waited

    def refund(self, tokens: int) -> None:
        """Give back (or, if negative, charge) tokens once the real usage is known."""
        if self._tokens is not None and tokens:
            self._tokens.refill(self._clock())
            self._tokens.level = min(self._tokens.capacity, self._tokens.level + tokens)


# ---------------------------------------------------------------- provider-driven limits
_DURATION_RE = re.compile(r"(?P<value>\d+(?:\.\d+)?)(?P<unit>ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_reset(value: Optional[str], now: Optional[datetime] = None) -> Optional[float]:
    """Seconds until a limit resets: OpenAI durations ("1s", "6m0s", "20ms"), plain seconds, or an
    RFC 3339 timestamp (Anthropic's ``anthropic-ratelimit-*-reset``)."""
    if value is None or not str(value).strip():
        return None
    text = str(value).strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = list(_DURATION_RE.finditer(text))
    if parts and "".join(p.group(0) for p in parts) == text:
        return sum(float(p.group("value")) * _UNIT_S[p.group("unit")] for p in parts)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


def _int_header(headers: Mapping[str, str], name: str) -> Optional[int]:
    raw = headers.get(name)
    try:
        return int(float(raw)) if raw is not None else None
    except ValueError:
        return None


@dataclass
class ProviderLimits:
    """What a response's rate-limit headers say (``None``: the header was absent or unreadable)."""

    limit_requests: Optional[int] = None
    remaining_requests: Optional[int] = None
    reset_requests_s: Optional[float] = None
    limit_tokens: Optional[int] = None
    remaining_tokens: Optional[int] = None
    reset_tokens_s: Optional[float] = None

    @property
    def known(self) -> bool:
        return self.remaining_requests is not None or self.remaining_tokens is not None

    def exhausted_for_s(self) -> float:
        """Seconds to wait when a budget is at zero (0 if none is)."""
        waits = [reset or 0.0 for remaining, reset in ((self.remaining_requests, self.reset_requests_s),
                                                        (self.remaining_tokens, self.reset_tokens_s))
                 if remaining is not None and remaining <= 0]
        return max(waits, default=0.0)

    def headroom(self) -> Optional[float]:
        """The smaller remaining/limit fraction of requests and tokens (None: unknown)."""
        fractions = [remaining / limit for remaining, limit in ((self.remaining_requests, self.limit_requests),
                                                                (self.remaining_tokens, self.limit_tokens))
                     if remaining is not None and limit]
        return min(fractions) if fractions else None


def parse_rate_limit_headers(headers: Mapping[str, str]) -> ProviderLimits:
    """OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` or Anthropic's
    ``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}``."""
    lower = {k.lower(): v for k, v in headers.items()}
    out = ProviderLimits()
    for kind in ("requests", "tokens"):
        for field_, openai_name, anthropic_name in (
            ("limit", f"x-ratelimit-limit-{kind}", f"anthropic-ratelimit-{kind}-limit"),
            ("remaining", f"x-ratelimit-remaining-{kind}", f"anthropic-ratelimit-{kind}-remaining"),
        ):
            value = _int_header(lower, openai_name)
            setattr(out, f"{field_}_{kind}", value if value is not None else _int_header(lower, anthropic_name))
        reset = lower.get(f"x-ratelimit-reset-{kind}") or lower.get(f"anthropic-ratelimit-{kind}-reset")
        setattr(out, f"reset_{kind}_s", parse_reset(reset))
    return out


class AdaptiveConcurrency:
    """An ``async with`` gate whose width follows the provider (additive increase, multiplicative decrease).

    ``cap`` (the configured ``concurrency``) is the most requests in flight. A 429 halves the width
    and holds every new request back for its ``Retry-After``; a response whose headers show a budget
    at zero holds them until its reset; little headroom (< 10 %) narrows the width by one; otherwise
    each success widens it by ``1/width`` (one step per round of requests) back up to ``cap``.
    Written here rather than taken from a library because the width must follow response headers.
    """

    LOW_HEADROOM = 0.1

    def __init__(self, cap: int, enabled: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.cap = max(1, int(cap))
        self.enabled = enabled
        self.width = float(self.cap)
        self.inflight = 0
        self.min_width_seen = self.cap
        self.paused_until = 0.0
        self.throttled = 0
        self._clock = clock
        self._cond: Optional[asyncio.Condition] = None

    @property
    def limit(self) -> int:
        return max(1, int(self.width)) if self.enabled else self.cap

    async def __aenter__(self) -> "AdaptiveConcurrency":
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            while True:
                pause = self.paused_until - self._clock()
                if pause > 0:
                    try:
                        await asyncio.wait_for(self._cond.wait(), pause)
                    except asyncio.TimeoutError:
                        pass
                    continue
                if self.inflight < self.limit:
                    break
                await self._cond.wait()
            self.inflight += 1
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._cond is not None
        async with self._cond:
            self.inflight -= 1
            self._cond.notify_all()

    def observe(self, status: Optional[int], headers: Mapping[str, str], retry_after: Optional[float] = None) -> None:
        """Adapt to one response (call it for every response, successful or not)."""
        if not self.enabled:
            return
        limits = parse_rate_limit_headers(headers) if headers else ProviderLimits()
        now = self._clock()
        if status == 429:
            self.throttled += 1
            self.width = max(1.0, self.width / 2)
            wait = retry_after if retry_after is not None else limits.exhausted_for_s()
            self.paused_until = max(self.paused_until, now + (wait or 0.0))
        elif limits.known and limits.exhausted_for_s() > 0:
            self.width = max(1.0, self.width - 1)
            self.paused_until = max(self.paused_until, now + limits.exhausted_for_s())
        elif limits.headroom() is not None and limits.headroom() < self.LOW_HEADROOM:
            self.width = max(1.0, self.width - 1)
        elif status is not None and 200 <= status < 300:
            self.width = min(float(self.cap), self.width + 1.0 / self.width)
        self.min_width_seen = min(self.min_width_seen, self.limit)
