"""What a students' base must be pretrained on for a decomposer student to copy the question's names.

    python -m benchmarks.probe_student_base [--bases none:0,echo:800,listing:800,frames:800] [--rows 0,120]

Plain PyTorch, no Ray, on the quickstart's world (:func:`pipeline.quickstart.Plan`): the world
tokenizer, a student-sized tiny Llama (48 wide, 2 layers), pretrained ``STEPS`` steps (lr 1e-2,
batch 32) on one of these corpora of 20,000 rows, then fine-tuned 600 steps at lr 3e-3 (the
quickstart's decomposer schedule) on gold decompositions of the ``train`` split (all 420, the size
of S_D-T's set, or a seeded sample of ``--rows``, the size of S_D-R's) and measured on 70 test
questions per family: the share of decompositions exactly the gold ones. Gold decompositions stand
in for the teacher's, so that the probe measures the base, not the teacher.

* ``none``: no pretraining (a student from random weights).
* ``echo``: the user turn's names echoed ("A. B." -> "A. B.").
* ``listing``: a jumble of the world's words with one to three names -> the names, one numbered line each.
* ``frames``: the same, each listed name after one to three random words
  (:func:`pipeline.data.world_corpus.name_listing_rows`, the quickstart's).

Answers: which base makes the copy skill survive fine-tuning (results/probe_student_base.md).
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.probe_world import (Gen, Schedule, Size, build_tokenizer, decompose, exact_decomposition,  # noqa: E402
                                    new_model, sample_rows, train)

NAME = "probe_student_base"
Messages = list[dict[str, str]]


def corpora(world) -> dict[str, Callable[[int, int], list[dict[str, Any]]]]:
    """Each base corpus: ``(rows, seed) -> rows`` with ``messages``."""
    from pipeline.data import world_corpus as C
    from pipeline.parsing import format_subquestions

    names = world.names()

    def chat(user: str, answer: str) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}

    def echo(n: int, seed: int) -> list[dict[str, Any]]:
        rng = random.Random(seed)
        texts = [" ".join(f"{x}." for x in rng.sample(names, rng.randint(1, 4))) for _ in range(n)]
        return [chat(t, t) for t in texts]

    def listing(n: int, seed: int) -> list[dict[str, Any]]:
        rows = C.name_listing_rows(world, n, seed)  # the same jumble; bare names as the lines
        return [chat(r["messages"][0]["content"], format_subquestions(_listed(r["messages"][0]["content"], names)))
                for r in rows]

    return {"echo": echo, "listing": listing, "frames": lambda n, seed: C.name_listing_rows(world, n, seed)}


def _listed(text: str, names: list[str]) -> list[str]:
    """The names of ``text`` in order of appearance."""
    found = [(text.find(f" {x} "), x) for x in names if f" {x} " in f" {text} ".replace("?", " ")]
    return [x for _, x in sorted(found)]


def decomposition_rows(world, n: int) -> list[dict[str, Any]]:
    """Gold decompositions of the ``train`` split as chat rows (all, or a seeded sample of ``n``)."""
    from pipeline.data import world_corpus as C

    rows = C.gold_decompositions(world, "train")
    return random.Random(3).sample(rows, n) if n else rows


def measure(model, tok, test: list[dict]) -> dict[str, float]:
    decs = decompose(Gen(model, tok, "student"), test, lambda m: m)
    out = {}
    for fam in sorted({r["dataset"] for r in test}):
        idx = [i for i, r in enumerate(test) if r["dataset"] == fam]
        out[fam] = round(100 * sum(exact_decomposition(decs[i]["subquestions"], test[i]["gold_subquestions"]) for i in idx)
                         / len(idx), 1)
    return out


def main(argv=None) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data import world as W
    from pipeline.quickstart import Plan

    p = common.base_parser(__doc__.split("\n")[0])
    p.add_argument("--bases", default="none:0,echo:800,listing:800,frames:800", help="CORPUS:STEPS, comma-separated")
    p.add_argument("--rows", default="0,120", help="fine-tuning rows (0: all 420 train decompositions)")
    p.add_argument("--test-per-family", type=int, default=70)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    report = common.Report(NAME, args, "probe_student_base: what the students' base must learn for a student to copy names")
    report.command = " ".join(["python -m benchmarks." + NAME] + list(sys.argv[1:] if argv is None else argv))
    plan = Plan.of(False)
    world = W.generate(plan.world)
    tok_dir = build_tokenizer(world, common.scratch(NAME + "-tok"))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    test = sample_rows(world.questions["test"], args.test_per_family, seed=1)
    size = Size(plan.student_base.hidden_size, plan.student_base.num_layers, plan.student_base.num_heads)
    results: dict[str, Any] = {}
    for base in args.bases.split(","):
        corpus, steps = base.split(":")
        base_dir = common.scratch(f"{NAME}-{corpus}-{steps}")
        model = new_model(tok_dir, size, base_dir, 0)
        pre = train(model, tok, corpora(world)[corpus](plan.name_rows, 7), Schedule(int(steps), 32, 256, 1e-2), label=base) \
            if corpus != "none" else {"final_loss": None, "train_wall_s": 0.0}
        model.save_pretrained(base_dir)
        for n in [int(x) for x in args.rows.split(",")]:
            student = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            data = decomposition_rows(world, n)
            ft = train(student, tok, data, Schedule(plan.decomposer.steps, 32, 256, plan.decomposer.lr), label=f"{base} {n}")
            results[f"{base} / {len(data)} rows"] = {"base": corpus, "base_steps": int(steps), "base_loss": pre["final_loss"],
                                                     "base_s": pre["train_wall_s"], "rows": len(data),
                                                     "loss": ft["final_loss"], "exact": measure(student.eval(), tok, test)}
            print(f"  {base} / {len(data)} rows: {results[f'{base} / {len(data)} rows']['exact']}", flush=True)
    notes = (f"Exact decompositions (all subquestions equal the gold ones) of {len(test)} test questions "
             f"({args.test_per_family} per family), in %; fine-tuned {plan.decomposer.steps} steps at lr {plan.decomposer.lr} "
             "on gold decompositions of the train split. `compare` is the held-out family (no train questions): "
             "0 is expected there.")
    report.write(results, render_table(results), notes, params=vars(args))
    return 0


def render_table(results: dict[str, Any]) -> str:
    fams = sorted(next(iter(results.values()))["exact"])
    head = ["base / fine-tuning set", "base steps", "base s", "base loss", "fine-tune loss"] + [f.split("_")[1] for f in fams]
    body = [[k, v["base_steps"], v["base_s"], v["base_loss"], v["loss"]] + [v["exact"][f] for f in fams] for k, v in results.items()]
    return common.md_table(head, body)


if __name__ == "__main__":
    sys.exit(main())
