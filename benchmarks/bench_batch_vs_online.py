"""Online vs Batch API teacher: wall time and cost of the same ``generate`` job on the same stub.

    python -m benchmarks.bench_batch_vs_online [--quick] [--latency 1.0 --turnaround 20 --requests 400]

The stub answers online chat requests after ``--latency`` seconds (a hosted model's typical time
for a short decomposition) and finishes a batch ``--turnaround`` seconds after it was created
(providers promise 24 h and usually take minutes; the figure scales with whatever turnaround you
assume). Both runs use the same prepared questions, teacher model name (gpt-4o-mini, priced from
the shipped table), actors and sampling; the online run has ``concurrency`` requests in flight per
actor. Figures: wall time of each job (Ray already started), split by the stub's clock into start-up (to
the first request), active (first request to last answer; the online ideal is
``requests / (actors * concurrency) * latency``, the batch one the turnaround, so the batch excess
is the machinery's own overhead: upload, polling, download); the rest is commits and the manifest, and the cost of each from its
manifest's ledger; ratios are batch / online in the same process.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

NAME = "bench_batch_vs_online"


def _argv(prepared: str, out: str, base_url: str, teacher_extra: str, *, requests: int, actors: int) -> list[str]:
    n = 2
    questions = requests // n
    return ["--config", os.path.join(common.REPO, "configs", "generate.yaml"), f"input.path={prepared}",
            "input.datasets=[gsm8k]", "input.splits=[train]", f"input.limit={questions}", f"output.dir={out}",
            "output.overwrite=true", f"output.shard_size={-(-requests // actors)}", f"sampling.n={n}",
            "sampling.max_tokens=64", f"pool.min_actors={actors}", f"pool.max_actors={actors}", "pool.num_cpus=0.5",
            "pool.batch_size=64",
            "teacher={type: openai, model: gpt-4o-mini, base_url: '" + base_url + "', api_key_env: null, " + teacher_extra + "}"]


def _phases(srv: Any, mode: str, start: float, wall: float, latency: float) -> dict[str, float]:
    """Start-up (job start -> first request) and active time (first request -> last answer) of one run, from
    the stub's timestamps (taken in this process, so they lag a little when the machine is loaded)."""
    if mode == "online":
        first, last = min(srv.request_times), max(srv.request_times) + latency
    else:
        first, last = min(b["_created"] for b in srv.batches.values()), max(srv.file_download_times)
    return {"startup_s": round(first - start, 2), "active_s": round(last - first, 2)}


def run(args: Any) -> dict[str, Any]:
    from ray_jobs import generate
    from tests.servers.openai_stub import DECOMPOSITION_REPLY, OpenAIStubServer

    prepared = common.prepared_questions()
    results: dict[str, Any] = {}
    with OpenAIStubServer(latency_s=args.latency, responder=lambda m, b: DECOMPOSITION_REPLY) as srv:
        srv.batch_latency_s = args.turnaround
        for mode, extra in (("online", f"concurrency: {args.concurrency}, timeout_s: 60"),
                            ("batch", f"mode: batch, batch: {{poll_interval_s: {args.poll}}}")):
            out = common.scratch(f"{NAME}-{mode}")
            srv.reset_counters()
            srv.file_download_times.clear()
            start = time.monotonic()
            wall, manifest = common.run_job(generate.main, _argv(prepared, out, srv.base_url, extra,
                                                                 requests=args.requests, actors=args.actors), out)
            cost = manifest["usage"]["cost"]
            results[mode] = {"wall_s": round(wall, 2), "rows": manifest["counts"]["rows_out"],
                             "cost_usd": cost["total_cost"], "prompt_tokens": manifest["usage"]["prompt_tokens"],
                             "completion_tokens": manifest["usage"]["completion_tokens"],
                             "online_requests_seen": srv.counters()["requests"], "batches": len(srv.batches),
                             **_phases(srv, mode, start, wall, args.latency)}
            srv.batches.clear()
    on, ba = results["online"], results["batch"]
    results["online_ideal_active_s"] = round(args.requests / (args.actors * args.concurrency) * args.latency, 2)
    results["batch_overhead_s"] = round(ba["active_s"] - args.turnaround, 2)  # upload, polling, download
    results["wall_ratio_batch_over_online"] = round(ba["wall_s"] / on["wall_s"], 3)
    results["cost_ratio_batch_over_online"] = round(ba["cost_usd"] / on["cost_usd"], 4) if on["cost_usd"] else None
    return results


def main(argv: Optional[list[str]] = None) -> int:
    p = common.base_parser(__doc__)
    p.add_argument("--latency", type=float, default=1.0, help="online seconds per request")
    p.add_argument("--turnaround", type=float, default=20.0, help="seconds from batch creation to completion")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--poll", type=float, default=1.0, help="batch poll interval (s)")
    args = p.parse_args(argv)
    if args.quick:
        args.latency, args.turnaround, args.requests = 0.5, 5.0, 100
    rep = common.Report(NAME, args, "Teacher cost: online vs Batch API on the same stub")
    common.start_local_ray(2)
    try:
        r = run(args)
    finally:
        common.shutdown_ray()
    rows = [(mode, r[mode]["rows"], r[mode]["wall_s"], r[mode]["startup_s"], r[mode]["active_s"],
             r[mode]["cost_usd"], r[mode]["online_requests_seen"], r[mode]["batches"]) for mode in ("online", "batch")]
    table = common.md_table(["mode", "rows", "wall s", "start-up s", "active s",
                             "cost USD (gpt-4o-mini table price)", "online requests", "batches"], rows)
    table += (f"\n\nbatch / online: wall time x{r['wall_ratio_batch_over_online']}, cost x{r['cost_ratio_batch_over_online']}; "
              f"online active time vs its ideal {r['online_ideal_active_s']} s: "
              f"{r['online']['active_s']} s; batch active time beyond the {args.turnaround:g} s turnaround "
              f"(upload, polling, download): {r['batch_overhead_s']} s.")
    notes = (f"Online: {args.actors} actors x {args.concurrency} in flight, {args.latency:g} s per request. Batch: one batch "
             f"per shard ({args.actors} shards), provider turnaround {args.turnaround:g} s, polled every {args.poll:g} s. "
             "The batch job's wall time is the provider's turnaround plus the overhead; real turnarounds are minutes "
             "to hours, so batch mode is for offline work where the 50 % price matters more than latency.")
    rep.write(r, table, notes, params=vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
