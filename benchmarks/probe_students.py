"""How to fine-tune the quickstart's decomposer students: schedules measured on a finished run.

    python -m benchmarks.probe_students --run runs/quickstart [--variants 1e-2:500,3e-3:e20 ...]

Plain PyTorch, no Ray, on the artifacts of one ``divconq quickstart`` run: its teacher
(``teacher/model``), its students' base (``student_base/model``), its selected training sets
(``select/decomposer_all|decomposer_correct/train``) and its test questions (``prepare``). For each
schedule (``LR:STEPS``, or ``LR:eEPOCHS`` for epochs of the set) and each decomposer set, a student is
fine-tuned from the base with the loop of :mod:`benchmarks.probe_world` and measured on the test
questions: decomposition exact match against the gold subquestions, the share of decompositions that
name the question's own entities, and two-stage accuracy with the teacher as solver (greedy).

The question it answered: the quickstart's students (500 steps at lr 1e-2 on 117-466 rows, 35-140
epochs, from a base pretrained to echo names) wrote names they memorized instead of the question's.
Which base and schedule make a student copy the question's names? (A base pretrained to list the
names a text mentions, fine-tuned at lr 3e-3: results/probe_students.md.)
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.probe_world import Gen, Schedule, decompose, exact_decomposition, per_family, sample_rows, solve, train  # noqa: E402

NAME = "probe_students"
SETS = {"S_D-T": "decomposer_all", "S_D-R": "decomposer_correct"}
# a name of the world is a capitalized word; the question's entities are its capitalized words after the first
_NAME = re.compile(r"\b[A-Z][a-z]+\b")


@functools.lru_cache(maxsize=1)
def world():
    """The quickstart's full world (what the run under probe was built from)."""
    from pipeline.data import world as W
    from pipeline.quickstart import Plan

    return W.generate(Plan.of(False).world)


def names_copied(question: str, subquestions: list[str]) -> bool:
    """Every entity name in the question appears in the decomposition, and no other name does."""
    asked = set(_NAME.findall(question)[1:])
    written = set(_NAME.findall(" ".join(subquestions))) - {w for s in subquestions for w in _NAME.findall(s)[:1]}
    return asked <= set(_NAME.findall(" ".join(subquestions))) and written <= asked


def parse_variant(text: str) -> tuple[float, str]:
    lr, length = text.split(":")
    return float(lr), length


def steps_of(length: str, rows: int, batch: int) -> int:
    return int(length[1:]) * math.ceil(rows / batch) if length.startswith("e") else int(length)


def measure(name: str, model, tok, teacher: Any, rows: list[dict]) -> dict[str, Any]:
    decs = decompose(Gen(model, tok, name), rows, lambda m: m)
    res = solve(teacher, rows, decs, lambda m: m)
    fams = per_family(rows, res)
    for fam, v in fams.items():
        pairs = [(d, r) for d, r in zip(decs, rows) if r["dataset"] == fam]
        v["decomp_em"] = round(100 * sum(exact_decomposition(d["subquestions"], r["gold_subquestions"]) for d, r in pairs) / len(pairs), 1)
        v["names_copied"] = round(100 * sum(names_copied(r["question"], d["subquestions"]) for d, r in pairs) / len(pairs), 1)
    print(f"  {name}: " + ", ".join(f"{f.split('_')[1]} acc {v['acc']} em {v['decomp_em']} names {v['names_copied']}"
                                   for f, v in fams.items()), flush=True)
    return {"families": fams, "examples": [d["subquestions"] for d in decs[:3]]}


def training_set(run: str, name: str) -> list[dict]:
    """A selected set of the run (S_D-T, S_D-R), or ``gold-<split>``: the gold decompositions of a world split
    (not a student of the paper: a probe of whether more, or cleaner, rows teach copying)."""
    from pipeline import storage, tables
    from pipeline.data import world_corpus

    if name.startswith("gold-"):
        return world_corpus.gold_decompositions(world(), name[5:])
    return [{"id": r["id"], "messages": r["messages"]} for r in tables.read_rows(storage.join(run, "select", SETS[name], "train"))]


def listing_accuracy(model, tok, n: int = 100) -> dict[str, float]:
    """The base's own skill on held-out name-listing rows: the whole list exact, and its first name alone."""
    from pipeline.data import world_corpus

    rows = world_corpus.name_listing_rows(world(), n, seed=world().config.seed + 99)
    outs = Gen(model, tok, "base")([r["messages"][:-1] for r in rows], 24)
    want = [r["messages"][-1]["content"] for r in rows]
    return {"list_exact": round(100 * sum(o["text"] == w for o, w in zip(outs, want)) / n, 1),
            "first_name": round(100 * sum(o["text"].split("\n")[0] == w.split("\n")[0] for o, w in zip(outs, want)) / n, 1)}


def main(argv=None) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline import storage, tables

    p = common.base_parser(__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/quickstart", help="a finished quickstart's --out")
    p.add_argument("--variants", default="1e-2:500,3e-3:e10,1e-3:e10,3e-3:e30", help="LR:STEPS or LR:eEPOCHS, comma-separated")
    p.add_argument("--sets", default="S_D-T,S_D-R", help="S_D-T, S_D-R, or gold-<split> (gold decompositions of a world split)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--test-per-family", type=int, default=70)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--pretrain-base", default="", help="ROWS:STEPS:LR: pretrain a new students' base from the run's initial "
                   "student (world_corpus.name_listing_rows) instead of using the run's")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = common.Report(NAME + args.tag, args, "probe_students: fine-tuning schedules of the decomposer students")
    report.command = " ".join(["python -m benchmarks." + NAME] + list(sys.argv[1:] if argv is None else argv))
    base_dir, teacher_dir = os.path.join(args.run, "student_base", "model"), os.path.join(args.run, "teacher", "model")
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = Gen(AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval(), tok, "teacher")
    test = [r for r in tables.read_rows(storage.join(args.run, "prepare", "data")) if r["split"] == "test"]
    rows = sample_rows([_Q(r) for r in test], args.test_per_family, seed=1)
    if args.pretrain_base:
        base_dir = pretrain_base(args.run, tok, *args.pretrain_base.split(":"))
    load = lambda: AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)  # noqa: E731
    results: dict[str, Any] = {"run": args.run, "test_questions": len(rows), "base_listing": listing_accuracy(load().eval(), tok),
                               "base": measure("base", load().eval(), tok, teacher, rows)}
    print(f"  base lists names: {results['base_listing']}", flush=True)
    for set_name in args.sets.split(","):
        data = training_set(args.run, set_name)
        for variant in args.variants.split(","):
            lr, length = parse_variant(variant)
            steps = steps_of(length, len(data), args.batch)
            model = load()
            trained = train(model, tok, data, Schedule(steps, args.batch, 256, lr), 0, None, f"{set_name} {variant}")
            results[f"{set_name} {variant}"] = {"rows": len(data), "steps": steps, "lr": lr, "train_s": trained["train_wall_s"],
                                                "epochs": trained["epochs"], "loss": trained["final_loss"],
                                                **measure(f"{set_name} {variant}", model.eval(), tok, teacher, rows)}
    notes = (f"Students' base ({args.pretrain_base or 'the run' + chr(39) + 's'}) on 100 held-out name-listing rows: "
             f"{results['base_listing']} (% exact: the whole list, its first name). "
             f"Scores on {len(rows)} test questions ({args.test_per_family} per family), in %.")
    report.write(results, render_table(results), notes, params=vars(args))
    return 0


def pretrain_base(run: str, tok, rows: str, steps: str, lr: str) -> str:
    """A new students' base: the run's initial student trained on the name-listing corpus; its directory."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.data import world_corpus

    model = AutoModelForCausalLM.from_pretrained(os.path.join(run, "checkpoints", "student_base-base_model"), dtype=torch.float32)
    corpus = world_corpus.name_listing_rows(world(), int(rows), seed=world().config.seed)
    train(model, tok, corpus, Schedule(int(steps), 32, 256, float(lr)), 0, None, "base")
    out = common.scratch(NAME + "-base")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


class _Q:
    """A prepared row seen as the world's question (what sample_rows reads)."""

    def __init__(self, row: dict) -> None:
        self.row, self.dataset = row, row["dataset"]

    def to_row(self) -> dict:
        return self.row


def render_table(results: dict[str, Any]) -> str:
    runs = {k: v for k, v in results.items() if isinstance(v, dict) and "families" in v}
    fams = sorted(next(iter(runs.values()))["families"])
    head = ["student", "rows", "steps", "epochs", "lr", "train s", "loss"] + [
        f"{f.split('_')[1]} {m}" for f in fams for m in ("acc", "decomp EM", "names copied")]
    body = [[name, v.get("rows", ""), v.get("steps", ""), v.get("epochs", ""), v.get("lr", ""), v.get("train_s", ""), v.get("loss", "")]
            + [v["families"][f][m] for f in fams for m in ("acc", "decomp_em", "names_copied")] for name, v in runs.items()]
    return common.md_table(head, body)


if __name__ == "__main__":
    sys.exit(main())
