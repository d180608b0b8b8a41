"""Training throughput: the ``train`` job (Ray Train ``TorchTrainer`` + DeepSpeed ZeRO-2, fp32,
CPU) with 1 and 2 workers, versus a plain single-process PyTorch loop on the same tiny
model, data, batch plan, steps, micro-batch and AdamW.

    python -m benchmarks.bench_training [--quick] [--hidden 128 --layers 4 --steps 60]

Figures: trained tokens/s (non-padding tokens), the overhead ratio (plain loop / job), and
achieved FLOP/s = 6 * params * tokens/s against this machine's fp32 matmul GFLOP/s measured
in the same run (torch, 1024x1024, 1 thread and all threads).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, measure  # noqa: E402

NAME = "bench_training"


def write_sft_data(prepared: str, out_dir: str) -> str:
    """S_D-style SFT rows from the GSM8K sample: the decomposer's zero-shot prompt + the gold
    socratic subquestions as the assistant target (what ``select`` writes, without a teacher run)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import tables
    from pipeline.backends.reference import gold_pairs
    from pipeline.parsing import format_subquestions
    from pipeline.prompts import decomposer_messages

    rows = []
    for r in tables.iter_rows(prepared):
        if r["split"] != "train":
            continue
        subqs, _ = gold_pairs(r)
        rows.append({"id": r["id"], "messages": decomposer_messages(r, few_shot=False)
                     + [{"role": "assistant", "content": format_subquestions(subqs)}]})
    msg = pa.list_(pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())]))
    table = pa.Table.from_pylist(rows, schema=pa.schema([pa.field("id", pa.string()), pa.field("messages", msg)]))
    os.makedirs(out_dir, exist_ok=True)
    pq.write_table(table, os.path.join(out_dir, "part-0.parquet"))
    return out_dir


def plain_loop(model_dir: str, data_dir: str, *, steps: int, mbs: int, max_length: int, lr: float, threads: int,
               seed: int = 0) -> dict[str, Any]:
    """The same work as one DeepSpeed worker, in plain PyTorch: same tokenization, batch plan
    (group_by_length, seeded), micro-batch, AdamW, gradient clipping 1.0, fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training import sft_data

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        t_setup = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(model_dir)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        data = sft_data.tokenize_rows(tok, sft_data.read_conversations(data_dir), max_length)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.config.use_cache = False
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        setup_s = time.perf_counter() - t_setup
        tokens, step, epoch, losses = 0, 0, 0, []
        t0 = time.perf_counter()
        while step < steps:
            for batch in sft_data.plan_epoch(data.lengths, mbs, 1, epoch, seed, "group_by_length", max_length, True, 32):
                tensors = sft_data.collate(data.examples, batch, pad, pack=False)
                out = model(**tensors, use_cache=False)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                tokens += sft_data.real_tokens(data.examples, batch)
                losses.append(float(out.loss.detach()))
                step += 1
                if step >= steps:
                    break
            epoch += 1
        loop_s = time.perf_counter() - t0
        return {"threads": threads, "steps": step, "tokens": tokens, "loop_s": loop_s, "setup_s": setup_s,
                "tokens_per_s": tokens / loop_s, "params": common.count_params(model), "first_loss": losses[0],
                "last_loss": losses[-1]}
    finally:
        torch.set_num_threads(old)


def run_job(model_dir: str, data_dir: str, out_root: str, *, workers: int, steps: int, mbs: int, max_length: int,
            lr: float) -> dict[str, Any]:
    from ray_jobs import train

    run = f"w{workers}"
    argv = [
        "--config", os.path.join(common.REPO, "configs", "train.yaml"),
        f"data.train_path={data_dir}", "data.validation_path=null", f"data.max_length={max_length}",
        "model.build_tiny=false", f"model.name_or_path={model_dir}",
        "deepspeed.zero_stage=2", "deepspeed.precision=fp32", f"deepspeed.micro_batch_size={mbs}",
        f"optim.lr={lr}", "optim.warmup_ratio=0.0", "optim.scheduler=constant",
        "schedule.epochs=10", f"schedule.max_steps={steps}", "schedule.checkpoint_every_steps=null",
        "schedule.log_every_steps=100000", "schedule.eval_every_epoch=false",
        f"scaling.num_workers={workers}", "scaling.cpus_per_worker=1", "failure.max_failures=0",
        f"output.dir={os.path.join(out_root, run, 'model')}", f"output.checkpoint_dir={os.path.join(out_root, 'ckpt')}",
        f"output.run_name={run}",
    ]
    t0 = time.perf_counter()
    rc = train.main(argv)
    wall = time.perf_counter() - t0
    if rc:
        raise RuntimeError(f"train exited {rc}")
    with open(os.path.join(out_root, run, "model", "manifest.json")) as f:
        manifest = json.load(f)
    m = manifest.get("extra", manifest)["metrics"]
    return {"workers": workers, "steps": m["step"], "tokens": m["tokens"], "tokens_per_s": m["tokens_per_s"],
            "loop_s": m["tokens"] / m["tokens_per_s"] if m.get("tokens_per_s") else None, "job_wall_s": wall,
            "e2e_tokens_per_s": m["tokens"] / wall, "final_loss": m.get("loss")}


def main(argv: Optional[list[str]] = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 60, quick 15)")
    p.add_argument("--micro-batch", type=int, default=8)
    args = p.parse_args(argv)
    rep = common.Report(NAME, args, "Training: Ray Train + DeepSpeed (1 and 2 CPU workers) vs a plain PyTorch loop")
    steps = args.steps or (15 if rep.quick else 60)
    mbs, max_length, lr = args.micro_batch, 512, 1e-3
    ncpu = os.cpu_count() or 1

    import ray

    prepared = common.prepared_questions()
    model_dir = common.tiny_model(hidden=args.hidden, layers=args.layers)
    work = common.scratch("training")
    data_dir = write_sft_data(prepared, os.path.join(work, "sft"))
    common.shutdown_ray()

    peak = {"1_thread": measure.matmul_peak_gflops(threads=1), f"{ncpu}_threads": measure.matmul_peak_gflops(threads=ncpu)}
    print(f"fp32 matmul peak: {peak}", flush=True)
    plain = [plain_loop(model_dir, data_dir, steps=steps, mbs=mbs, max_length=max_length, lr=lr, threads=t)
             for t in sorted({1, ncpu})]
    for r in plain:
        print(f"plain loop, {r['threads']} thread(s): {r['tokens_per_s']:.0f} tokens/s", flush=True)
    params = plain[0]["params"]

    ray_start = common.start_local_ray(max(2, ncpu))
    jobs = []
    try:
        for w in (1, 2):
            jobs.append(run_job(model_dir, data_dir, work, workers=w, steps=steps, mbs=mbs, max_length=max_length, lr=lr))
            print(f"train job, {w} worker(s): {jobs[-1]['tokens_per_s']:.0f} tokens/s in the loop", flush=True)
    finally:
        ray.shutdown()
    peak_after = {"1_thread": measure.matmul_peak_gflops(threads=1), f"{ncpu}_threads": measure.matmul_peak_gflops(threads=ncpu)}
    peak_best = {k: max(peak[k], peak_after[k]) for k in peak}
    per_core = peak_best["1_thread"]  # the cleanest figure on a shared machine: it needs one free core, not all

    def peak_for(cores: int) -> float:
        return cores * per_core

    def flops(tps: float) -> float:
        return 6 * params * tps / 1e9

    p1 = next(r for r in plain if r["threads"] == 1)
    pall = next(r for r in plain if r["threads"] == ncpu)
    rows = []
    for r in plain:
        pk = peak_for(r["threads"])
        rows.append([f"plain PyTorch loop, {r['threads']} thread(s)", r["steps"], r["tokens"], r["tokens_per_s"], None, 1.0 if r is p1 else r["tokens_per_s"] / p1["tokens_per_s"],
                     flops(r["tokens_per_s"]), flops(r["tokens_per_s"]) / pk])
    for j in jobs:
        ref = p1 if j["workers"] == 1 else pall
        pk = peak_for(j["workers"])
        rows.append([f"train job (Ray Train + DeepSpeed ZeRO-2), {j['workers']} worker(s)", j["steps"], int(j["tokens"]),
                     j["tokens_per_s"], j["e2e_tokens_per_s"], j["tokens_per_s"] / p1["tokens_per_s"],
                     flops(j["tokens_per_s"]), flops(j["tokens_per_s"]) / pk])
        j["overhead_ratio_vs_plain"] = ref["tokens_per_s"] / j["tokens_per_s"]
        j["compared_with_plain_threads"] = ref["threads"]
    table = common.md_table(["system", "steps", "tokens", "tokens/s (training loop)", "tokens/s (whole job)",
                             "× plain 1 thread", "GFLOP/s (6·N·tok/s)", "fraction of matmul peak of the cores used"], rows)
    j1, j2 = jobs
    scaling_note = (" (ops this small split poorly across threads, and threads stall whenever another process takes a core; "
                    "separate data-parallel processes do not have that problem)." if pall["tokens_per_s"] < 1.5 * p1["tokens_per_s"]
                    else ".")
    if j1["overhead_ratio_vs_plain"] > 1.05:
        overhead_note = ("Where the 1-worker job's extra time goes: DeepSpeed's ZeRO-2 bookkeeping (flattened fp32 gradient "
                         "buffers, its optimizer wrapper and gradient clipping over them, collectives over gloo even for one "
                         "rank) and Ray Train's per-step reporting hooks.")
    else:
        overhead_note = ("With 1 worker the job runs at the plain loop's speed within noise: DeepSpeed's ZeRO-2 bookkeeping and "
                         "Ray Train's hooks cost little per step at this size.")
    if j2["overhead_ratio_vs_plain"] > 1.05:
        overhead_note += (" With 2 workers the gradient all-reduce over gloo between two processes on the same cores adds "
                          "to each step.")
    notes = f"""
Model: tiny random Llama from `build_tiny_model` (hidden {args.hidden}, {args.layers} layers), N = {params:,} parameters
(embeddings tied with the LM head). Data: {len(open(os.path.join(data_dir, 'part-0.parquet'), 'rb').read()) // 1024} KiB of SFT rows (the decomposer's
zero-shot prompt + gold GSM8K subquestions), max_length {max_length}, group_by_length batches, micro-batch {mbs} per worker,
{steps} optimizer steps, AdamW lr {lr:g} (constant), gradient clipping 1.0, fp32. The job is `ray_jobs.train.main`
(`TorchTrainer`, gloo, ZeRO-2 with torch AdamW, 1 CPU per worker; Ray sets each worker to 1 torch thread); checkpointing
only at the end, no validation. With 2 workers each step trains 2 micro-batches (data parallel), so tokens per step double.

Measured fp32 matmul peak (torch, 1024×1024, best burst, before and after the runs): {peak_best['1_thread']:.1f} GFLOP/s with 1 thread,
{peak_best[f'{ncpu}_threads']:.1f} GFLOP/s with {ncpu} threads. The fraction-of-peak column divides by (threads or workers) ×
the 1-thread peak: on a shared machine the all-threads figure is depressed by whatever else runs, the 1-thread one much less.
Multi-threaded OpenMP suffers badly when another process holds one of the cores (threads spin at barriers waiting for
a descheduled peer), so the {ncpu}-thread plain loop is the figure most distorted by concurrent work. *tokens/s (training loop)* is the job's own `tokens_per_s` metric
(tokens since the loop started, i.e. after Ray Train start-up, model load, tokenization and `deepspeed.initialize`; the
same span is timed for the plain loop). *whole job* = tokens / wall time of `train.main` with Ray already up ({ray_start:.1f} s
Ray start not included), which adds worker start-up, DeepSpeed init, the final checkpoint and the HF export.

Overhead ratio (plain loop tokens/s ÷ job tokens/s, same thread count): **1 worker {j1['overhead_ratio_vs_plain']:.2f}×**
(vs plain 1 thread), **2 workers {j2['overhead_ratio_vs_plain']:.2f}×** (vs plain {ncpu} threads); above 1 = the job is slower.
Scaling 1 → 2 workers: {j2['tokens_per_s'] / j1['tokens_per_s']:.2f}× (2 workers train 2 micro-batches per step); the plain loop
with {ncpu} intra-op threads ran {pall['tokens_per_s'] / p1['tokens_per_s']:.2f}× its 1-thread speed{scaling_note}
{overhead_note} The FLOP fraction stays well below the matmul peak for every system because a model this small is bound
by per-op overhead (hundreds of small kernels per step, attention, softmax, AdamW's elementwise updates), not by matmul
throughput; 6·N·tokens also leaves out attention-score FLOPs. Whole-job figures are dominated by fixed start-up (Ray Train
worker group, DeepSpeed init, final checkpoint and export) for runs this short.
"""
    rep.write({"matmul_peak_gflops_before": peak, "matmul_peak_gflops_after": peak_after, "matmul_peak_gflops": peak_best,
               "params": params, "plain_loops": plain, "jobs": jobs, "ray_start_s": ray_start},
              table, notes, params={"hidden": args.hidden, "layers": args.layers, "steps": steps, "micro_batch": mbs,
                                    "max_length": max_length, "lr": lr, "zero_stage": 2, "precision": "fp32"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
