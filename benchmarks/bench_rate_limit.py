"""Client-side pacing of the teacher client (``OpenAIBackend``): ``requests_per_minute`` and
``Retry-After`` against the OpenAI stub on loopback, in real time. (tests/test_openai_backend.py checks
the same logic exactly in virtual time; wall-clock figures belong here, not in tests.)

    python -m benchmarks.bench_rate_limit [--quick] [--rpm 1200 --requests 200]

Baseline in the same run: the same client, no limit. Figures: requests/s at the stub (steady state, after
the initial burst) vs the configured rate; the limiter's own recorded wait; the gap a ``Retry-After: 1``
response put between a 429 and its retry; how fast a client gives up on an endpoint that is down.
"""

from __future__ import annotations

import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, measure  # noqa: E402

NAME = "bench_rate_limit"


def backend(base_url: str, **kw):
    from pipeline.backends.openai_http import OpenAIBackend
    from pipeline.backends import OpenAIBackendConfig

    cfg = dict(base_url=base_url, model="stub", api_key_env=None, concurrency=32, timeout_s=10.0, max_retries=3,
               backoff_base_s=0.01, backoff_max_s=1.0)
    return OpenAIBackend(OpenAIBackendConfig(**{**cfg, **kw}))


def paced_run(srv, n: int, rpm) -> dict:
    from pipeline.backends.base import Request, SamplingParams

    srv.reset_counters()
    be = backend(srv.base_url, requests_per_minute=rpm)
    t0 = time.monotonic()
    out = be.generate([Request(messages=[{"role": "user", "content": f"q {i}"}]) for i in range(n)], SamplingParams())
    wall = time.monotonic() - t0
    stats = be.stats()
    be.close()
    times = list(srv.request_times)
    burst = max(1, int((rpm or 0) / 60))  # the bucket holds one second's worth
    steady = measure.steady_rate(times[burst:], 0.0, 1.0) if len(times) > burst + 10 else None
    return {"rpm": rpm, "requests": n, "errors": sum(c.error is not None for c in out), "wall_s": wall,
            "rows_per_s": n / wall, "steady_rate_per_s": steady, "target_per_s": rpm / 60 if rpm else None,
            "steady_vs_target": (steady / (rpm / 60)) if rpm and steady else None,
            "limiter_wait_s": stats["rate_limit_wait_s"]}


def retry_after_gap(srv) -> float:
    from pipeline.backends.base import Request, SamplingParams

    srv.reset_counters()
    srv.retry_after = 1
    srv.fail_next(429)
    be = backend(srv.base_url, backoff_max_s=1.0)
    be.generate([Request(messages=[{"role": "user", "content": "q"}])], SamplingParams())
    be.close()
    srv.retry_after = None
    return srv.request_times[1] - srv.request_times[0]


def give_up_time(srv) -> float:
    from pipeline.backends.base import BackendUnavailable, Request, SamplingParams

    be = backend(srv.base_url, max_retries=3, backoff_max_s=0.05)
    srv.stop()
    t0 = time.monotonic()
    try:
        be.generate([Request(messages=[{"role": "user", "content": "q"}]) for _ in range(3)], SamplingParams())
    except BackendUnavailable:
        pass
    took = time.monotonic() - t0
    be.close()
    srv.start()
    return took


def main(argv=None) -> int:
    ap = common.base_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--rpm", type=float, default=1200.0)
    ap.add_argument("--requests", type=int, default=None)
    args = ap.parse_args(argv)
    rep = common.Report(NAME, args, "Teacher client pacing: requests_per_minute, Retry-After, give-up time")
    from tests.servers.openai_stub import OpenAIStubServer

    n = args.requests or (80 if args.quick else 200)
    with OpenAIStubServer(latency_s=0.01) as srv:
        unlimited = paced_run(srv, n, None)
        paced = paced_run(srv, n, args.rpm)
        gap = retry_after_gap(srv)
        give_up = give_up_time(srv)
    fmt = common.fmt
    table = common.md_table(
        ["run", "requests", "target req/s", "steady req/s at stub", "steady ÷ target", "limiter wait (s)", "wall (s)"],
        [["no limit (baseline)", n, "—", fmt(unlimited["steady_rate_per_s"]), "—", fmt(unlimited["limiter_wait_s"]), fmt(unlimited["wall_s"])],
         [f"requests_per_minute={args.rpm:g}", n, fmt(paced["target_per_s"]), fmt(paced["steady_rate_per_s"]),
          fmt(paced["steady_vs_target"]), fmt(paced["limiter_wait_s"]), fmt(paced["wall_s"])]])
    notes = f"""Retry-After: 1 on a 429 put **{gap:.2f} s** between the 429 and its retry at the stub (the backend's own
backoff for that attempt is at most 10 ms). An endpoint that is down (connection refused), 3 requests, max_retries 3:
the client gave up after **{give_up:.2f} s**. Steady rate = arrivals at the stub after the first second's burst.
The baseline shows how far the unlimited client is above the target, so the ratio measures the limiter, not the stub."""
    rep.write({"unlimited": unlimited, "paced": paced, "retry_after_gap_s": gap, "give_up_s": give_up}, table, notes,
              params={"rpm": args.rpm, "requests": n, "stub_latency_s": 0.01})
    return 0


if __name__ == "__main__":
    sys.exit(main())
