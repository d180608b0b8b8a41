"""The whole pipeline on the embedded default: what ``divconq quickstart`` runs, step by step.

A recipe over the jobs' library calls: it loads the shipped configs (``configs/*.yaml``, the same a
user would run by hand) once, derives each step's config from them with :func:`pipeline.config.updated`
(output paths under one directory), and calls each job's ``run(cfg)``. Offline and CPU-only: the
reference teacher replays GSM8K socratic decompositions, the oracle solver grades decompositions,
and the student is a tiny Llama built and trained locally.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import httpx
from pydantic import Field

from pipeline import evaluation, generation, inference, preparation, selection, solving, storage, tables
from pipeline.cluster import init_ray
from pipeline.backends import HFBackendConfig, OpenAIBackendConfig, ReferenceBackendConfig
from pipeline.config import RayConfig, Strict, load_config, updated
from pipeline.data import SourceConfig
from pipeline.evaluation import EvaluateConfig, SettingRef
from pipeline.generation import GenerateConfig
from pipeline.inference import InferConfig
from pipeline.manifest import Manifest
from pipeline.preparation import PrepareConfig
from pipeline.selection import SelectConfig
from pipeline.serving.app import shutdown, start
from pipeline.serving.config import ServeConfig
from pipeline.solving import SolveConfig
from pipeline.tiny_models import build_tiny_model, corpus_texts
from training import job as training_job
from training.config import TrainConfig

log = logging.getLogger("divconq.quickstart")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDENT_NAME = {"decomposer_all": "S_D-T", "decomposer_correct": "S_D-R"}
DEMO_QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have?"
REPORT_TITLE = "divconq quickstart (offline reference teacher, oracle solver, tiny students)"


class QuickstartConfig(Strict):
    out: str = Field("runs/quickstart", description="Output directory (local or s3://).")
    small: bool = Field(False, description="A smaller, faster run (CI).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port for the served app (127.0.0.1).")
    ray: RayConfig = Field(default_factory=RayConfig)


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


@dataclass
class Shipped:
    """The shipped job configs, loaded once; every step's config is one of them, updated."""

    prepare: PrepareConfig
    generate: GenerateConfig
    solve: SolveConfig
    select: SelectConfig
    train: TrainConfig
    serve: ServeConfig
    infer: InferConfig
    evaluate: EvaluateConfig

    @classmethod
    def load(cls) -> "Shipped":
        models = {"prepare": PrepareConfig, "generate": GenerateConfig, "solve": SolveConfig, "select": SelectConfig,
                  "train": TrainConfig, "serve": ServeConfig, "infer": InferConfig, "evaluate": EvaluateConfig}
        return cls(**{name: load_config(model, cfg_path(name)) for name, model in models.items()})


class Quickstart:
    """prepare -> generate -> solve -> select -> train -> serve -> infer -> evaluate, into ``cfg.out``."""

    def __init__(self, cfg: QuickstartConfig) -> None:
        self.cfg = cfg
        self.plan = Plan.of(cfg.small)
        self.out = storage.localize(cfg.out) if storage.is_local(cfg.out) else cfg.out
        self.shipped = Shipped.load()
        self.timings: dict[str, float] = {}
        self.test_input = {"path": self.p("prepare"), "datasets": ["gsm8k"], "splits": ["test"]}

    def p(self, *parts: str) -> str:
        return storage.join(self.out, *parts)

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        log.info("==== quickstart: %s ====", name)
        t0 = time.time()
        result = fn()
        self.timings[name] = round(time.time() - t0, 1)
        return result

    # ------------------------------------------------------------ steps
    def build_training_sets(self) -> None:
        """prepare -> generate -> solve -> select."""
        plan, s = self.plan, self.shipped
        sources = [SourceConfig(dataset="gsm8k", path=samples("gsm8k", "train_socratic.jsonl"), split="train", limit=plan.train_questions),
                   SourceConfig(dataset="gsm8k", path=samples("gsm8k", "test_socratic.jsonl"), split="test", limit=plan.test_questions)]
        self.step("prepare", lambda: preparation.run(updated(s.prepare, {"sources": sources, "output": {"dir": self.p("prepare")}})))
        self.step("generate", lambda: generation.run(updated(s.generate, {
            "input": {"path": self.p("prepare")}, "output": {"dir": self.p("generate")}, "sampling": {"n": plan.samples_per_question}})))
        self.step("solve", lambda: solving.run(updated(s.solve, {"input": {"path": self.p("generate")}, "output": {"dir": self.p("solve")}})))
        self.step("select", lambda: selection.run(updated(s.select, {
            "input": {"path": self.p("solve")}, "output": {"dir": self.p("select")}, "variants": list(plan.variants)})))

    def train_students(self) -> None:
        for variant in self.plan.variants:
            cfg = updated(self.shipped.train, {
                "data": {"train_path": self.p("select", variant, "train"), "validation_path": self.p("select", variant, "validation")},
                "output": {"dir": self.p("train", variant, "model"), "checkpoint_dir": self.p("train", "checkpoints"), "run_name": variant},
                "schedule": {"max_steps": self.plan.train_steps}})
            self.step(f"train {STUDENT_NAME[variant]}", lambda c=cfg: training_job.run(c))

    def infer(self, name: str, folder: str, decomposer: Any, mode: str = "static", **extra: Any) -> None:
        cfg = updated(self.shipped.infer, {"input": self.test_input, "decomposer": decomposer, "mode": mode, "setting": name,
                                           "output": {"dir": self.p("infer", folder)}, **extra})
        self.step(f"infer: {name}", lambda: inference.run(cfg))

    def serve_student(self) -> None:
        """Serve the S_D-R student (+ an untrained tiny solver, to show /v1/solve end to end) and run
        infer through the served app."""
        solver_dir = self.p("models", "tiny-solver")
        if not storage.exists(storage.join(solver_dir, "config.json")):
            build_tiny_model(solver_dir, corpus_texts(tables.iter_rows(self.p("prepare"))), vocab_size=1024)
        serve_cfg = updated(self.shipped.serve, {"decomposer": {"model": self.p("train", "decomposer_correct", "model")},
                                                 "solver": {"backend": {"model": solver_dir}},
                                                 "http": {"port": self.cfg.port}, "blocking": False})
        t0 = time.time()
        base_url = start(serve_cfg)
        self.timings["serve (start)"] = round(time.time() - t0, 1)
        try:
            demo = httpx.post(base_url + "/v1/solve", json={"question": DEMO_QUESTION}, timeout=120).json()
            log.info("served /v1/solve -> %s", json.dumps(demo)[:400])
            storage.write_json(self.p("serve_demo.json"), demo)
            served = OpenAIBackendConfig(base_url=base_url + "/v1", model=serve_cfg.decomposer.served_name, api_key_env=None,
                                         concurrency=8)
            self.infer("student S_D-R (served) + oracle", "student-sd_r-served", served)
        finally:
            shutdown()

    def baseline_settings(self) -> list[tuple[str, str, Any, str, dict[str, Any]]]:
        """(name, folder, decomposer, mode, extra) of every setting inferred in-process."""
        base_model = self.p("train", "checkpoints", "decomposer_correct-base_model")
        settings = [("teacher QD + oracle (static)", "teacher-static", ReferenceBackendConfig(), "static", {"method": {"decomposer_few_shot": True}}),
                    ("teacher QD + oracle (dynamic)", "teacher-dynamic", ReferenceBackendConfig(), "dynamic", {}),
                    ("untrained tiny QD + oracle", "untrained", HFBackendConfig(model=base_model, batch_size=16), "static", {})]
        if "decomposer_all" in self.plan.variants:
            settings.append(("student S_D-T + oracle", "student-sd_t",
                             HFBackendConfig(model=self.p("train", "decomposer_all", "model"), batch_size=16), "static", {}))
        return settings

    def evaluate(self, settings: list[tuple[str, str, Any, str, dict[str, Any]]]) -> str:
        refs = [("student S_D-R (served) + oracle", "student-sd_r-served")] + [(n, f) for n, f, *_ in settings]
        cfg = updated(self.shipped.evaluate, {"settings": [SettingRef(name=n, predictions=self.p("infer", f)) for n, f in refs],
                                              "output": {"dir": self.p("report")}, "title": REPORT_TITLE})
        self.step("evaluate", lambda: evaluation.run(cfg))
        return self.p("report", "report.md")

    def run(self) -> Manifest:
        """Run every stage into ``cfg.out``; the manifest's ``report`` is the evaluation report's path."""
        started = time.time()
        init_ray(self.cfg.ray)
        self.build_training_sets()
        self.train_students()
        self.serve_student()
        settings = self.baseline_settings()
        for name, folder, decomposer, mode, extra in settings:
            self.infer(name, folder, decomposer, mode, **extra)
        report = self.evaluate(settings)
        storage.write_json(self.p("timings.json"), self.timings)
        log.info("quickstart timings (s): %s", self.timings)
        return Manifest.of("quickstart", self.cfg, inputs={"configs": [cfg_path(n) for n in Shipped.__dataclass_fields__]},
                           counts={"steps": len(self.timings)}, started_at=started,
                           extra={"report": report, "timings": self.timings})


def run(cfg: QuickstartConfig) -> Manifest:
    """The quickstart job: the whole pipeline on the embedded default (see :class:`Quickstart`)."""
    return Quickstart(cfg).run()
