"""Job-wide rate limits: one small Ray actor holds the buckets that every actor of a job draws from.

A config's ``requests_per_minute`` / ``tokens_per_minute`` is the limit of the whole job, however
many actors the pool runs (and however it scales). Each backend running inside a Ray actor asks a
named limiter actor for a *reservation*: the limiter takes the request (and its estimated tokens)
from its buckets at once, letting the level go negative, and answers how many seconds the caller
may send, as a wall-clock time (so the time the answer spends travelling back does not shift the
send). Reservations are handed out in call order, so the sends of all actors together are spaced
at the configured rate (plus a burst of ``burst_s`` seconds of it), and a caller waits on its own
side, so the limiter never blocks. (Across nodes, clock skew only shifts a node's sends by the
skew; NTP keeps that to milliseconds.)

The limiter is a named actor in the job's namespace, created by the first backend that needs it
(``get_if_exists``) and fate-shared with it; if it dies (its owner went away), the next caller
creates a new one. A backend outside any Ray actor (one process) keeps the local
:class:`~pipeline.backends.rate_limit.AsyncRateLimiter`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any, Optional

from pipeline.backends.rate_limit import AsyncRateLimiter

log = logging.getLogger(__name__)


class ReservationBuckets:
    """Token buckets that grant reservations (the level may go negative) instead of blocking."""

    def __init__(self, requests_per_minute: Optional[float], tokens_per_minute: Optional[float], burst_s: float = 1.0,
                 clock=time.monotonic) -> None:
        self._clock = clock
        now = clock()
        self._buckets: dict[str, list[float]] = {}  # name -> [rate/s, capacity, level, updated]
        for name, per_minute in (("requests", requests_per_minute), ("tokens", tokens_per_minute)):
            if per_minute:
                rate = per_minute / 60.0
                cap = max(1.0, rate * burst_s)
                self._buckets[name] = [rate, cap, cap, now]
        self.granted = 0

    def _refill(self, now: float) -> None:
        for b in self._buckets.values():
            b[2] = min(b[1], b[2] + (now - b[3]) * b[0])
            b[3] = now

    def reserve(self, tokens: float = 0.0) -> float:
        """Take one request and ``tokens`` tokens; seconds until the caller may send."""
        now = self._clock()
        self._refill(now)
        delay = 0.0
        for name, amount in (("requests", 1.0), ("tokens", float(tokens))):
            b = self._buckets.get(name)
            if b is None:
                continue
            b[2] -= amount
            if b[2] < 0:
                delay = max(delay, -b[2] / b[0])
        self.granted += 1
        return delay

    def refund(self, tokens: float) -> None:
        b = self._buckets.get("tokens")
        if b is not None and tokens:
            self._refill(self._clock())
            b[2] = min(b[1], b[2] + tokens)


def limiter_name(base_url: str, model: str, rpm: Optional[float], tpm: Optional[float], burst_s: float) -> str:
    key = f"{base_url}|{model}|{rpm}|{tpm}|{burst_s}"
    return "divconq-ratelimit-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def in_ray_actor() -> bool:
    """True inside a Ray actor process (where several copies of a backend may run at once)."""
    try:
        import ray  # lazy: ~1 s to import; the CLI imports the backends to validate a config

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # pragma: no cover - Ray missing or not usable here
        return False


def _actor_class():
    import ray  # lazy: ~1 s to import; the CLI imports the backends to validate a config

    @ray.remote(num_cpus=0, max_restarts=0)
    class RateLimiterActor:
        def __init__(self, rpm: Optional[float], tpm: Optional[float], burst_s: float) -> None:
            self.buckets = ReservationBuckets(rpm, tpm, burst_s)

        def reserve_many(self, tokens: list[float]) -> list[float]:
            """Wall-clock times at which the caller may send each of its requests, in order."""
            now = time.time()
            return [now + self.buckets.reserve(t) for t in tokens]

        def refund(self, tokens: float) -> None:
            self.buckets.refund(tokens)

        def granted(self) -> int:
            return self.buckets.granted

    return RateLimiterActor


class ClusterRateLimiter:
    """Drop-in for :class:`~pipeline.backends.rate_limit.AsyncRateLimiter` backed by the job's limiter actor."""

    def __init__(self, name: str, rpm: Optional[float], tpm: Optional[float], burst_s: float) -> None:
        self.name = name
        self._args = (rpm, tpm, burst_s)
        self._handle: Any = None
        self.total_wait_s = 0.0
        self.enabled = bool(rpm or tpm)
        # Waiters of this process go to the limiter together, one call at a time: on a busy machine a call
        # per request would make the limiter actor itself the bottleneck.
        self._pending: list[tuple[float, asyncio.Future]] = []
        self._pump: Optional[asyncio.Future] = None

    def _actor(self, fresh: bool = False) -> Any:
        if self._handle is None or fresh:
            self._handle = _actor_class().options(name=self.name, get_if_exists=True, lifetime=None).remote(*self._args)
        return self._handle

    async def _reserve(self, tokens: list[float]) -> list[float]:
        import ray  # lazy: ~1 s to import; the CLI imports the backends to validate a config

        try:
            return await asyncio.wrap_future(self._actor().reserve_many.remote(tokens).future())
        except ray.exceptions.RayActorError:  # its owner went away: the next caller makes a new one
            log.info("rate limiter %s is gone; starting a new one", self.name)
            return await asyncio.wrap_future(self._actor(fresh=True).reserve_many.remote(tokens).future())

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                times = await self._reserve([t for t, _ in batch])
            except Exception as e:  # hand the failure to every waiter of this call
                for _, fut in batch:
                    fut.set_exception(e)
                continue
            for (_, fut), send_at in zip(batch, times):
                fut.set_result(send_at)

    async def acquire(self, tokens: int = 0) -> float:
        if not self.enabled:
            return 0.0
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((float(tokens), fut))
        if self._pump is None or self._pump.done():
            self._pump = asyncio.ensure_future(self._drain())
        send_at = await fut
        delay = send_at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
            self.total_wait_s += delay
        return delay

    def refund(self, tokens: int) -> None:
        if self.enabled and tokens and self._handle is not None:
            self._handle.refund.remote(tokens)  # fire and forget: a lost refund only makes us slower


def make_rate_limiter(config: Any):
    """The limiter a backend with ``config`` (an OpenAIBackendConfig) should use in this process."""
    c = config
    if c.rate_limit_scope == "job" and (c.requests_per_minute or c.tokens_per_minute) and in_ray_actor():
        name = limiter_name(c.base_url, c.model, c.requests_per_minute, c.tokens_per_minute, c.rate_limit_burst_s)
        return ClusterRateLimiter(name, c.requests_per_minute, c.tokens_per_minute, c.rate_limit_burst_s)
    return AsyncRateLimiter(c.requests_per_minute, c.tokens_per_minute, burst_s=c.rate_limit_burst_s)
