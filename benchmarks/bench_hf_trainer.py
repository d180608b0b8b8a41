"""Would transformers' ``Trainer`` (its DeepSpeed integration) or TRL's ``SFTTrainer``, under Ray
Train's ``prepare_trainer``, do what ``training/recipe.py`` does with less code?

    python -m benchmarks.bench_hf_trainer [--quick] [--steps N] [--rounds 3]   # TRL rows need: pip install -e '.[bench]'

Three systems on the same Ray Train worker group (2 CPU workers, gloo), the same tiny Llama (h128/l4),
the same GSM8K SFT rows, micro-batch 8 per worker, max_length 512, length-grouped batches, AdamW lr 1e-3
constant, clipping 1.0, ZeRO-2 fp32 with the same DeepSpeed config (``training.deepspeed_config``),
loss on assistant tokens only (ours and Trainer: the same tokenized examples with -100 prompt
labels; TRL: its prompt/completion format with ``completion_only_loss``). For each:

* **throughput**: trained (non-padding) tokens per second inside the loop over one epoch, as a ratio to
  ours (the median of interleaved runs);
* **mid-epoch resume**: train ``steps`` straight, and train to ``steps // 2`` (mid-epoch), stop, resume
  from that checkpoint to ``steps``; the largest absolute difference between the two final weight sets
  (0 = exact);
* **lines of code** (non-blank, non-comment) of what the system replaces or needs.
"""

from __future__ import annotations

import ast
import os
import sys
import time
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from pipeline import tables  # noqa: E402
from benchmarks.bench_train_fixed_cost import job_config  # noqa: E402
from benchmarks.bench_training import write_sft_data  # noqa: E402

NAME = "bench_hf_trainer"
MBS, MAX_LENGTH, LR, WORKERS = 8, 512, 1e-3, 2


# ================================================================ the Trainer / SFTTrainer side (Ray Train workers)
class _CountingCollator:
    """Wraps a collator: counts the non-padding tokens of every batch it builds (this rank)."""

    def __init__(self, inner):
        self.inner, self.tokens = inner, 0

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch


def _pad_collator(pad_id: int):
    """Right-pad input_ids (pad), labels (-100) and the attention mask: what our recipe feeds."""
    import torch

    def collate(features):
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def _hf_args(kind: str, out_dir: str, steps: int, stop_at: Optional[int], ds_config: dict):
    common_args = dict(output_dir=out_dir, per_device_train_batch_size=MBS, max_steps=steps, learning_rate=LR,
                       lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                       adam_epsilon=1e-8, max_grad_norm=1.0, seed=0, data_seed=0, train_sampling_strategy="group_by_length",
                       save_strategy="steps", save_steps=stop_at or steps, logging_steps=10**6, report_to="none",
                       deepspeed=ds_config, dataloader_num_workers=0, disable_tqdm=True, use_cpu=True, bf16=False, fp16=False)
    if kind == "trainer":
        from transformers import TrainingArguments

        return TrainingArguments(**common_args)
    from trl import SFTConfig  # lazy: an optional benchmark extra

    return SFTConfig(**common_args, max_length=MAX_LENGTH, completion_only_loss=True, packing=False, dataset_num_proc=1)


def _hf_trainer(kind: str, model_dir: str, data_dir: str, args):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    from training.sft_data import read_conversations, tokenize_rows

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.use_cache = False
    rows = read_conversations(data_dir)
    if kind == "trainer":
        examples = tokenize_rows(tok, rows, MAX_LENGTH).examples
        data = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return Trainer(model=model, args=args, train_dataset=data, data_collator=_pad_collator(pad))
    import datasets  # lazy: an optional benchmark extra
    from trl import SFTTrainer

    data = datasets.Dataset.from_list([{"prompt": [dict(m) for m in r["messages"][:-1]],
                                        "completion": [dict(r["messages"][-1])]} for r in rows])
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)


def hf_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train loop of the Trainer / SFTTrainer runs: train, save the final weights, return timings."""
    import torch
    import torch.distributed as dist
    from ray.train.huggingface.transformers import prepare_trainer
    from transformers import TrainerCallback

    from training.engine import choose_accelerator, skip_unused_shm_op

    choose_accelerator(False)
    skip_unused_shm_op()  # the same fixed-cost fix for every system

    class StopAndTime(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.start, self.cpu0 = time.time(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            if config["stop_at"] and state.global_step >= config["stop_at"]:
                control.should_save, control.should_training_stop = True, True

        def on_train_end(self, args, state, control, **kw):
            self.end, self.cpu = time.time(), time.process_time() - self.cpu0

    args = _hf_args(config["kind"], config["out_dir"], config["steps"], config["stop_at"], config["ds_config"])
    trainer = prepare_trainer(_hf_trainer(config["kind"], config["model_dir"], config["data_dir"], args))
    timer = StopAndTime()
    trainer.add_callback(timer)
    trainer.data_collator = counter = _CountingCollator(trainer.data_collator)
    trainer.train(resume_from_checkpoint=config.get("resume"))
    if not config["stop_at"]:
        trainer.save_model(config["final_dir"])
    sums = torch.tensor([float(counter.tokens), timer.cpu], dtype=torch.float64)
    dist.all_reduce(sums)
    return {"tokens": float(sums[0]), "cpu_s": float(sums[1]), "loop_s": timer.end - timer.start, "step": trainer.state.global_step}


def run_hf(kind: str, model_dir: str, data_dir: str, work: str, steps: int, stop_at: Optional[int] = None,
           resume: Optional[str] = None, final_dir: Optional[str] = None) -> dict[str, Any]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from training.deepspeed_config import build_deepspeed_config

    cfg = job_config(model_dir, data_dir, work, names=["m"], steps=steps)
    ds_config = build_deepspeed_config(cfg, steps, WORKERS, use_gpu=False)
    ds_config.pop("scheduler")  # the Trainer's constant schedule (DeepSpeed's WarmupLR needs a step count it checks)
    loop_config = {"kind": kind, "model_dir": model_dir, "data_dir": data_dir, "out_dir": os.path.join(work, kind),
                   "steps": steps, "stop_at": stop_at, "resume": resume, "final_dir": final_dir, "ds_config": ds_config}
    trainer = TorchTrainer(hf_loop, train_loop_config=loop_config, torch_config=TorchConfig(backend="gloo"),
                           scaling_config=ScalingConfig(num_workers=WORKERS, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name=f"{kind}-{stop_at or steps}-{bool(resume)}", storage_path=os.path.join(work, "ray")))
    t0 = time.perf_counter()
    result = trainer.fit()
    return {**result.return_value, "wall_s": time.perf_counter() - t0}


# ================================================================ our recipe
def run_ours(model_dir: str, data_dir: str, out: str, steps: int) -> dict[str, Any]:
    from pipeline.manifest import read_manifest
    from training.job import run

    cfg = job_config(model_dir, data_dir, out, names=["m"], steps=steps)
    t0 = time.perf_counter()
    run(cfg)
    m = read_manifest(cfg.output.dir)
    return {"tokens": m["metrics"]["tokens"], "loop_s": m["metrics"]["elapsed_s"], "cpu_s": m["metrics"]["cpu_s"],
            "step": m["counts"]["steps"],
            "wall_s": time.perf_counter() - t0, "model_dir": cfg.output.dir}


def max_weight_diff(a_dir: str, b_dir: str) -> float:
    from safetensors.torch import load_file

    a, b = load_file(os.path.join(a_dir, "model.safetensors")), load_file(os.path.join(b_dir, "model.safetensors"))
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:4]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ================================================================ lines of code
def code_lines(path: str, functions: Optional[set[str]] = None) -> int:
    """Non-blank, non-comment, non-docstring lines of a module (or of some of its functions)."""
    src = open(os.path.join(common.REPO, path)).read()
    tree = ast.parse(src)
    doc_lines: set[int] = set()
    spans: list[tuple[int, int]] = []
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            doc_lines.update(range(body[0].lineno, body[0].end_lineno + 1))
        if functions is not None and isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in functions:
            spans.append((node.lineno, node.end_lineno))
    lines = src.splitlines()
    keep = range(1, len(lines) + 1) if functions is None else [n for a, b in spans for n in range(a, b + 1)]
    return sum(1 for n in keep if n not in doc_lines and lines[n - 1].strip() and not lines[n - 1].strip().startswith("#"))


def loc_figures() -> dict[str, int]:
    """What a Trainer would replace in our code, what it needs instead, and what stays either way."""
    replaced = {"training/recipe.py": {"train", "train_epoch", "train_step", "validate", "save_checkpoint", "load_checkpoint",
                                       "_metrics", "_report", "plan_epoch", "_to_device", "_scratch_dir"},
                "training/engine.py": {"build_engine", "load_model", "torch_dtype"},
                "training/sft_data.py": {"plan_epoch", "pack_sequences", "shard_batches", "shard_eval_batches", "collate",
                                         "real_tokens"}}
    stays = {"training/recipe.py": {"recipe_main", "setup", "_load_tokenizer", "_load_data", "_find_resume_checkpoint", "export",
                                    "cleanup", "Worker", "ModelPlan", "JobPlan", "_call", "_add_timing", "_timed"},
             "training/checkpointing.py": None, "training/callbacks.py": None}
    glue = {"_pad_collator", "_CountingCollator", "_hf_args", "_hf_trainer", "hf_loop"}
    return {"ours, replaceable by Trainer (loop, validation, checkpoint save/load, metrics, engine init, batch plans)":
                sum(code_lines(p, f) for p, f in replaced.items()),
            "Trainer glue in this script (model, data, collator, arguments, callbacks)": code_lines("benchmarks/bench_hf_trainer.py", glue),
            "ours, needed either way (several models per group, per-model resume and retention, export, callbacks, timings)":
                sum(code_lines(p, f) for p, f in stays.items())}


# ================================================================ main
def straight_run(kind: str, model_dir: str, data_dir: str, work: str, steps: int, round_: int) -> dict[str, Any]:
    out = os.path.join(work, kind, f"straight-{round_}")
    if kind == "ours":
        return run_ours(model_dir, data_dir, out, steps)
    r = run_hf(kind, model_dir, data_dir, out, steps, final_dir=os.path.join(out, "final"))
    return {**r, "model_dir": os.path.join(out, "final")}


def resume_diff(kind: str, model_dir: str, data_dir: str, work: str, steps: int, straight_dir: str) -> float:
    """Train to steps // 2 (mid-epoch), stop, resume from that checkpoint to ``steps``: max |Δw| vs straight."""
    base, half = os.path.join(work, kind, "resumed"), steps // 2
    if kind == "ours":
        run_ours(model_dir, data_dir, base, half)
        resumed = run_ours(model_dir, data_dir, base, steps)["model_dir"]  # same run: resumes at its step `half`
    else:
        run_hf(kind, model_dir, data_dir, base, steps, stop_at=half)
        resumed = os.path.join(base, "final")
        run_hf(kind, model_dir, data_dir, base, steps, resume=os.path.join(base, kind, f"checkpoint-{half}"), final_dir=resumed)
    return max_weight_diff(straight_dir, resumed)


def measure_all(kinds: list[str], model_dir: str, data_dir: str, work: str, steps: int, rounds: int) -> dict[str, Any]:
    """Straight runs interleaved (A B C, A B C, ...: load drifts hit every system alike), then the resumes."""
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    errors: dict[str, str] = {}
    for r in range(rounds):
        for kind in kinds:
            if kind in errors:
                continue
            try:
                x = straight_run(kind, model_dir, data_dir, work, steps, r)
                runs[kind].append(x)
                print(f"round {r} {kind}: {x['tokens'] / x['loop_s']:.0f} tokens/s, {x['tokens'] / x['cpu_s']:.0f} tokens per CPU-s",
                      flush=True)
            except Exception as e:  # a system that cannot run here is a finding, not a crash of the benchmark
                errors[kind] = f"{type(e).__name__}: {str(e)[-1500:]}"
                print(f"{kind}: FAILED {errors[kind]}", flush=True)
    out: dict[str, Any] = {k: {"error": v} for k, v in errors.items()}
    for kind in kinds:
        if kind in errors:
            continue
        rates = sorted(x["tokens"] / x["loop_s"] for x in runs[kind])
        per_cpu = sorted(x["tokens"] / x["cpu_s"] for x in runs[kind])
        diff = resume_diff(kind, model_dir, data_dir, work, steps, runs[kind][0]["model_dir"])
        out[kind] = {"tokens_per_s": rates[len(rates) // 2], "rates": rates, "tokens_per_cpu_s": per_cpu[len(per_cpu) // 2],
                     "per_cpu": per_cpu, "straight": runs[kind][0], "runs": runs[kind], "resume_max_abs_diff": diff}
        print(f"{kind}: median {out[kind]['tokens_per_s']:.0f} tokens/s, {out[kind]['tokens_per_cpu_s']:.0f} tokens per CPU-s, "
              f"resume max |Δw| {diff:.3g}", flush=True)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one epoch, quick 8); the resume stops at half")
    p.add_argument("--rounds", type=int, default=None, help="interleaved straight runs per system (default 3, quick 1)")
    args = p.parse_args(argv)
    rep = common.Report(NAME, args, "Our DeepSpeed recipe vs transformers Trainer vs TRL SFTTrainer (under Ray Train)")
    model_dir = common.tiny_model(hidden=128, layers=4)
    work = common.scratch("hf_trainer")
    data_dir = write_sft_data(common.prepared_questions(), os.path.join(work, "sft"))
    # One epoch (all but its last partial step): every system trains on the same rows, so the mix of
    # lengths (hence the attention share of the work) is the same; a part of an epoch would compare
    # different slices (ours starts with its longest mega-batch).
    steps = args.steps or (8 if rep.quick else tables.count_rows(data_dir) // (MBS * WORKERS))
    rounds = args.rounds or (1 if rep.quick else 3)
    common.shutdown_ray()
    kinds = ["ours", "trainer"]
    try:
        import trl  # noqa: F401

        kinds.append("trl")
    except ImportError:
        print("trl is not installed (pip install -e '.[bench]'): no SFTTrainer row", flush=True)
    common.start_local_ray(2)
    try:
        results = measure_all(kinds, model_dir, data_dir, work, steps, rounds)
    finally:
        common.shutdown_ray()
    write_report(rep, results, loc_figures(), steps, rounds)
    return 0


def write_report(rep, results: dict[str, Any], loc: dict[str, int], steps: int, rounds: int) -> None:
    base = results.get("ours", {})
    ours, ours_cpu = base.get("tokens_per_s", float("nan")), base.get("tokens_per_cpu_s", float("nan"))
    labels = {"ours": "our recipe (training/recipe.py)", "trainer": "transformers Trainer + DeepSpeed, prepare_trainer",
              "trl": "TRL SFTTrainer + DeepSpeed, prepare_trainer"}
    rows = []
    for kind, r in results.items():
        if "error" in r:
            rows.append([labels[kind], "failed", "–", "–", "–", r["error"].strip().splitlines()[-1][:160], "–"])
            continue
        rows.append([labels[kind], r["tokens_per_cpu_s"], r["tokens_per_cpu_s"] / ours_cpu, r["tokens_per_s"] / ours,
                     r["resume_max_abs_diff"], ", ".join(f"{x:.0f}" for x in r["rates"]), f"{int(r['straight']['tokens']):,}"])
    table = common.md_table(["system", "tokens per CPU-second (median)", "× ours (CPU)", "× ours (wall tokens/s)",
                             f"max |Δw| after a resume at step {steps // 2}", f"wall tokens/s of the {rounds} interleaved runs",
                             "tokens per run"], rows)
    table += "\n\n" + common.md_table(["code", "lines"], [[k, v] for k, v in loc.items()])
    rep.write({"results": results, "lines_of_code": loc}, table, notes(), params={"steps": steps, "rounds": rounds, "micro_batch": MBS,
              "max_length": MAX_LENGTH, "lr": LR, "workers": WORKERS, "zero_stage": 2})


def notes() -> str:
    return """
Tokens/s are trained non-padding tokens per second from the first step to the end of the loop (ours: the recipe's
`elapsed_s` and `cpu_s`; Trainer/TRL: `on_train_begin` → `on_train_end`, tokens counted by wrapping the collator), all
in this process and worker group size, so the ratio is the figure to read. On a machine shared with other work the
wall rate swings by ±40 % between runs; tokens per CPU-second (CPU time of both worker processes over the same span,
`time.process_time`) does not depend on how long a process waited for a core, so it is the headline. The resume column trains `steps` straight and,
separately, to `steps/2`, stops (a saved checkpoint), and resumes to `steps`: identical weights mean an exact
mid-epoch resume (the epoch here is ~60 steps). Lines are non-blank, non-comment, non-docstring lines; the Trainer
glue does not yet hold what the recipe also does (several models per worker group, the final HF export into a
Ray Train checkpoint, LoRA adapter-only checkpoints, validation, per-phase timings), so it undercounts what adopting
Trainer would take. See the verdict in training/recipe.py's docstring.
"""


if __name__ == "__main__":
    sys.exit(main())
