"""Asyncio token-bucket limiter for requests/minute and tokens/minute.

Each limit is a bucket refilled continuously at ``rate / 60`` per second, holding at
most ``burst_s`` seconds' worth (at least one request / one token). ``acquire(tokens)``
waits until both buckets can pay, then takes one request and ``tokens`` tokens. A
request bigger than the token bucket is let through once the bucket is full and puts
it into debt, so long-run throughput still respects the limit. Waiters are served in
FIFO order. A limiter belongs to one event loop (the backend's).
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Optional


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
