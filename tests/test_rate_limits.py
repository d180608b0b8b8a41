"""Provider-driven rate limits (x-ratelimit-* headers, 429 + Retry-After) and job-wide limits shared by
every actor, against real local servers and a real local Ray."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import pytest

from pipeline import storage, tables
from pipeline.backends.base import Request, SamplingParams
from pipeline.backends.openai_http import OpenAIBackend
from pipeline.backends.rate_limit import parse_rate_limit_headers, parse_reset
from pipeline.backends import OpenAIBackendConfig
from pipeline.config import ActorPoolConfig
from pipeline.sharded import _actor_pool_strategy
from ray_jobs import generate
from tests.conftest import REPO
from tests.servers.openai_stub import OpenAIStubServer

CONFIG = os.path.join(REPO, "configs", "generate.yaml")


def make_backend(srv, **kw) -> OpenAIBackend:
    cfg = dict(base_url=srv.base_url, model="m", api_key_env=None, concurrency=8, timeout_s=5.0, max_retries=20,
               backoff_base_s=0.01, backoff_max_s=2.0)
    cfg.update(kw)
    return OpenAIBackend(OpenAIBackendConfig(**cfg))


def reqs(n: int) -> list[Request]:
    return [Request(messages=[{"role": "user", "content": f"subquestions of {i}"}]) for i in range(n)]


def test_parse_reset_and_headers():
    now = datetime(2025, 1, 1, tzinfo=timezone.utc)
    assert parse_reset("1s") == 1.0 and parse_reset("6m0s") == 360.0 and parse_reset("20ms") == 0.02
    assert parse_reset("1h2m3.5s") == 3723.5 and parse_reset("0.25") == 0.25
    assert parse_reset((now + timedelta(seconds=30)).isoformat().replace("+00:00", "Z"), now=now) == 30.0
    assert parse_reset("soon") is None and parse_reset(None) is None and parse_reset("5x") is None
    openai = parse_rate_limit_headers({"X-RateLimit-Limit-Requests": "500", "x-ratelimit-remaining-requests": "0",
                                       "x-ratelimit-reset-requests": "120ms", "x-ratelimit-limit-tokens": "30000",
                                       "x-ratelimit-remaining-tokens": "29000", "x-ratelimit-reset-tokens": "2s"})
    assert (openai.limit_requests, openai.remaining_requests, openai.reset_requests_s) == (500, 0, 0.12)
    assert openai.exhausted_for_s() == 0.12 and openai.headroom() == 0.0
    anthropic = parse_rate_limit_headers({"anthropic-ratelimit-requests-limit": "50",
                                          "anthropic-ratelimit-requests-remaining": "25",
                                          "anthropic-ratelimit-requests-reset": "2999-01-01T00:00:00Z"})
    assert anthropic.headroom() == 0.5 and anthropic.exhausted_for_s() == 0.0 and anthropic.reset_requests_s > 0
    assert not parse_rate_limit_headers({}).known


def test_remaining_zero_pauses_until_reset_instead_of_hitting_429():
    with OpenAIStubServer() as srv:
        srv.rpm_limit, srv.rate_window_s = 4, 0.5  # 4 requests per half second
        be = make_backend(srv, concurrency=1)
        out = be.generate(reqs(10), SamplingParams())
        assert all(c.error is None for c in out)
        assert srv.counters()["by_status"] == {200: 10}  # the headers said "0 left": it waited for the reset
        be.close()
        # the same traffic without reading the headers runs into the provider's limit
        srv.reset_counters()
        srv._window.clear()
        blind = make_backend(srv, concurrency=1, adaptive_concurrency=False)
        assert all(c.error is None for c in blind.generate(reqs(10), SamplingParams()))
        assert srv.counters()["by_status"].get(429, 0) > 0
        blind.close()


def test_429s_shrink_in_flight_requests_and_headroom_grows_them_back():
    with OpenAIStubServer(latency_s=0.02) as srv:
        srv.rpm_limit, srv.rate_window_s = 10, 0.5
        be = make_backend(srv, concurrency=16)
        out = be.generate(reqs(40), SamplingParams())
        assert all(c.error is None for c in out)
        s = be.stats()
        assert s["throttled"] > 0 and s["min_concurrency"] < 16  # it backed off
        narrowed = s["concurrency"]
        srv.rpm_limit = None  # headroom returns (no limit, no headers)
        assert all(c.error is None for c in be.generate(reqs(60), SamplingParams()))
        assert be.stats()["concurrency"] > narrowed and be.stats()["concurrency"] <= 16
        be.close()


# ---------------------------------------------------------------- job-wide limits across actors
LIMIT_PER_S = 20.0
BURST_S = 0.25


def _shard_of_request(out: str) -> dict[str, str]:
    """question text -> shard name, from the staged request shards."""
    mapping = {}
    for path in storage.list_files(os.path.join(out, "_requests"), ".parquet"):
        for row in tables.read_rows(path):
            mapping[row["question"]] = os.path.basename(path).split(".")[0]
    return mapping


def _steady_rate(times: list[float]) -> float:
    """Requests per second over the steady window, from server-side arrival times: from the arrival of the
    first 15 % of the requests (past the initial burst of a full bucket and the actors' start-up, when a
    loaded machine releases late sends in clumps) to the last arrival."""
    times = sorted(times)[int(0.15 * len(times)):]
    return (len(times) - 1) / (times[-1] - times[0])


@pytest.mark.slow
@pytest.mark.parametrize("actors,rows,shard_size", [(1, 100, 100), (4, 200, 50)])
def test_job_request_rate_stays_at_the_configured_limit(ray_session, prepared_samples, tmp_path, actors, rows, shard_size):
    out = str(tmp_path / "gen")
    with OpenAIStubServer(latency_s=0.02) as srv:
        teacher = ("teacher={type: openai, model: stub, base_url: '" + srv.base_url + "', api_key_env: null, concurrency: 16, "
                   f"requests_per_minute: {LIMIT_PER_S * 60:g}, rate_limit_burst_s: {BURST_S}}}")
        assert generate.main(["--config", CONFIG, f"input.path={prepared_samples}", f"output.dir={out}", f"input.limit={rows}",
                              "sampling.n=1", f"output.shard_size={shard_size}", f"pool.batch_size={shard_size}",
                              f"pool.min_actors={actors}", f"pool.max_actors={actors}", "pool.num_cpus=0.25", teacher]) == 0
        log = list(srv.request_log)
    assert len(log) == rows
    rate = _steady_rate([t for t, _ in log])
    assert abs(rate - LIMIT_PER_S) <= 0.05 * LIMIT_PER_S, f"{rate:.2f} req/s with {actors} actor(s), limit {LIMIT_PER_S}"
    if actors > 1:  # several actors really drew from the one limit at the same time
        shard_of = _shard_of_request(out)
        spans: dict[str, list[float]] = {}
        for t, body in log:
            shard = next(s for q, s in shard_of.items() if q in body["messages"][-1]["content"])
            spans.setdefault(shard, []).append(t)
        overlap = [min(max(a), max(b)) - max(min(a), min(b)) for i, a in enumerate(spans.values())
                   for b in list(spans.values())[i + 1:]]
        assert max(overlap) > 1.0, spans.keys()


def test_a_fixed_pool_takes_one_shard_per_actor_at_a_time():
    """The 4-actor run above once got 18.8 req/s: Ray Data queued its 4th shard behind another on one of the 3
    actors then up, so the limiter went unasked between the two. A fixed pool of several actors takes one shard
    per actor; one actor, or an autoscaling pool (which scales up on queued tasks), keeps Ray Data's default."""
    in_flight = lambda lo, hi: _actor_pool_strategy(ActorPoolConfig(min_actors=lo, max_actors=hi)).max_tasks_in_flight_per_actor
    assert in_flight(4, 4) == 1 and in_flight(1, 1) is None and in_flight(1, 4) is None
