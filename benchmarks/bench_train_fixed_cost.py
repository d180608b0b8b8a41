"""A train job's fixed cost: whole-job rate vs in-loop rate, phase by phase, and what training
several models in one job saves (issue 12's four students).

    python -m benchmarks.bench_train_fixed_cost [--quick] [--models 4] [--steps 60] [--no-shm]

Runs, all in this process with Ray already started (2 CPU workers, ZeRO-2, fp32, the tiny Llama
h128/l4 of bench_training on its GSM8K SFT rows):

1. one model, one job: whole-job tokens/s vs the recipe's in-loop tokens/s (their ratio is the
   figure to watch: 1.0 = no fixed cost), and the recipe's own phase timings (manifest ``timings``);
2. ``--models`` models as that many jobs, then the same models as one job (``runs:``): total wall
   time and fixed seconds per model;
3. DeepSpeed's ``deepspeed_shm_comm`` op (which the recipe no longer builds): the ninja build it
   cost each job whenever the cache was invalid, measured in a subprocess with an empty temporary
   TORCH_EXTENSIONS_DIR, then from a second path to the same venv (what a CI clone's venv does to a
   shared cache), then from the first path again. ``--no-shm`` skips it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.bench_training import write_sft_data  # noqa: E402

NAME = "bench_train_fixed_cost"
PHASES = ("worker_start_s", "load_s", "tokenize_s", "find_checkpoint_s", "engine_s", "resume_s", "validate_s", "checkpoint_s", "export_s",
          "driver_export_s")


def job_config(model_dir: str, data_dir: str, out: str, *, names: list[str], steps: int, workers: int = 2):
    """The train job of bench_training (constant lr, checkpoint at the end only), for one model or several."""
    from training.config import TrainConfig

    per_model = {"data": {"train_path": data_dir, "max_length": 512},
                 "model": {"build_tiny": False, "name_or_path": model_dir},
                 "optim": {"lr": 1e-3, "warmup_ratio": 0.0, "scheduler": "constant"},
                 "schedule": {"epochs": 10, "max_steps": steps, "log_every_steps": 100000, "eval_every_epoch": False}}
    shared = {"ray": {"num_cpus": 2}, "deepspeed": {"zero_stage": 2, "precision": "fp32", "micro_batch_size": 8},
              "scaling": {"num_workers": workers, "cpus_per_worker": 1}, "failure": {"max_failures": 0},
              "output": {"dir": out, "checkpoint_dir": os.path.join(out, "ckpt"), "run_name": "-".join(names)}}
    if len(names) == 1:
        return TrainConfig.model_validate({**shared, **per_model})
    return TrainConfig.model_validate({**shared, **per_model, "runs": [{"name": n, "seed": i} for i, n in enumerate(names)]})


def run_job(cfg) -> dict[str, Any]:
    """Run the job; its wall time, tokens, in-loop seconds and per-model timings (from the manifests)."""
    from pipeline.manifest import read_manifest
    from training.job import run

    t0 = time.perf_counter()
    run(cfg)
    wall = time.perf_counter() - t0
    manifests = [read_manifest(m.output.dir) for m in cfg.model_runs()]
    tokens = sum(m["metrics"]["tokens"] for m in manifests)
    loop_s = sum(m["metrics"]["elapsed_s"] for m in manifests)
    return {"models": len(manifests), "wall_s": wall, "tokens": tokens, "loop_s": loop_s,
            "steps": [m["counts"]["steps"] for m in manifests], "timings": [m["timings"] for m in manifests]}


def shm_build_costs() -> list[dict[str, Any]]:
    """Wall and CPU seconds of ``build_shm_op`` from two paths to this venv, in an empty cache."""
    alias_root = tempfile.mkdtemp(prefix="divconq-venv-alias-")
    alias = os.path.join(alias_root, "venv")
    os.symlink(sys.prefix, alias)
    exe_alias = os.path.join(alias, "bin", os.path.basename(sys.executable))
    cache = tempfile.mkdtemp(prefix="divconq-torch-ext-")
    code = ("import resource, time; t = time.time(); from deepspeed.comm.torch import build_shm_op; build_shm_op(); "
            "u = resource.getrusage(resource.RUSAGE_CHILDREN); print(time.time() - t, u.ru_utime + u.ru_stime)")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": cache, "DS_ACCELERATOR": "cpu"}
    out = []
    for label, exe in (("venv, empty cache", sys.executable), ("same venv through another path (a CI clone's venv)", exe_alias),
                       ("first path again", sys.executable), ("first path, cache valid", sys.executable)):
        proc = subprocess.run([exe, "-c", code], env=env, capture_output=True, text=True, timeout=900)
        wall, cpu = (float(x) for x in proc.stdout.strip().splitlines()[-1].split())
        out.append({"case": label, "wall_s": wall, "compiler_cpu_s": cpu})
        print(f"shm op build, {label}: {wall:.1f} s wall, {cpu:.1f} s compiler CPU", flush=True)
    return out


def ratio_row(label: str, r: dict[str, Any]) -> list[Any]:
    loop_rate, whole_rate = r["tokens"] / r["loop_s"], r["tokens"] / r["wall_s"]
    fixed = r["wall_s"] - r["loop_s"]
    return [label, r["models"], "/".join(map(str, r["steps"])), int(r["tokens"]), loop_rate, whole_rate, loop_rate / whole_rate,
            fixed, fixed / r["models"]]


def phase_table(r: dict[str, Any], ray_start_s: float) -> str:
    t = r["timings"][0]
    job = t.get("job", {})
    rows = [["Ray start (once per process)", ray_start_s], ["driver: base model staged", job.get("base_model_s")],
            *[[f"worker: {k[:-2]}", t.get(k)] for k in PHASES],
            ["training loop (in-loop time)", r["loop_s"]], ["whole fit()", job.get("fit_s")], ["whole job", r["wall_s"]]]
    return common.md_table(["phase (one-model job)", "seconds"], rows)


def main(argv: Optional[list[str]] = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=None, help="models of the several-model comparison (default 4, quick 2)")
    p.add_argument("--steps", type=int, default=None, help="steps of the one-model job (default 60, quick 10)")
    p.add_argument("--no-shm", action="store_true", help="skip the shm op build measurement")
    args = p.parse_args(argv)
    rep = common.Report(NAME, args, "Train job fixed cost: whole-job vs in-loop rate, one job for several models")
    steps = args.steps or (10 if rep.quick else 60)
    k = args.models or (2 if rep.quick else 4)
    k_steps = max(steps // 2, 5)

    model_dir = common.tiny_model(hidden=128, layers=4)
    work = common.scratch("train_fixed_cost")
    data_dir = write_sft_data(common.prepared_questions(), os.path.join(work, "sft"))
    common.shutdown_ray()
    shm = [] if args.no_shm or rep.quick else shm_build_costs()
    ray_start = common.start_local_ray(2)
    try:
        one = run_job(job_config(model_dir, data_dir, os.path.join(work, "one"), names=["m"], steps=steps))
        print(f"one model: {one['wall_s']:.1f} s job, {one['loop_s']:.1f} s in the loop", flush=True)
        names = [f"s{i}" for i in range(k)]
        separate = [run_job(job_config(model_dir, data_dir, os.path.join(work, "sep", n), names=[n], steps=k_steps)) for n in names]
        sep = {"models": k, "wall_s": sum(r["wall_s"] for r in separate), "tokens": sum(r["tokens"] for r in separate),
               "loop_s": sum(r["loop_s"] for r in separate), "steps": [s for r in separate for s in r["steps"]],
               "timings": [t for r in separate for t in r["timings"]]}
        print(f"{k} jobs: {sep['wall_s']:.1f} s", flush=True)
        together = run_job(job_config(model_dir, data_dir, os.path.join(work, "together"), names=names, steps=k_steps))
        print(f"1 job of {k} models: {together['wall_s']:.1f} s", flush=True)
    finally:
        common.shutdown_ray()
    write_report(rep, one, sep, together, shm, ray_start, steps, k, k_steps)
    return 0


def write_report(rep, one, sep, together, shm, ray_start, steps, k, k_steps) -> None:
    headers = ["system", "models", "steps", "tokens", "tokens/s in the loop", "tokens/s whole job", "in-loop ÷ whole-job",
               "fixed s (job − loop)", "fixed s per model"]
    rows = [ratio_row("one model, one job", one), ratio_row(f"{k} models, {k} jobs", sep),
            ratio_row(f"{k} models, one job (runs:)", together)]
    table = common.md_table(headers, rows) + "\n\n" + phase_table(one, ray_start)
    if shm:
        table += "\n\n" + common.md_table(["deepspeed_shm_comm build (no longer done)", "wall s", "compiler CPU s"],
                                          [[s["case"], s["wall_s"], s["compiler_cpu_s"]] for s in shm])
    saved = sep["wall_s"] - together["wall_s"]
    notes = f"""
Every job runs `training.job.run` in this process with Ray already up ({ray_start:.1f} s to start, not counted); 2 workers
(gloo), ZeRO-2 with torch AdamW, fp32, micro-batch 8, max_length 512, checkpoint only at the end, no validation.
*In the loop* is the recipe's own `elapsed_s` (from the first step to the final checkpoint: the span its `tokens_per_s`
covers); *fixed* is the job's wall time minus that. Phase seconds are the recipe's `timings` (manifest): a worker's
start (from `fit()` to the loop: Ray Train controller, placement group, worker processes, imports, gloo), tokenizer and
model files, tokenization, `deepspeed.initialize`, checkpoints, the HF export in the workers and the driver's copy.

{k} models trained as {k} jobs took {sep['wall_s']:.0f} s, as one job {together['wall_s']:.0f} s ({saved:.0f} s saved,
{saved / max(k - 1, 1):.0f} s per extra model): the worker group, the imports and DeepSpeed's communication set-up are
paid once; each model still pays its tokenizer, tokenization, `deepspeed.initialize`, final checkpoint and export.
The shm op rows are the ninja build DeepSpeed's CPU backend ran before `training.engine.skip_unused_shm_op` (rank 0
builds while rank 1 waits, so its wall time added to every job that found the cache invalid; the cache key holds the
venv's absolute paths, so two venvs sharing `~/.cache/torch_extensions` invalidated it for each other in turn).
Timings are taken on a machine shared with other work (see Load): compare the ratios, not the seconds.
"""
    rep.write({"one_model": one, "separate_jobs": sep, "one_job": together, "shm_op_builds": shm, "ray_start_s": ray_start},
              table, notes, params={"steps_one_model": steps, "models": k, "steps_per_model": k_steps, "workers": 2})


if __name__ == "__main__":
    sys.exit(main())
