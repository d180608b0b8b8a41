"""Local-model generation: the ``generate`` job's actor pool with a local Hugging Face teacher
(``HFBackend``) generating in batches of 8 and 16, versus one prompt at a time (batch size 1,
same job, same tiny model), plus a plain in-process loop with batch size 1 for reference.

    python -m benchmarks.bench_local_generation [--quick] [--hidden 128 --layers 4 --max-tokens 64]

Figures: generated tokens/s (completion tokens; end to end with Ray already up, and inside
the shards, i.e. without actor start-up and model loading) and the ratio to batch size 1.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

NAME = "bench_local_generation"


def run_job(prepared: str, model: str, out_dir: str, *, batch: int, questions: int, max_tokens: int, actors: int,
            shard_size: int) -> dict[str, Any]:
    from ray_jobs import generate

    argv = [
        "--config", os.path.join(common.REPO, "configs", "generate.yaml"),
        f"input.path={prepared}", "input.datasets=[gsm8k]", "input.splits=[train]", f"input.limit={questions}",
        f"output.dir={out_dir}", "output.overwrite=true", f"output.shard_size={shard_size}",
        f"teacher={{type: hf, model: '{model}', device: cpu, dtype: float32, batch_size: {batch}}}",
        "sampling.n=1", "sampling.temperature=0.0", f"sampling.max_tokens={max_tokens}", "method.decomposer_few_shot=false",
        f"pool.min_actors={actors}", f"pool.max_actors={actors}", "pool.num_cpus=1", f"pool.batch_size={shard_size}",
    ]
    wall, manifest = common.run_job(generate.main, argv, out_dir)
    shards = []
    for path in glob.glob(os.path.join(out_dir, "_done", "*.json")):
        with open(path) as f:
            shards.append(json.load(f))
    completion = sum(s.get("completion_tokens", 0) for s in shards)
    prompt = sum(s.get("prompt_tokens", 0) for s in shards)
    busy = sum(s["seconds"] for s in shards)
    rows = manifest["counts"]["rows_in"]
    return {"batch_size": batch, "actors": actors, "rows": rows, "completion_tokens": completion, "prompt_tokens": prompt,
            "wall_s": wall, "e2e_tokens_per_s": completion / wall, "e2e_rows_per_s": rows / wall,
            "shard_busy_s": busy, "in_shard_tokens_per_s": completion / busy * actors if busy else None,
            "in_shard_rows_per_s": rows / busy * actors if busy else None,
            "mean_completion_tokens": completion / max(rows, 1), "mean_prompt_tokens": prompt / max(rows, 1)}


def run_plain_loop(prepared: str, model: str, n: int, max_tokens: int) -> dict[str, Any]:
    """Reference: HFBackend in this process, one prompt per generate call, 1 torch thread."""
    import torch

    from pipeline import tables
    from pipeline.backends import Request, SamplingParams
    from pipeline.backends.hf_local import HFBackend
    from pipeline.prompts import decomposer_messages

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = [r for r in tables.iter_rows(prepared) if r["split"] == "train"][:n]
        backend = HFBackend(model, device="cpu", dtype="float32", batch_size=1)
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        backend.generate([Request(messages=decomposer_messages(rows[0], few_shot=False), row=rows[0])], params)  # warm-up
        t0 = time.perf_counter()
        toks = 0
        for r in rows:
            out = backend.generate([Request(messages=decomposer_messages(r, few_shot=False), row=r)], params)
            toks += out[0].completion_tokens
        wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(old)
    return {"rows": n, "completion_tokens": toks, "wall_s": wall, "tokens_per_s": toks / wall, "rows_per_s": n / wall}


def main(argv: Optional[list[str]] = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--actors", type=int, default=2)
    args = p.parse_args(argv)
    rep = common.Report(NAME, args, "Local HF generation: batched generate in the actor pool vs one prompt at a time")
    quick = rep.quick
    questions = 64 if quick else 256
    shard_size = 16
    batches = [1, 8, 16]
    plain_n = 8 if quick else 32

    import ray

    prepared = common.prepared_questions()
    model = common.tiny_model(hidden=args.hidden, layers=args.layers)
    from transformers import AutoConfig

    mcfg = AutoConfig.from_pretrained(model)
    common.shutdown_ray()
    plain = run_plain_loop(prepared, model, plain_n, args.max_tokens)
    print(f"plain loop, batch 1: {plain['tokens_per_s']:.0f} tokens/s", flush=True)
    ray_start = common.start_local_ray(max(2, args.actors))
    runs = []
    try:
        for b in batches:
            res = run_job(prepared, model, common.scratch(f"local_generation/b{b}"), batch=b, questions=questions,
                          max_tokens=args.max_tokens, actors=args.actors, shard_size=shard_size)
            runs.append(res)
            print(f"job, batch {b}: {res['in_shard_tokens_per_s']:.0f} tokens/s in shards, {res['e2e_tokens_per_s']:.0f} end to end",
                  flush=True)
    finally:
        ray.shutdown()

    base = next(r for r in runs if r["batch_size"] == 1)
    rows = [["plain loop in one process (1 thread), batch 1", 1, plain["rows"], plain["completion_tokens"], None,
             plain["tokens_per_s"], None, None]]
    for r in runs:
        rows.append([f"generate job, {args.actors} actors, HFBackend batch {r['batch_size']}", r["batch_size"], r["rows"],
                     r["completion_tokens"], r["e2e_tokens_per_s"], r["in_shard_tokens_per_s"],
                     r["in_shard_tokens_per_s"] / base["in_shard_tokens_per_s"], r["e2e_tokens_per_s"] / base["e2e_tokens_per_s"]])
    table = common.md_table(["system", "batch", "prompts", "generated tokens", "tokens/s end to end",
                             "tokens/s in shards", "× batch 1 (in shards)", "× batch 1 (end to end)"], rows)
    best = max(runs, key=lambda r: r["in_shard_tokens_per_s"])
    notes = f"""
Model: `build_tiny_model` Llama, hidden {args.hidden}, {args.layers} layers, vocab {mcfg.vocab_size}, random weights (greedy
decoding, so every configuration generates essentially the same tokens; a random model rarely emits EOS, so most prompts
run to max_tokens = {args.max_tokens}). Prompts: the decomposer's zero-shot prompt for {questions} GSM8K questions
(≈{base['mean_prompt_tokens']:.0f} prompt tokens each). The job: `ray_jobs.generate.main` with `teacher={{type: hf, batch_size: B}}`,
{args.actors} actors × 1 CPU (Ray sets each actor's torch to 1 thread), shards of {shard_size} rows, one `generate` call per shard
which `HFBackend` splits into chunks of B prompts (left-padded). Local Ray was started once ({ray_start:.1f} s, not in any figure).

*tokens/s in shards* = generated tokens / time inside `run_shard` (summed over shards, × actors): the steady-state rate without
actor start-up and model loading. *end to end* = the whole job with Ray up (staging, actor start and model load, shards,
manifest). Batching wins because a decode step of a model this small is dominated by per-step Python and kernel-launch
overhead, which a batch of B prompts pays once instead of B times; the best here is batch {best['batch_size']}
at {best['in_shard_tokens_per_s'] / base['in_shard_tokens_per_s']:.1f}× batch 1. Larger models on CPU become matmul-bound sooner and gain less;
on a GPU, where a batch-1 decode step leaves the device mostly idle, the gain is typically much larger. Padding waste (prompts of different lengths, rows that stop early) is counted against batching:
only real generated tokens count. The prefill of the prompts (≈{base['mean_prompt_tokens']:.0f} tokens each) is already a matrix-sized
computation per prompt, so it gains little from batching; it is part of every figure (as it is of every real request), which
is why the gain is smaller at short max_tokens and grows with longer generations. On this CPU, with 1 thread per actor, a
batched decode step also costs more than a batch-1 step (attention over left-padded rows with an explicit mask, larger
matmuls), so batch 8 and 16 end up close.
"""
    rep.write({"plain_loop_batch1": plain, "job_runs": runs, "ray_start_s": ray_start,
               "model": {"hidden": args.hidden, "layers": args.layers, "vocab": mcfg.vocab_size}},
              table, notes, params={"questions": questions, "max_tokens": args.max_tokens, "actors": args.actors,
                                    "shard_size": shard_size, "batch_sizes": batches, "plain_loop_prompts": plain_n,
                                    "few_shot": False, "temperature": 0.0})
    return 0


if __name__ == "__main__":
    sys.exit(main())
