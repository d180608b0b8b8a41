"""Does the order of length-grouped batches decide what the quickstart's decomposer students learn?

    python -m benchmarks.probe_batch_order --run runs/quickstart [--seeds 0,1,2] [--sets S_D-T,S_D-R]

On the artifacts of one finished ``divconq quickstart`` run (its students' base, its selected training
sets, its test questions and its teacher), each decomposer student is fine-tuned as the quickstart's
``train`` job fine-tunes it: the run's own student ``TrainConfig`` (``students/<name>/manifest.json``),
the recipe's DeepSpeed engine (:func:`training.engine.build_engine`, one gloo process, no Ray), its
tokenization, its loss (:func:`training.sft_data.causal_lm_loss`) and its batch plan
(:func:`training.sft_data.plan_epoch`), once with the micro-batches of each epoch in sorted order
(``shuffle_batches=False``: every epoch runs from the longest rows to the shortest, which a set smaller
than one mega-batch, 160-433 rows here, gets whole), once in shuffled steps (the default) and once in
micro-batches of random rows (``pack_or_group: none``). Each student
is measured on the test questions as :mod:`benchmarks.probe_students` measures: exact decompositions,
names copied, and two-stage accuracy with the run's teacher as solver (greedy).

The question it answered: the quickstart's S_D-T (qs11) wrote 35 % exact decompositions of held-out chain
questions: it picked "city" or "year" per entity instead of copying the question's word, though its
training loss was as low as a good student's. Through the recipe: 30-40 % sorted (3 seeds), 43-89 % in
shuffled steps, 63-99 % in random micro-batches, which is what the quickstart's students now train on
(S_D-R: 16-49, 17-47 and 46-57 %).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.probe_students import SETS, _Q, measure  # noqa: E402
from benchmarks.probe_world import Gen, sample_rows  # noqa: E402

NAME = "probe_batch_order"
# batch order -> (pack_or_group, shuffle_batches): length-grouped micro-batches in sorted order, the same in
# shuffled steps (plan_epoch's default), or micro-batches of random rows (no grouping)
ORDERS = {"sorted": ("group_by_length", False), "shuffled": ("group_by_length", True), "random": ("none", True)}


def init_one_process_group() -> None:
    """torch.distributed with one gloo process: what DeepSpeed needs outside Ray Train."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(common.free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("gloo", rank=0, world_size=1)


def student_set(run: str, student: str) -> tuple[Any, Any, Any]:
    """The run's own ``TrainConfig`` of ``student``, its base's tokenizer and its training set, tokenized."""
    from transformers import AutoTokenizer

    from training import sft_data
    from training.config import TrainConfig

    with open(os.path.join(run, "students", student, "manifest.json")) as f:
        cfg = TrainConfig.model_validate(json.load(f)["config"])
    tok = AutoTokenizer.from_pretrained(os.path.join(run, "student_base", "model"))
    rows = sft_data.read_conversations(os.path.join(run, "select", SETS[student], "train"))
    return cfg, tok, sft_data.tokenize_rows(tok, rows, cfg.data.max_length)


def fine_tune(run: str, cfg: Any, tok: Any, data: Any, order: str, seed: int) -> tuple[Any, float]:
    """A student fine-tuned again from the run's base with the recipe's pieces in batch ``order``; (model, last loss)."""
    from training import sft_data
    from training.engine import build_engine

    steps, mbs = cfg.schedule.max_steps, cfg.deepspeed.micro_batch_size
    mode, shuffle_batches = ORDERS[order]
    engine = build_engine(cfg, os.path.join(run, "student_base", "model"), steps, 1, use_gpu=False)
    step, epoch, loss = 0, 0, float("nan")
    while step < steps:
        for batch in sft_data.plan_epoch(data.lengths, mbs, 1, epoch, seed, mode, cfg.data.max_length,
                                         cfg.data.shuffle, cfg.data.mega_batch_multiplier, shuffle_batches):
            if step >= steps:
                break
            out = sft_data.causal_lm_loss(engine.engine, sft_data.collate(data.examples, batch, tok.pad_token_id))
            engine.engine.backward(out)
            engine.engine.step()
            step, loss = step + 1, float(out)
        epoch += 1
    model = engine.engine.module
    engine.close()
    return model.eval(), loss


def main(argv=None) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline import storage, tables

    p = common.base_parser(__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/quickstart", help="a finished quickstart's --out")
    p.add_argument("--seeds", default="0,1,2", help="batch-plan seeds, comma-separated")
    p.add_argument("--sets", default="S_D-T,S_D-R")
    p.add_argument("--orders", default=",".join(ORDERS), help="batch orders: " + ", ".join(ORDERS))
    p.add_argument("--test-per-family", type=int, default=70)
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(2)
    report = common.Report(NAME, args, "probe_batch_order: sorted or shuffled length-grouped batches for the decomposer students")
    report.command = " ".join(["python -m benchmarks." + NAME] + list(sys.argv[1:] if argv is None else argv))
    init_one_process_group()
    teacher_dir = os.path.join(args.run, "teacher", "model")
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = Gen(AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval(), tok, "teacher")
    test = [r for r in tables.read_rows(storage.join(args.run, "prepare", "data")) if r["split"] == "test"]
    rows = sample_rows([_Q(r) for r in test], args.test_per_family, seed=1)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        seeds = seeds[:1]
    results: dict[str, Any] = {"run": args.run, "test_questions": len(rows)}
    for student in args.sets.split(","):
        cfg, student_tok, data = student_set(args.run, student)
        for order in args.orders.split(","):
            for seed in seeds:
                key = f"{student} {order} seed {seed}"
                model, loss = fine_tune(args.run, cfg, student_tok, data, order, seed)
                results[key] = {"student": student, "order": order, "seed": seed, "loss": loss,
                                **measure(key, model, tok, teacher, rows)}
    notes = (f"Each student fine-tuned with the run's own schedule from its students' base, the recipe's DeepSpeed engine; "
             f"scores on {len(rows)} test questions ({args.test_per_family} per family), in %: two-stage accuracy with the "
             f"run's teacher as solver, exact decompositions, names copied. `world_compare` is the held-out family.")
    report.write(results, render_table(results), notes, params=vars(args))
    return 0


def render_table(results: dict[str, Any]) -> str:
    runs = {k: v for k, v in results.items() if isinstance(v, dict) and "families" in v}
    fams = sorted(next(iter(runs.values()))["families"])
    head = ["student", "batch order", "seed", "final loss"] + [f"{f.split('_')[1]} {m}" for f in fams for m in ("acc", "decomp EM")]
    body = [[v["student"], v["order"], v["seed"], v["loss"]] + [v["families"][f][m] for f in fams for m in ("acc", "decomp_em")]
            for v in runs.values()]
    return common.md_table(head, body)


if __name__ == "__main__":
    sys.exit(main())
