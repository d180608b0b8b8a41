"""OpenAIBackend against a real local OpenAI-compatible server that misbehaves on demand."""

from __future__ import annotations

import asyncio
import logging
import math
import pickle
import re
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # the project may not be pip-installed: make `pipeline` / `tests` importable
    sys.path.insert(0, str(_ROOT))

from pipeline.backends.base import BackendUnavailable, Request, SamplingParams
from pipeline.backends.openai_http import OpenAIBackend, parse_retry_after
from pipeline.backends.rate_limit import AsyncRateLimiter
from pipeline.backends import OpenAIBackendConfig
from tests.servers.openai_stub import DECOMPOSITION_REPLY, SOLUTION_REPLY, OpenAIStubServer, StubHTTPError

KEY_VAR = "DIVCONQ_TEST_TEACHER_KEY"
SECRET = "sk-test-SUPERSECRET-0123456789abcdef"


def make_backend(srv: OpenAIStubServer, **kw) -> OpenAIBackend:
    cfg = dict(base_url=srv.base_url, model="teacher-x", api_key_env=KEY_VAR, concurrency=8,
               timeout_s=2.0, max_retries=8, backoff_base_s=0.01, backoff_max_s=0.05)
    cfg.update(kw)
    return OpenAIBackend(OpenAIBackendConfig(**cfg))


def reqs(n: int, text: str = "Q: 1+1? Answer the subquestions.") -> list[Request]:
    return [Request(messages=[{"role": "user", "content": f"{text} #{i}"}]) for i in range(n)]


@pytest.fixture
def server():
    with OpenAIStubServer(seed=1) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_VAR, SECRET)


# ---------------------------------------------------------------- happy path + protocol
def test_basic_and_body_fields(server):
    be = make_backend(server, extra_body={"logprobs": False})
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=64, seed=7, stop=("\n\n",))
    rs = [Request(messages=[{"role": "user", "content": "Split into subquestions: x"}], sample_index=i) for i in range(3)]
    rs.append(Request(messages=[{"role": "user", "content": "Solve it"}]))
    out = be.generate(rs, params)
    assert [c.text for c in out] == [DECOMPOSITION_REPLY] * 3 + [SOLUTION_REPLY]
    assert all(c.error is None and c.finish_reason == "stop" and c.latency_s > 0 for c in out)
    assert out[0].prompt_tokens == 4 and out[0].completion_tokens == len(DECOMPOSITION_REPLY.split())
    bodies = sorted(server.requests, key=lambda b: b["seed"])
    assert [b["seed"] for b in bodies] == [7, 7, 8, 9]  # seed + sample_index
    b = bodies[-1]
    assert b["model"] == "teacher-x" and b["temperature"] == 0.7 and b["top_p"] == 0.9
    assert b["max_tokens"] == 64 and b["stop"] == ["\n\n"] and b["logprobs"] is False
    assert set(server.auth_headers) == {f"Bearer {SECRET}"}
    # stop omitted when empty; the loop is reused across calls
    out2 = be.generate(reqs(2), SamplingParams())
    assert all(c.text == DECOMPOSITION_REPLY for c in out2)
    assert "stop" not in server.requests[-1]
    assert be.generate([], SamplingParams()) == []
    s = be.stats()
    assert s["requests"] == 6 and s["retries"] == 0 and s["by_status"] == {"200": 6}
    be.close()
    be.close()  # idempotent
    assert be.generate(reqs(1), SamplingParams())[0].text == DECOMPOSITION_REPLY  # usable after close
    be.close()


def test_picklable_and_from_running_loop(server):
    be = make_backend(server)
    be.generate(reqs(1), SamplingParams())
    clone = pickle.loads(pickle.dumps(be))  # drops loop, client and key; rebuilt lazily
    assert SECRET.encode() not in pickle.dumps(be)
    assert clone.generate(reqs(1), SamplingParams())[0].text == DECOMPOSITION_REPLY

    async def inside_loop():
        return clone.generate(reqs(2), SamplingParams())

    assert [c.text for c in asyncio.run(inside_loop())] == [DECOMPOSITION_REPLY] * 2
    be.close()
    clone.close()


# ---------------------------------------------------------------- flaky server
def test_all_correct_through_flaky_server(server):
    server.fail_rate_429 = 0.1
    server.fail_rate_500 = 0.1
    server.garbage_rate = 0.1
    server.slow_rate = 0.05
    server.slow_s = 1.0
    be = make_backend(server, timeout_s=0.4, max_retries=12, concurrency=16)
    out = be.generate(reqs(60), SamplingParams())
    assert all(c.error is None for c in out), [c.error for c in out if c.error]
    assert [c.text for c in out] == [DECOMPOSITION_REPLY] * 60
    seen = server.counters()
    assert seen["by_status"].get(429, 0) > 0 and seen["by_status"].get(500, 0) > 0 and seen["garbage"] > 0
    s = be.stats()
    assert s["retries"] >= seen["by_status"][429] + seen["by_status"][500] + seen["garbage"]
    assert s["requests"] == s["retries"] + 60 and s["completions"] == 60
    be.close()


def _scheduled_retry_delays(caplog) -> list[float]:
    """The delays the backend chose before each retry (its debug line), not the time it happened to take."""
    return [float(m) for m in re.findall(r"retry \d+/\d+ in ([0-9.]+)s", caplog.text)]


def test_retry_after_honoured(server, caplog):
    server.retry_after = 1
    server.fail_next(429)
    be = make_backend(server, backoff_max_s=1.0)  # own backoff for attempt 0 is at most backoff_base_s (0.01)
    with caplog.at_level(logging.DEBUG, logger="pipeline.backends.openai_http"):
        out = be.generate(reqs(1), SamplingParams())
    assert out[0].error is None and out[0].text == DECOMPOSITION_REPLY
    assert _scheduled_retry_delays(caplog) == [1.0]
    assert be.stats()["retries"] == 1 and server.counters()["by_status"] == {429: 1, 200: 1}
    be.close()


def test_retry_after_capped_by_backoff_max(server, caplog):
    server.retry_after = 100
    server.fail_next(429)
    be = make_backend(server, backoff_max_s=0.1)
    with caplog.at_level(logging.DEBUG, logger="pipeline.backends.openai_http"):
        assert be.generate(reqs(1), SamplingParams())[0].error is None
    assert _scheduled_retry_delays(caplog) == [0.2]  # 2 * backoff_max_s, not the server's 100 s
    be.close()


def test_parse_retry_after():
    now = datetime(2024, 1, 1, tzinfo=timezone.utc)
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(format_datetime(now + timedelta(seconds=5), usegmt=True), now=now) == 5.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=5), usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None and parse_retry_after("") is None


def test_429_and_garbage_exhaustion_give_error_completions(server):
    be = make_backend(server, max_retries=2)
    server.fail_rate_429 = 1.0
    out = be.generate(reqs(2), SamplingParams())
    assert all(c.error and c.error.startswith("HTTP 429") for c in out)
    server.fail_rate_429 = 0.0
    server.fail_next("garbage_json", "garbage_json", "garbage_json")
    out = be.generate(reqs(1), SamplingParams())
    assert out[0].error and "malformed" in out[0].error
    s = be.stats()
    assert s["give_ups"] == 3 and s["errors"] == 3 and s["by_status"]["429"] == 6
    be.close()


# ---------------------------------------------------------------- concurrency + rate limit
def test_concurrency_overlaps(server):
    """The server holds every request until n are in flight at once: a client that does not overlap
    its requests never gets there (its first request is released only by the hold's deadline)."""
    n = 10
    server.hold_until_inflight = n
    be = make_backend(server, concurrency=n, timeout_s=60, max_retries=0)
    out = be.generate(reqs(n), SamplingParams())
    assert all(c.error is None for c in out), [c.error for c in out]
    assert server.counters()["max_inflight"] == n and server.counters()["requests"] == n
    be.close()


def test_concurrency_is_bounded(server):
    server.latency_s = 0.05
    be = make_backend(server, concurrency=3)
    assert all(c.error is None for c in be.generate(reqs(12), SamplingParams()))
    assert server.counters()["max_inflight"] <= 3
    be.close()


def test_backend_rate_limit_makes_requests_wait(server):
    """The backend goes through its limiter: at 60 requests/minute (a bucket of one) the second and third
    of three concurrent requests must wait for it. (The pacing itself is checked exactly, in virtual time,
    by the limiter tests below; throughput figures live in benchmarks/.)"""
    be = make_backend(server, concurrency=3, requests_per_minute=60)
    out = be.generate(reqs(3), SamplingParams())
    assert all(c.error is None for c in out)
    assert server.counters()["requests"] == 3 and be.stats()["retries"] == 0
    assert be.stats()["rate_limit_wait_s"] > 0  # the limiter, not the server, did the pacing
    be.close()


@pytest.fixture
def virtual_clock(monkeypatch):
    """Virtual time for AsyncRateLimiter: ``asyncio.sleep(d)`` advances the clock by ``d`` rounded up to
    the nanosecond (then yields), so waits are exact figures instead of whatever a busy machine's
    scheduler made of them. Whole nanoseconds, as a real clock ticks: a float clock advanced by exactly
    ``d`` can land a rounding error short of the bucket's level and never move on."""
    real_sleep = asyncio.sleep
    now_ns = [0]

    async def sleep(delay, result=None):
        now_ns[0] += max(0, math.ceil(delay * 1e9))
        return await real_sleep(0, result)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    return lambda: now_ns[0] / 1e9


def test_rate_limiter_requests(virtual_clock):
    async def run():
        lim = AsyncRateLimiter(1200, None, burst_s=0.05, clock=virtual_clock)  # 20/s, capacity 1
        waits = await asyncio.gather(*(lim.acquire(0) for _ in range(11)))
        return waits, virtual_clock(), lim.total_wait_s

    waits, elapsed, total = asyncio.run(run())
    assert elapsed == pytest.approx(0.5) and total == pytest.approx(0.5)  # 1 at once, then 10 at 20/s
    assert waits[0] == 0.0 and all(w == pytest.approx(0.05) for w in waits[1:]), waits


def test_rate_limiter_tokens_and_oversized_request(virtual_clock):
    async def run():
        lim = AsyncRateLimiter(None, 60000, burst_s=0.1, clock=virtual_clock)  # 1000 tokens/s, capacity 100
        await lim.acquire(100)  # immediate (full bucket)
        first = virtual_clock()
        await lim.acquire(250)  # bigger than the bucket: waits for a full bucket, goes into debt
        second = virtual_clock()
        await lim.acquire(50)  # must pay back the debt (150) + 50 -> 0.2 s more
        third = virtual_clock()
        lim.refund(10**6)  # refunds never overfill the bucket
        await lim.acquire(100)
        fourth = virtual_clock()
        await lim.acquire(1)  # ... so the bucket is empty again: 1 token = 1 ms
        fifth = virtual_clock()
        return first, second, third, fourth, fifth

    first, second, third, fourth, fifth = asyncio.run(run())
    assert first == 0.0
    assert second == pytest.approx(0.1)
    assert third - second == pytest.approx(0.2)
    assert fourth == third
    assert fifth - fourth == pytest.approx(0.001)


def test_rate_limiter_disabled_is_free():
    async def run():
        lim = AsyncRateLimiter(None, None)
        return [await lim.acquire(10**9) for _ in range(100)]

    assert asyncio.run(run()) == [0.0] * 100


# ---------------------------------------------------------------- non-retryable errors
def test_400_gives_error_completion_without_retry(server):
    server.max_prompt_tokens = 5
    be = make_backend(server)
    long = Request(messages=[{"role": "user", "content": "one two three four five six seven"}])
    out = be.generate([long] + reqs(1, "short"), SamplingParams())
    assert out[0].error.startswith("HTTP 400: ") and "maximum context length" in out[0].error
    assert out[1].error is None
    assert server.counters()["requests"] == 2  # no retry of the 400
    server.max_prompt_tokens = None
    server.fail_next(422, 404)
    out = be.generate(reqs(2), SamplingParams())
    assert sorted(c.error.split(":")[0] for c in out) == ["HTTP 404", "HTTP 422"]
    be.close()


def test_401_raises_backend_unavailable_without_key(server, monkeypatch, caplog):
    server.required_api_key = "the-right-key"
    be = make_backend(server, max_retries=5)
    with caplog.at_level(logging.DEBUG), pytest.raises(BackendUnavailable) as ei:
        be.generate(reqs(20), SamplingParams())
    msg = str(ei.value)
    assert KEY_VAR in msg and "401" in msg and SECRET not in msg
    assert SECRET not in caplog.text
    assert be.stats()["retries"] == 0
    assert server.counters()["requests"] <= 8 + 1  # the batch stops after the first 401s
    be.close()
    # no key set at all: warning names the variable, message says it is unset
    monkeypatch.delenv(KEY_VAR)
    be = make_backend(server)
    with pytest.raises(BackendUnavailable, match=f"{KEY_VAR} is not set"):
        be.generate(reqs(1), SamplingParams())
    be.close()


def test_missing_key_allowed_for_local_servers(server, monkeypatch, caplog):
    monkeypatch.delenv(KEY_VAR)
    be = make_backend(server, api_key_env="DIVCONQ_UNSET_VAR_FOR_TEST")
    with caplog.at_level(logging.WARNING):
        assert be.generate(reqs(1), SamplingParams())[0].error is None
    assert "DIVCONQ_UNSET_VAR_FOR_TEST" in caplog.text
    assert server.auth_headers == [None]
    be.close()


def test_key_never_leaks(server, caplog):
    def echo_key(messages, body):
        if "leak" in messages[-1]["content"]:
            raise StubHTTPError(400, f"bad request for key {SECRET}")
        if "fivehundred" in messages[-1]["content"]:
            raise StubHTTPError(500, f"internal error, key={SECRET}")
        return "fine"

    server.responder = echo_key
    be = make_backend(server, max_retries=1)
    assert SECRET not in repr(be) and SECRET not in str(be) and SECRET not in repr(vars(be))
    with caplog.at_level(logging.DEBUG):
        out = be.generate(reqs(1, "leak") + reqs(1, "ok"), SamplingParams())
        assert out[0].error.startswith("HTTP 400") and "***" in out[0].error
        assert out[1].text == "fine"
        for c in out:
            assert SECRET not in repr(c)
        with pytest.raises(BackendUnavailable) as ei:
            be.generate(reqs(1, "fivehundred"), SamplingParams())
    assert SECRET not in str(ei.value) and "HTTP 500" in str(ei.value)
    assert SECRET not in caplog.text
    assert SECRET not in repr(be) and SECRET not in repr(vars(be)) and SECRET not in repr(be.stats())
    be.close()


# ---------------------------------------------------------------- server down
def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def test_server_down_then_back_up(server):
    """The server comes back after 8 refused connection attempts (a condition, not a fixed time)."""
    be = make_backend(server, max_retries=1000, backoff_base_s=0.05, backoff_max_s=0.3)
    assert be.generate(reqs(1), SamplingParams())[0].error is None  # keep-alive connection open
    server.stop()
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(out=be.generate(reqs(4), SamplingParams())), daemon=True)
    worker.start()
    try:
        wait_for(lambda: be.stats()["by_status"].get("connection_error", 0) >= 8, 60, "8 refused connections")
    finally:
        server.start()
    worker.join(60)
    assert not worker.is_alive(), "generate did not finish after the server came back"
    assert all(c.error is None and c.text == DECOMPOSITION_REPLY for c in result["out"])
    s = be.stats()
    assert s["retries"] >= 8 and s["by_status"]["connection_error"] >= 8 and s["completions"] == 5
    assert server.counters()["requests"] == 5
    be.close()


def test_server_permanently_down(server):
    be = make_backend(server, max_retries=3)
    url = server.base_url
    server.stop()
    with pytest.raises(BackendUnavailable) as ei:
        be.generate(reqs(3), SamplingParams())
    msg = str(ei.value)
    assert url in msg and "unreachable after 3 retries" in msg and "Connect" in msg
    s = be.stats()  # each request gave up after exactly 1 + 3 attempts
    assert s["requests"] == 12 and s["retries"] == 9 and s["give_ups"] == 3
    be.close()


def test_timeouts_exhausted_raise(server):
    server.slow_rate = 1.0
    server.slow_s = 1.0
    be = make_backend(server, timeout_s=0.1, max_retries=1)
    with pytest.raises(BackendUnavailable, match="timed out"):
        be.generate(reqs(1), SamplingParams())
    be.close()


# ---------------------------------------------------------------- the stub itself
def test_stub_models_and_restart_same_port():
    import httpx

    with OpenAIStubServer(model="m1") as srv:
        port = srv.port
        assert httpx.get(f"{srv.base_url}/models").json()["data"][0]["id"] == "m1"
        srv.down = True
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{srv.base_url}/models")
        srv.down = False
        assert srv.port == port
        assert httpx.get(f"{srv.base_url}/models").status_code == 200
