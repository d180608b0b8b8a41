"""The quickstart teacher's learning curve: how many steps its two-stage accuracy needs.

    python -m benchmarks.probe_teacher_steps [--steps 1500,2000,2500,3000,4000,6000] [--quick]

The teacher is the quickstart's longest stage. Each step count here is a *whole* schedule (warm-up and
cosine decay to that many steps, not a checkpoint of a longer run), trained by the quickstart's own
teacher job (its world, corpus, word tokenizer, size, batch and learning rate), two jobs side by side
as the quickstart runs them. Each teacher is then measured as the quickstart's report measures it,
in-process (greedy, zero-shot prompts): teacher QD + teacher QA (static) and the single-stage
teacher (direct) on every ``test`` question, and static on the ``train`` questions (the ones whose
solved decompositions rejection sampling keeps for S_D-R).

Answers: the fewest steps whose teacher is as good as the longest schedule's (results/probe_teacher_steps.md).
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.bench_train_fixed_cost import run_job  # noqa: E402

NAME = "probe_teacher_steps"
FAMILIES = ("world_chain", "world_compare", "world_numeric")
# (split, mode) measured for each teacher
MEASURES = (("test", "static"), ("test", "direct"), ("train", "static"))


def teacher_with_steps(teacher, steps: int, root: str):
    """The quickstart's teacher job with a whole schedule of ``steps`` steps, in its own folders."""
    from pipeline.config import updated

    name = f"teacher-{steps}"
    return updated(teacher, {"schedule": {"max_steps": steps, "checkpoint_every_steps": max(100, steps // 4)},
                             "failure": {"max_failures": 0},
                             "output": {"dir": os.path.join(root, name), "run_name": name,
                                        "checkpoint_dir": os.path.join(root, "checkpoints")}})


def accuracy(qs, model_dir: str, split: str, mode: str, out_dir: str) -> dict[str, float]:
    """Per-family score (%) of ``model_dir`` as decomposer and solver over ``split`` (in-process), as the
    quickstart's report scores it (``evaluation.evaluate``: each family's metric, a quarantined row wrong)."""
    from pipeline import evaluation, inference
    from pipeline.backends.hf_local import HFBackendConfig
    from pipeline.config import updated
    from pipeline.quickstart import Setting

    hf = HFBackendConfig(model=model_dir, batch_size=64)
    setting = Setting(f"{split} {mode}", os.path.basename(out_dir), mode, hf if mode != "direct" else None, hf,
                      ("teacher", "teacher"))
    cfg = updated(qs.infer_config(setting), {"input": {"splits": [split]}, "output": {"dir": out_dir},
                                             "pool": {"max_actors": 1, "num_cpus": 1}})
    inference.run(cfg)
    report = evaluation.evaluate(evaluation.EvaluateConfig(
        settings=[evaluation.SettingRef(name=setting.name, predictions=out_dir)], output={"dir": out_dir + "-report"}))
    return {row["dataset"]: round(100 * row["score"], 1) for row in report["table"]}


def figure(results: dict[str, Any]):
    plt = common.plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    steps = sorted(int(k) for k in results)
    for family in FAMILIES:
        ys = [results[str(s)]["test static"].get(family) for s in steps]
        ax.plot(steps, ys, marker="o", label=f"{family} (test, static)")
    ax.set_xlabel("teacher steps (whole schedule, batch 32)")
    ax.set_ylabel("accuracy %")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def main(argv: Optional[list[str]] = None) -> int:
    from pipeline.quickstart import Quickstart, QuickstartConfig

    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", default=None, help="comma-separated step counts (default 1500,2000,2500,3000,4000,6000)")
    args = p.parse_args(argv)
    rep = common.Report(NAME, args, "The quickstart teacher's learning curve (whole schedules)")
    steps = [int(s) for s in (args.steps or ("300,600" if rep.quick else "1500,2000,2500,3000,4000,6000")).split(",")]
    root = common.scratch(NAME)
    qs = Quickstart(QuickstartConfig(out=os.path.join(root, "run")))
    common.shutdown_ray()
    common.start_local_ray(2)
    qs.prepare()
    teacher = qs.teacher_job()
    results: dict[str, Any] = {}
    try:
        with ThreadPoolExecutor(2) as pool:  # two single-worker jobs at a time, as the quickstart runs them
            jobs = dict(zip(steps, pool.map(lambda s: run_job(teacher_with_steps(teacher, s, root)), steps)))
        for s in steps:
            model = os.path.join(root, f"teacher-{s}")
            r = results[str(s)] = {"loop_s": jobs[s]["loop_s"], "job_s": jobs[s]["wall_s"]}
            for split, mode in MEASURES:
                r[f"{split} {mode}"] = accuracy(qs, model, split, mode, os.path.join(root, "eval", f"{s}-{split}-{mode}"))
            print(f"{s} steps: {r}", flush=True)
    finally:
        common.shutdown_ray()
    rows = []
    for s in steps:
        r = results[str(s)]
        cells = [r[f"{split} {mode}"].get(f) for split, mode in MEASURES[:2] for f in FAMILIES]
        cells += [r["train static"].get(f) for f in ("world_chain", "world_numeric")]
        cells = ["-" if c is None else f"{c:.1f}" for c in cells]
        rows.append([s, f"{r['loop_s']:.0f}", f"{r['job_s']:.0f}", *cells])
    headers = ["steps", "loop s", "job s", *[f"{mode} {f.split('_')[1]}" for _, mode in MEASURES[:2] for f in FAMILIES],
               "train static chain", "train static numeric"]
    rep.write(results, common.md_table(headers, rows), figure=figure(results),
              params={"steps": steps, "measures": MEASURES})
    return 0


if __name__ == "__main__":
    sys.exit(main())
