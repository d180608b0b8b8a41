"""The whole pipeline on the embedded default: what ``divconq quickstart`` runs, step by step.

Each step calls the same job entry point, with the same YAML config from ``configs/``, that a
user would run by hand, with output paths under one directory. Offline and CPU-only: the
reference teacher replays GSM8K socratic decompositions, the oracle solver grades
decompositions, and the student is a tiny Llama built and trained locally.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

from pipeline import storage

log = logging.getLogger("divconq.quickstart")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg_path(name: str) -> str:
    return os.path.join(REPO, "configs", f"{name}.yaml")


def samples(*parts: str) -> str:
    return os.path.join(REPO, "data", "samples", *parts)


@dataclass
class Plan:
    """How big the run is. ``small`` is the CI-sized smoke run."""

    train_questions: int
    test_questions: int
    samples_per_question: int
    train_steps: int
    variants: tuple[str, ...]

    @classmethod
    def of(cls, small: bool) -> "Plan":
        if small:
            return cls(train_questions=160, test_questions=16, samples_per_question=2, train_steps=30, variants=("decomposer_correct",))
        return cls(train_questions=1000, test_questions=100, samples_per_question=2, train_steps=400,
                   variants=("decomposer_all", "decomposer_correct"))


STUDENT_NAME = {"decomposer_all": "S_D-T", "decomposer_correct": "S_D-R"}


def _step(name: str, fn: Callable[[], int | None], timings: dict[str, float]) -> None:
    log.info("==== quickstart: %s ====", name)
    t0 = time.time()
    rc = fn()
    timings[name] = round(time.time() - t0, 1)
    if rc:
        raise RuntimeError(f"quickstart step {name!r} failed (exit {rc}); see the log above")


def run(out: str, small: bool = False, port: int = 8000) -> str:
    """Run every stage into ``out``; return the path of the evaluation report."""
    from pipeline.jobs import init_ray
    from pipeline.config import RayConfig
    from ray_jobs import evaluate, generate, infer, prepare, select, solve, train

    plan = Plan.of(small)
    out = storage.localize(out) if storage.is_local(out) else out
    p = lambda *parts: storage.join(out, *parts)  # noqa: E731
    timings: dict[str, float] = {}
    init_ray(RayConfig())

    prep_sources = (
        "sources=["
        f"{{dataset: gsm8k, path: '{samples('gsm8k', 'train_socratic.jsonl')}', split: train, limit: {plan.train_questions}}}, "
        f"{{dataset: gsm8k, path: '{samples('gsm8k', 'test_socratic.jsonl')}', split: test, limit: {plan.test_questions}}}]"
    )
    _step("prepare", lambda: prepare.main(["--config", cfg_path("prepare"), prep_sources, f"output.dir={p('prepare')}"]), timings)
    _step("generate", lambda: generate.main(["--config", cfg_path("generate"), f"input.path={p('prepare')}",
                                             f"output.dir={p('generate')}", f"sampling.n={plan.samples_per_question}"]), timings)
    _step("solve", lambda: solve.main(["--config", cfg_path("solve"), f"input.path={p('generate')}", f"output.dir={p('solve')}"]), timings)
    _step("select", lambda: select.main(["--config", cfg_path("select"), f"input.path={p('solve')}", f"output.dir={p('select')}",
                                         "variants=[" + ", ".join(plan.variants) + "]"]), timings)
    for variant in plan.variants:
        _step(f"train {STUDENT_NAME[variant]}", lambda v=variant: train.main([
            "--config", cfg_path("train"), f"data.train_path={p('select', v, 'train')}",
            f"data.validation_path={p('select', v, 'validation')}", f"output.dir={p('train', v, 'model')}",
            f"output.checkpoint_dir={p('train', 'checkpoints')}", f"output.run_name={v}",
            f"schedule.max_steps={plan.train_steps}"]), timings)
    student = p("train", "decomposer_correct", "model")
    base_model = p("train", "checkpoints", "decomposer_correct-base_model")

    # Serve the S_D-R student (+ an untrained tiny solver, to show /v1/solve end to end).
    from pipeline.serving.app import load_serve_config, shutdown, start
    from pipeline.tiny_models import build_tiny_model, corpus_texts
    from pipeline import tables

    solver_dir = p("models", "tiny-solver")
    if not storage.exists(storage.join(solver_dir, "config.json")):
        build_tiny_model(solver_dir, corpus_texts(tables.iter_rows(p("prepare"))), vocab_size=1024)
    serve_cfg = load_serve_config(cfg_path("serve"), [f"decomposer.model={student}", f"solver.backend.model={solver_dir}",
                                                      f"http.port={port}", "blocking=false"])
    t0 = time.time()
    base_url = start(serve_cfg)
    timings["serve (start)"] = round(time.time() - t0, 1)
    try:
        import httpx

        demo = httpx.post(base_url + "/v1/solve", json={"question": "Tom has 3 apples and buys 5 more. How many apples does he have?"},
                          timeout=120).json()
        log.info("served /v1/solve -> %s", json.dumps(demo)[:400])
        storage.write_json(p("serve_demo.json"), demo)

        test = ["input.datasets=[gsm8k]", "input.splits=[test]", f"input.path={p('prepare')}"]
        served = ("decomposer={type: openai, base_url: '" + base_url + "/v1', model: " + serve_cfg.decomposer.served_name +
                  ", api_key_env: null, concurrency: 8}")
        _step("infer: student S_D-R via serve", lambda: infer.main(["--config", cfg_path("infer"), *test, served,
                                                                     "setting=student S_D-R (served) + oracle",
                                                                     f"output.dir={p('infer', 'student-sd_r-served')}"]), timings)
    finally:
        shutdown()

    settings = [("teacher QD + oracle (static)", "teacher-static", ["decomposer={type: reference}", "decomposer_few_shot=true"], "static"),
                ("teacher QD + oracle (dynamic)", "teacher-dynamic", ["decomposer={type: reference}"], "dynamic"),
                ("untrained tiny QD + oracle", "untrained", [f"decomposer={{type: hf, model: '{base_model}', batch_size: 16}}"], "static")]
    if "decomposer_all" in plan.variants:
        settings.append(("student S_D-T + oracle", "student-sd_t",
                         [f"decomposer={{type: hf, model: '{p('train', 'decomposer_all', 'model')}', batch_size: 16}}"], "static"))
    for name, folder, extra, mode in settings:
        _step(f"infer: {name}", lambda n=name, f=folder, e=extra, m=mode: infer.main(
            ["--config", cfg_path("infer"), *test, *e, f"mode={m}", f"setting={n}", f"output.dir={p('infer', f)}"]), timings)

    refs = [("student S_D-R (served) + oracle", "student-sd_r-served")] + [(n, f) for n, f, _, _ in settings]
    setting_list = "settings=[" + ", ".join(f"{{name: '{n}', predictions: '{p('infer', f)}'}}" for n, f in refs) + "]"
    _step("evaluate", lambda: evaluate.main(["--config", cfg_path("evaluate"), setting_list, f"output.dir={p('report')}",
                                             "title=divconq quickstart (offline reference teacher, oracle solver, tiny students)"]), timings)
    storage.write_json(p("timings.json"), timings)
    report = p("report", "report.md")
    log.info("quickstart timings (s): %s", timings)
    return report
