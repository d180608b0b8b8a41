"""Training throughput on a model large enough to matter here (Llama, hidden 512, 8 layers): the
current loop (the ``train`` job: Ray Train + DeepSpeed ZeRO-2, 1 worker) and the same SFT step in
one process with packing on/off and ``torch.compile`` on/off.

    python -m benchmarks.bench_training_throughput [--quick] [--steps 10 --warmup 2 --hidden 512 --layers 8]

Figures: trained (non-padding) tokens/s over the measured steps (after ``--warmup`` steps, which
absorb torch.compile's compilation, reported separately), and the share of this machine's fp32
matmul peak (measured in the same run) that 6·N·tokens/s reaches.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, measure  # noqa: E402
from benchmarks.bench_training import run_job, write_sft_data  # noqa: E402

NAME = "bench_training_throughput"


def sft_step_loop(model_dir: str, data_dir: str, *, pack: bool, compile_model: bool, steps: int, warmup: int, mbs: int,
                  max_length: int, lr: float, threads: int, seed: int = 0) -> dict[str, Any]:
    """The train loop's step (same tokenization, batch plan, collate, AdamW, clipping, fp32) in one process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training import sft_data

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    data = sft_data.tokenize_rows(tok, sft_data.read_conversations(data_dir), max_length)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    step_fn = torch.compile(model, dynamic=True) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    mode = "pack" if pack else "group_by_length"
    batches = sft_data.plan_epoch(data.lengths, mbs, 1, 0, seed, mode, max_length, True, 32)
    tokens = padded = 0
    t_warm = time.perf_counter()
    t0 = None
    for i, batch in enumerate(batches[: warmup + steps]):
        if i == warmup:
            t0 = time.perf_counter()
        tensors = sft_data.collate(data.examples, batch, pad, pack=pack)
        out = step_fn(**tensors, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            tokens += sft_data.real_tokens(data.examples, batch)
            padded += tensors["input_ids"].numel()
    loop_s = time.perf_counter() - (t0 or t_warm)
    return {"pack": pack, "compile": compile_model, "steps": steps, "tokens": tokens, "padding_share": 1 - tokens / max(padded, 1),
            "loop_s": loop_s, "warmup_s": (t0 or t_warm) - t_warm, "tokens_per_s": tokens / loop_s,
            "params": common.count_params(model), "last_loss": float(out.loss.detach())}


def main(argv: Optional[list[str]] = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="measured steps per variant (default 10, quick 3)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    args = p.parse_args(argv)
    rep = common.Report(NAME, args, f"Training throughput: Llama hidden {args.hidden}, {args.layers} layers, fp32, CPU")
    steps = args.steps or (3 if rep.quick else 10)
    mbs, max_length, lr, threads = args.micro_batch, args.max_length, 1e-4, os.cpu_count() or 1

    prepared = common.prepared_questions()
    model_dir = common.tiny_model(hidden=args.hidden, layers=args.layers, heads=8)
    work = common.scratch("training_throughput")
    data_dir = write_sft_data(prepared, os.path.join(work, "sft"))
    peak = measure.matmul_peak_gflops(threads=threads)
    print(f"fp32 matmul peak, {threads} threads: {peak:.1f} GFLOP/s", flush=True)

    variants = []
    for pack in (False, True):
        for compile_model in (False, True):
            r = sft_step_loop(model_dir, data_dir, pack=pack, compile_model=compile_model, steps=steps, warmup=args.warmup,
                              mbs=mbs, max_length=max_length, lr=lr, threads=threads)
            variants.append(r)
            print(f"pack={pack} compile={compile_model}: {r['tokens_per_s']:.0f} tokens/s (warm-up {r['warmup_s']:.1f} s)", flush=True)
    params = variants[0]["params"]

    import ray

    common.start_local_ray(max(2, threads))
    try:
        job = run_job(model_dir, data_dir, work, workers=1, steps=steps + args.warmup, mbs=mbs, max_length=max_length, lr=lr)
    finally:
        ray.shutdown()
    print(f"train job (1 worker): {job['tokens_per_s']:.0f} tokens/s", flush=True)

    def share(tps: float, n_threads: int) -> float:
        return 6 * params * tps / 1e9 / peak * (threads / n_threads if n_threads < threads else 1)

    base = variants[0]["tokens_per_s"]
    rows = [["train job (Ray Train + DeepSpeed ZeRO-2, 1 worker = 1 thread), group_by_length", "no", job["tokens_per_s"],
             job["tokens_per_s"] / base, 6 * params * job["tokens_per_s"] / 1e9, share(job["tokens_per_s"], 1), "–"]]
    for r in variants:
        rows.append([f"one process, {threads} threads, {'pack' if r['pack'] else 'group_by_length'}", "yes" if r["compile"] else "no",
                     r["tokens_per_s"], r["tokens_per_s"] / base, 6 * params * r["tokens_per_s"] / 1e9, share(r["tokens_per_s"], threads),
                     r["padding_share"]])
    table = common.md_table(["loop", "torch.compile", "tokens/s", "× group_by_length eager", "GFLOP/s (6·N·tok/s)",
                             "share of matmul peak", "padding share"], rows)
    best = max(variants, key=lambda r: r["tokens_per_s"])
    notes = f"""
Model: Llama from `build_tiny_model` (hidden {args.hidden}, {args.layers} layers, 8 heads, vocab 1024, tied embeddings),
N = {params:,} parameters. Data: the GSM8K decomposer SFT rows of `bench_training`, max_length {max_length},
micro-batch {mbs}, AdamW, clipping 1.0, fp32; {steps} measured steps after {args.warmup} warm-up steps per variant
(torch.compile compiles during warm-up: {', '.join(f"{r['warmup_s']:.0f} s" for r in variants if r['compile'])} with
compile vs {', '.join(f"{r['warmup_s']:.0f} s" for r in variants if not r['compile'])} without). The train job runs its
worker with 1 torch thread (Ray's default for a 1-CPU worker), so its peak share is against one thread's share of the
{threads}-thread peak ({peak:.1f} GFLOP/s measured in this run). Fastest in-process variant: **{'pack' if best['pack'] else 'group_by_length'},
compile {'on' if best['compile'] else 'off'}** ({best['tokens_per_s'] / base:.2f}× group_by_length eager).
"""
    rep.write({"matmul_peak_gflops": peak, "threads": threads, "params": params, "variants": variants, "job": job},
              table, notes, params={"hidden": args.hidden, "layers": args.layers, "steps": steps, "warmup": args.warmup,
                                    "micro_batch": mbs, "max_length": max_length})
    return 0


if __name__ == "__main__":
    sys.exit(main())
