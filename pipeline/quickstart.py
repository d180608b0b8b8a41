"""The embedded miniature of the paper's experiment: what ``divconq quickstart`` runs.

Every model in it is learned here, from the question text, on a CPU (issue 12; the paper's
Tables 1, 3 and 6 in small). A recipe over the jobs' ``run(cfg)``: it loads the shipped configs
(``configs/*.yaml``, the ones a user runs by hand) once, derives each step's config with
:func:`pipeline.config.updated`, and calls the job. The stages:

1. **prepare** the generated world (:mod:`pipeline.data.world`): its ``teacher``, ``train`` and
   ``test`` questions, three families (``world_chain``, ``world_numeric`` and the held-out
   ``world_compare``).
2. **teacher** and **students' base**, side by side (two single-worker ``train`` jobs sharing the
   world's word-level tokenizer, written first): the teacher, a tiny Llama, learns the world's
   single-hop facts, subtraction drills and worked examples of the ``teacher`` questions
   (:mod:`pipeline.data.world_corpus`): its knowledge and its skills; the students' base, smaller,
   only learns to list the names a text mentions.
3. **serve** the teacher (``divconq serve``: decomposer and solver; started once, it stays up until the
   last setting) and run **generate** and **solve** on the ``train`` questions over HTTP with the
   ``openai`` backend, as against any OpenAI-compatible teacher; **select** keeps the paper's four
   training sets.
4. **students**: the four students (S_D-T, S_D-R, S_E-T, S_E-A), fine-tuned from the students'
   base, dealt over as many side-by-side ``train`` jobs as there are CPUs for; the jobs start when
   the base is done (their workers up while the teacher still trains) and train once select has
   written their sets; the product's app (S_D-R with the teacher as solver) starts as soon as
   S_D-R's job ends, beside the teacher's.
5. **infer** every setting of the paper's tables on the ``test`` questions (students in the
   infer actors, the teacher over HTTP, every setting's teacher calls through one response cache):
   the settings that need no student beside steps 3-4, the students' settings after them, beside
   infer through the product's app; **evaluate** writes the report (scores with 95 % intervals,
   tokens and cost per question by model size).

Gold answers are used only where the paper uses them: scoring, rejection sampling (S_D-R)
and S_E-A's final answers.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import httpx
from pydantic import Field

from pipeline import evaluation, generation, inference, preparation, selection, solving, storage, tiny_models
from pipeline.backends import HFBackendConfig, OpenAIBackendConfig
from pipeline.backends.hf_local import weights_digest
from pipeline.cluster import cluster_cpus, init_ray, shutdown_ray
from pipeline.config import ModelPrice, PricingConfig, RayConfig, Strict, load_config, updated
from pipeline.data import SourceConfig
from pipeline.data import world as W
from pipeline.data import world_corpus
from pipeline.evaluation import EvaluateConfig, SettingRef
from pipeline.generation import GenerateConfig
from pipeline.inference import InferConfig
from pipeline.manifest import Manifest
from pipeline.preparation import PrepareConfig
from pipeline.selection import SelectConfig
from pipeline.serving.app import deploy, shutdown, start, wait_ready
from pipeline.serving.config import ServeConfig
from pipeline.solving import SolveConfig
from training import job as training_job
from training.config import TrainConfig

log = logging.getLogger("divconq.quickstart")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDENTS = {"S_D-T": "decomposer_all", "S_D-R": "decomposer_correct", "S_E-T": "solver_teacher", "S_E-A": "solver_gold"}
REPORT_TITLE = "divconq quickstart: the paper's experiment in miniature (a learned teacher, four distilled students)"
# Served model names: each role of each served model has its own (the app routes chat requests by it).
TEACHER_QD, TEACHER_QA, STUDENT_QD = "teacher-qd", "teacher-qa", "student-sd-r"
PRODUCT_APP = "divconq-product"  # the product's Serve app, beside the teacher's (``divconq``)
STUDENT_JOB_CPUS = 0.01  # what a students' train job reserves per worker (start_students)


class SizePrices(Strict):
    """Price per 1M tokens (prompt and completion alike) of each model size, for the cost column."""

    teacher_per_1m: float = Field(1.0, ge=0.0, description="The teacher's size (think: a 70B model's price).")
    student_per_1m: float = Field(0.1, ge=0.0, description="The students' size (think: a 7B model's price).")


class QuickstartConfig(Strict):
    out: str = Field("runs/quickstart", description="Output directory (local or s3://).")
    small: bool = Field(False, description="A smaller, faster run (CI): a smaller world, fewer steps.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port for the served app (127.0.0.1).")
    prices: SizePrices = Field(default_factory=SizePrices)
    ray: RayConfig = Field(default_factory=RayConfig)


@dataclass(frozen=True)
class ModelSpec:
    """A model trained from scratch here (the teacher, the students' base): its size and schedule."""

    hidden_size: int
    num_layers: int
    num_heads: int
    steps: int
    lr: float
    batch: int = 32  # rows per optimizer step (one worker)


@dataclass(frozen=True)
class FineTune:
    """A student's fine-tuning from the students' base (whose size it has)."""

    steps: int
    lr: float


@dataclass(frozen=True)
class Plan:
    """How big the run is: sized by the learning curves in benchmarks/results/probe_world.md."""

    world: W.WorldConfig
    teacher: ModelSpec
    student_base: ModelSpec
    decomposer: FineTune
    solver: FineTune
    samples_per_question: int = 2
    temperature: float = 0.7
    repeat: tuple[tuple[str, int], ...] = (("fact", 6),)
    dynamic_every: int = 4
    name_rows: int = 20000  # the students' base pretraining rows (world_corpus.name_listing_rows)

    @classmethod
    def of(cls, small: bool) -> "Plan":
        if small:
            world = W.WorldConfig(cities=8, last_names=12, companies=24, drills=200,
                                  questions={"teacher": {W.CHAIN: 24, W.NUMERIC: 24, W.COMPARE: 12},
                                             "train": {W.CHAIN: 24, W.NUMERIC: 24}, "test": {W.CHAIN: 12, W.NUMERIC: 12, W.COMPARE: 12}})
            return cls(world, ModelSpec(48, 2, 4, 300, 1e-2), ModelSpec(32, 1, 4, 20, 1e-2), FineTune(20, 3e-3), FineTune(20, 3e-3),
                       name_rows=640)
        # teacher: 3,000 steps, the fewest whose teacher is as good as 6,000 steps' (whole schedules; static two-stage
        # chain accuracy on the test questions: 2,000 and 2,500 steps 44 %, 3,000 76 %, 4,000 60 %, 6,000 57 %;
        # benchmarks/results/probe_teacher_steps.md). Students: 800 steps of name listing, then 600 steps at lr 3e-3
        # (benchmarks/results/probe_student_base.md: on 420 gold decompositions, 94-97 % of test questions decomposed
        # exactly, against 0-11 % from a base that echoes names or from none); the solver students get the decomposers'
        # schedule, so they lose on their own account
        return cls(W.WorldConfig(), ModelSpec(64, 2, 4, 3000, 1e-2), ModelSpec(48, 2, 4, 800, 1e-2), FineTune(600, 3e-3),
                   FineTune(600, 3e-3))


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


def cfg_path(name: str) -> str:
    return os.path.join(REPO, "configs", f"{name}.yaml")


@dataclass(frozen=True)
class Setting:
    """One row of the report: a system (mode, decomposer, solver) on the test questions."""

    name: str
    folder: str
    mode: str
    decomposer: Any
    solver: Any
    sizes: tuple[str, str]  # model size of (decomposer, solver), for the cost column
    # the run's response cache: the settings that share a teacher model reuse its greedy replies to identical
    # requests (teacher QD's decompositions, teacher QA's answers to identical subquestions); billed as computed
    shares_cache: bool = True
    student: Optional[str] = None  # the trained student it needs; None: it can run as soon as the teacher is served


class Quickstart:
    """prepare -> teacher -> generate -> solve -> select -> students -> infer -> serve -> evaluate."""

    def __init__(self, cfg: QuickstartConfig, progress: Optional[Callable[[str], None]] = None) -> None:
        self.cfg = cfg
        self.plan = Plan.of(cfg.small)
        self.out = storage.localize(cfg.out) if storage.is_local(cfg.out) else cfg.out
        self.shipped = Shipped.load()
        self.timings: dict[str, float] = {}
        self.product_url: Optional[str] = None  # the product's app, once started (train_then_serve_product)
        self._students: dict[str, Future] = {}  # the students' train jobs, once started (start_students)
        self.progress = progress or (lambda line: log.info("%s", line))

    def p(self, *parts: str) -> str:
        return storage.join(self.out, *parts)

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.time()
        self.progress(f"{name} ...")
        result = fn()
        self.timings[name] = round(time.time() - t0, 1)
        self.progress(f"{name}: done in {self.timings[name]:.0f} s{_counts(result)}")
        return result

    def steps_together(self, steps: dict[str, Callable[[], Any]], announce: bool = True) -> None:
        """Independent stages side by side, one line each as it starts and ends (``announce=False``: lanes of
        stages that announce themselves); the first failure is raised once all have ended."""
        if len(steps) <= 1:
            run = self.step if announce else (lambda name, fn: fn())
            for name, fn in steps.items():
                run(name, fn)
            return
        self.end_together(self.start_together(steps, announce))

    def start_together(self, steps: dict[str, Callable[[], Any]], announce: bool = True) -> dict[str, Future]:
        """Start ``steps`` side by side and return at once (:meth:`end_together` waits for them). Threads, because a
        Ray Train job's ``fit`` blocks its caller (Train supports ``fit`` from a thread other than the main one, as
        Tune runs it) and so does a Ray Data job's iteration: each thread only waits on its jobs."""
        run = self.step if announce else (lambda name, fn: fn())
        pool = ThreadPoolExecutor(max(1, len(steps)))
        futures = {name: pool.submit(run, name, fn) for name, fn in steps.items()}
        pool.shutdown(wait=False)  # takes no more steps; those submitted run on
        return futures

    def end_together(self, futures: dict[str, Future]) -> None:
        """Wait for steps of :meth:`start_together`; the first failure is raised once all have ended."""
        try:
            wait(futures.values())
        except BaseException:
            # Ctrl-C lands here: Train aborts a job on SIGINT only when its fit runs in the main thread, so
            # stop the jobs by leaving Ray (their controllers die with this driver), then let the threads end
            shutdown_ray()
            raise
        failed = [(name, f.exception()) for name, f in futures.items() if f.exception() is not None]
        for name, error in failed:
            self.progress(f"{name}: failed: {error}")
        if failed:
            raise failed[0][1]

    # ------------------------------------------------------------ data and teacher
    def prepare(self) -> None:
        world = self.plan.world
        sources = [SourceConfig(dataset=family, split=split, world=world)
                   for split in W.SPLITS for family in W.FAMILIES if world.questions.get(split, {}).get(family)]
        self.step("prepare", lambda: preparation.run(updated(self.shipped.prepare, {"sources": sources,
                                                                                     "output": {"dir": self.p("prepare")}})))

    def teacher_job(self) -> TrainConfig:
        """Write the teacher's corpus (facts, drills, worked ``teacher`` questions) and the world's tokenizer; the
        teacher's train job's config."""
        plan = self.plan
        rows = world_corpus.teacher_corpus(W.generate(plan.world), dynamic_every=plan.dynamic_every, repeat=dict(plan.repeat))
        corpus = world_corpus.write_corpus(self.p("teacher", "corpus"), rows)
        return self.train_config(plan.teacher, {"train_path": corpus, "validation_path": None},
                                 {"tokenizer_from": self.write_tokenizer(corpus)}, self.p("teacher", "model"), "teacher")

    def write_tokenizer(self, corpus: str) -> str:
        """The world's word tokenizer (from the teacher's corpus), written before any model so that the teacher
        and the students' base can train side by side; every model shares it, so every token figure is counted
        with one tokenizer."""
        from training.sft_data import corpus_from_rows, read_conversations  # lazy: imports torch (as training.job)

        dest = self.p("tokenizer")
        if not storage.exists(storage.join(dest, ".complete")):  # written last: a copy cut short is redone
            tmp = tempfile.mkdtemp(prefix="divconq-tokenizer-")
            try:
                tiny_models.train_word_tokenizer(corpus_from_rows(read_conversations(corpus))).save_pretrained(tmp)
                storage.copy_dir(tmp, dest)
                storage.write_text(storage.join(dest, ".complete"), "")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def student_base_job(self) -> TrainConfig:
        """The students' base: the student size, the world's tokenizer, pretrained only to list the names a
        text mentions (:func:`pipeline.data.world_corpus.name_listing_rows`), as the paper's students are
        pretrained LMs that can copy what they read. It is also the table's untrained student. Its tokenizer is
        the one :meth:`teacher_job` writes."""
        plan = self.plan
        if not storage.exists(storage.join(self.p("tokenizer"), ".complete")):
            raise RuntimeError("the students' base shares the teacher's tokenizer: build teacher_job() first")
        rows = world_corpus.name_listing_rows(W.generate(plan.world), plan.name_rows, seed=plan.world.seed)
        corpus = world_corpus.write_corpus(self.p("student_base", "corpus"), rows)
        return self.train_config(plan.student_base, {"train_path": corpus, "validation_path": None},
                                 {"tokenizer_from": self.p("tokenizer")}, self.p("student_base", "model"), "student_base")

    def train_teacher_and_student_base(self) -> None:
        """The teacher and the students' base, side by side: neither needs the other (they share only the
        tokenizer, written first), and each is one single-threaded worker, so on two cores together they take
        the teacher's time."""
        teacher, base = self.teacher_job(), self.student_base_job()
        storage.delete(self.teacher_ready())  # the teacher's app, deployed early, must load this run's teacher
        self.steps_together({"train teacher": lambda: self.train_teacher(teacher),
                             "pretrain the students' base (listing names)": lambda: self.pretrain_base(base)})

    def train_teacher(self, job: TrainConfig) -> Manifest:
        """The teacher's train job, then the marker its app's replicas wait for (:meth:`teacher_app_config`)."""
        manifest = training_job.run(job)
        storage.write_text(self.teacher_ready(), weights_digest(self.p("teacher", "model")))
        return manifest

    def teacher_ready(self) -> str:
        return self.p("teacher", "ready")

    def pretrain_base(self, base: TrainConfig) -> Manifest:
        """The students' base's train job, then the teacher's app and the students' train jobs: they start on the core
        the base leaves idle while the teacher trains on. The app's replicas import torch and transformers and wait
        for the teacher (:meth:`teacher_app_config`), and the students' jobs wait for their sets with their workers up
        (:meth:`start_students`)."""
        manifest = training_job.run(base)
        deploy(self.teacher_app_config())
        self.start_students()
        return manifest

    def train_config(self, spec: ModelSpec, data: dict[str, Any], tiny: dict[str, Any], out_dir: str, name: str) -> TrainConfig:
        return updated(self.shipped.train, {
            "data": {**data, "max_length": 256},
            "model": {"build_tiny": True, "name_or_path": None,
                      "tiny": {**tiny, "hidden_size": spec.hidden_size, "num_layers": spec.num_layers,
                               "num_heads": spec.num_heads, "max_positions": 512}},
            "optim": {"lr": spec.lr, "warmup_ratio": 0.05, "betas": (0.9, 0.95)},
            "deepspeed": {"micro_batch_size": spec.batch},
            # one worker, one thread: the quickstart trains two models at once, one per core (steps_together)
            "scaling": {"num_workers": 1, "cpus_per_worker": 1},
            "schedule": {"max_steps": spec.steps, "epochs": 1000, "checkpoint_every_steps": max(100, spec.steps // 4),
                         "checkpoint_every_epoch": False, "eval_every_epoch": False},
            "output": {"dir": out_dir, "checkpoint_dir": self.p("checkpoints"), "run_name": name}})

    # ------------------------------------------------------------ serving
    @contextmanager
    def served(self) -> Iterator[str]:
        """The teacher's app (deployed by :meth:`pretrain_base`), once its replicas have loaded the teacher; yields its
        base URL."""
        cfg = self.teacher_app_config()
        try:
            t0 = time.time()
            wait_ready(cfg)
            self.timings[f"serve {TEACHER_QD} (start)"] = round(time.time() - t0, 1)
            yield cfg.base_url()
        finally:
            shutdown(cfg.app_name)

    def teacher_app_config(self) -> ServeConfig:
        """The teacher as decomposer and solver. A replica per CPU: a replica's generate loop is Python that holds one
        core at most (its GIL), and beside generate and solve the teacher's settings ask for more (generate + solve took
        44 s with two replicas, 70 s with one: qs24, qs25 in README). Deployed before the teacher is trained, its
        replicas load it when :meth:`train_teacher` marks it written (``wait_for``): their start (a process, torch and
        transformers: about 10 s) is paid on the core the base leaves idle, not after the teacher."""
        cfg = self.serve_config(self.p("teacher", "model"), TEACHER_QD, replicas=max(1, int(cluster_cpus())))
        ready = {"wait_for": self.teacher_ready()}
        return updated(cfg, {"decomposer": ready, "solver": {"backend": ready}})

    def start_app(self, cfg: ServeConfig, decomposer_name: str) -> str:
        t0 = time.time()
        base = start(cfg)
        self.timings[f"serve {decomposer_name} (start)"] = round(time.time() - t0, 1)
        return base

    def product_config(self) -> ServeConfig:
        """The product's app, S_D-R with the teacher as solver: under its own name and route, so it can start
        while the teacher's app still serves."""
        return updated(self.serve_config(self.p("students", "S_D-R"), STUDENT_QD),
                       {"app_name": PRODUCT_APP, "route_prefix": "/product"})

    def serve_config(self, decomposer: str, decomposer_name: str, replicas: int = 1) -> ServeConfig:
        """The app of :meth:`served`: both models colocated in the ingress replica, since a forward pass of these
        tiny models costs less than the actor hop to a model deployment (served static teacher setting: 1.61x the
        in-process wall time colocated, 2.41x split; benchmarks/results/bench_serve_overhead.md). The replica
        reserves no CPU: the teacher's app is started once and idles while the students train, and a reservation
        would keep one of their train jobs waiting for a CPU (it runs one torch thread all the same). ``replicas``:
        the teacher's app has one per CPU (:meth:`served`)."""
        return updated(self.shipped.serve, {
            "colocate": True,
            "decomposer": {"model": decomposer, "served_name": decomposer_name, "max_batch_size": 64,
                           "max_ongoing_requests": 128, "num_replicas": None},
            "solver": {"backend": {"type": "hf", "model": self.p("teacher", "model"), "batch_size": 64},
                       "served_name": TEACHER_QA, "max_batch_size": 64, "max_ongoing_requests": 128, "num_replicas": None},
            "ingress": {"num_replicas": replicas, "ray_actor_options": {"num_cpus": 0}},
            "method": {"decomposer_few_shot": False, "solver_few_shot": False},
            "http": {"port": self.cfg.port, "access_log": False}, "blocking": False})

    def remote(self, base_url: str, name: str) -> OpenAIBackendConfig:
        """The served model ``name`` as an OpenAI-compatible backend of ``base_url``'s app."""
        return OpenAIBackendConfig(base_url=base_url + "/v1", model=name, api_key_env=None, concurrency=64, timeout_s=300)

    # ------------------------------------------------------------ distillation
    def distill(self, base_url: str) -> None:
        """generate and solve the ``train`` questions with the served teacher; select the four sets."""
        s, plan = self.shipped, self.plan
        zero_shot = {"decomposer_few_shot": False, "solver_few_shot": False}
        self.step("generate (teacher QD)", lambda: generation.run(updated(s.generate, {
            "input": {"path": self.p("prepare"), "splits": ["train"], "datasets": None},
            "output": {"dir": self.p("generate"), "shard_size": 256}, "teacher": self.remote(base_url, TEACHER_QD),
            "sampling": {"n": plan.samples_per_question, "temperature": plan.temperature, "max_tokens": 80},
            "method": zero_shot, "pool": {"max_actors": 1, "num_cpus": 0.25}})))
        self.step("solve (teacher QA)", lambda: solving.run(updated(s.solve, {
            "input": {"path": self.p("generate")}, "output": {"dir": self.p("solve"), "shard_size": 256},
            "solver": self.remote(base_url, TEACHER_QA), "sampling": {"max_tokens": 112}, "method": zero_shot,
            "pool": {"max_actors": 1, "num_cpus": 0.25}})))

    def distill_beside_teacher_settings(self, base_url: str) -> list[str]:
        """generate, solve and select, then wait for the students' train jobs (started with the base:
        :meth:`start_students`); beside them, the settings that need no student. Those wait on the served teacher
        more than they compute (about 1.4 of 2 cores busy when run alone), so beside the students' train jobs they
        fill cores that would idle; the students' settings run after. Returns the students trained. The teacher's
        static setting runs first: its replies are the cache the students' settings read (teacher QD's decompositions
        for S_E-T and S_E-A)."""
        trained: list[str] = []

        def distill() -> None:
            self.distill(base_url)
            trained.extend(self.select())
            self.finish_students()

        early = sorted((s for s in self.all_settings(base_url) if s.student is None), key=lambda s: s.folder != "teacher-static")
        self.steps_together({"the teacher's settings": lambda: self.infer_each(early), "distillation": distill}, announce=False)
        return trained

    def select(self) -> list[str]:
        """The four training sets; returns the students that have rows (an untrained teacher may give none)."""
        manifest = self.step("select", lambda: selection.run(updated(self.shipped.select, {
            "input": {"path": self.p("solve")}, "output": {"dir": self.p("select")}, "variants": list(STUDENTS.values()),
            "validation_fraction": 0.0})))
        have = [name for name, variant in STUDENTS.items() if manifest.counts.get(f"{variant}/train", 0) > 0]
        for name in sorted(set(STUDENTS) - set(have)):
            self.progress(f"{name}: no training rows (the teacher gave none that qualify): not trained, its settings skipped")
        return have

    def start_students(self) -> None:
        """The four students' train jobs, dealt over as many single-worker jobs as the cluster has CPUs, started now
        and side by side in the background (:meth:`finish_students` waits for them). Each job's worker group starts,
        loads the students' base and imports DeepSpeed at once, then waits for select's manifest
        (``data.wait_for``): that start (51-63 s a job outside its training loops, after select, in qs27 and qs29) is
        paid on the core the base leaves idle while the teacher trains on, not after select (12-24 s: qs28, qs30).
        A student whose set select leaves empty is skipped (``data.skip_if_empty``), as :meth:`select` reports."""
        jobs = self.student_jobs(list(STUDENTS), int(cluster_cpus()))
        # the marker they wait for: a rerun into this output rewrites select's sets, so its old manifest goes first
        storage.delete(self.p("select", "manifest.json"))
        self._students = self.start_together({
            f"train students ({', '.join(group)})":
                (lambda cfg=cfg: self.train_then_serve_product(cfg)) if "S_D-R" in group else (lambda cfg=cfg: training_job.run(cfg))
            for group, cfg in jobs})

    def finish_students(self) -> None:
        """Wait for the students' train jobs (:meth:`start_students`); the first failure is raised once all have
        ended."""
        self.end_together(self._students)

    def train_then_serve_product(self, job: TrainConfig) -> Manifest:
        """The train job that holds S_D-R, then the product's app: it starts on the core this job leaves idle while
        the other job trains on (in a run on two CPUs; on one, after every student), beside the teacher's app."""
        manifest = training_job.run(job)
        if "S_D-R" not in [m["model"] for m in manifest.to_dict().get("models", [])]:  # no rows: skipped, not trained
            return manifest
        try:
            self.product_url = self.start_app(self.product_config(), STUDENT_QD)
        except Exception as e:  # not this job's failure: serve_product starts the app again, and fails there if it must
            self.progress(f"the product's app did not start beside the teacher's ({type(e).__name__}: {e}); it starts later")
        return manifest

    def student_jobs(self, names: list[str], jobs: int) -> list[tuple[list[str], TrainConfig]]:
        """``names`` dealt round-robin over at most ``jobs`` train jobs (on two: a decomposer and a solver
        student in each, so the jobs take about as long); each job's students and config."""
        plan, jobs = self.plan, max(1, min(len(names), jobs))
        out: list[tuple[list[str], TrainConfig]] = []
        if not names:
            return out
        for i in range(jobs):
            group, runs = names[i::jobs], []
            for name in group:
                spec = plan.decomposer if name.startswith("S_D") else plan.solver
                # micro-batches of random rows, not length-grouped: on these 160-433-row sets grouping decided whether
                # S_D-T copied a question's relation word or guessed it per entity (exact decompositions of held-out
                # chain questions, 3 seeds: 30-40 % sorted, 43-89 % shuffled steps, 63-99 % random; probe_batch_order)
                runs.append({"name": name, "data": {"train_path": self.p("select", STUDENTS[name], "train"), "validation_path": None,
                                                    "pack_or_group": "none", "wait_for": self.p("select", "manifest.json"),
                                                    "skip_if_empty": True},
                             "output_dir": self.p("students", name), "schedule": {"max_steps": spec.steps},
                             "optim": {"lr": spec.lr, "warmup_ratio": 0.05, "betas": (0.9, 0.95)}})
            run_name = "students" if jobs == 1 else f"students-{i + 1}"
            cfg = self.train_config(plan.student_base, {"train_path": runs[0]["data"]["train_path"], "validation_path": None},
                                    {}, self.p("students", "jobs", run_name), run_name)
            # checkpoint cadence from the students' own steps (train_config took it from the base's)
            # a token CPU reserved (Ray Train refuses an empty bundle): the jobs start while the teacher's job holds
            # its CPU and wait for select with their workers up (start_students); each trains on one torch thread,
            # one job per core
            out.append((group, updated(cfg, {"model": {"build_tiny": False, "name_or_path": self.p("student_base", "model")},
                                             "runs": runs, "schedule": {"checkpoint_every_steps": max(100, plan.decomposer.steps // 4)},
                                             "scaling": {"cpus_per_worker": STUDENT_JOB_CPUS}})))
        return out

    # ------------------------------------------------------------ evaluation
    def settings(self, base_url: str, trained: list[str]) -> list[Setting]:
        """Every setting whose models exist (all of them, unless a student had no training rows), in the report's
        order."""
        return [s for s in self.all_settings(base_url) if s.student is None or s.student in trained]

    def all_settings(self, base_url: str) -> list[Setting]:
        teacher_qd, teacher_qa = self.remote(base_url, TEACHER_QD), self.remote(base_url, TEACHER_QA)
        local = lambda name: HFBackendConfig(model=self.p("students", name), batch_size=64)  # noqa: E731
        untrained = HFBackendConfig(model=self.p("student_base", "model"), batch_size=64)
        t, s = "teacher", "student"
        return [Setting("single-stage teacher (direct)", "teacher-direct", "direct", None, teacher_qa, (t, t)),
                Setting("teacher QD + teacher QA (static)", "teacher-static", "static", teacher_qd, teacher_qa, (t, t)),
                Setting("teacher QD + teacher QA (dynamic)", "teacher-dynamic", "dynamic", teacher_qd, teacher_qa, (t, t)),
                Setting("S_D-T + teacher QA", "sd_t", "static", local("S_D-T"), teacher_qa, (s, t), student="S_D-T"),
                Setting("teacher QD + S_E-T", "se_t", "static", teacher_qd, local("S_E-T"), (t, s), student="S_E-T"),
                Setting("teacher QD + S_E-A", "se_a", "static", teacher_qd, local("S_E-A"), (t, s), student="S_E-A"),
                Setting("untrained student + teacher QA", "untrained", "static", untrained, teacher_qa, (s, t))]

    def infer(self, setting: Setting) -> None:
        cfg = self.infer_config(setting)
        self.step(f"infer: {setting.name}", lambda: inference.run(cfg))

    def infer_each(self, settings: list[Setting]) -> None:
        for setting in settings:
            self.infer(setting)

    def students_settings(self, base_url: str, trained: list[str]) -> list[Setting]:
        """The trained students' settings and, beside them, the product (S_D-R served, :meth:`serve_product`), whose
        lane then takes the students' settings too; returns the product's setting ([] without S_D-R)."""
        todo: queue.SimpleQueue[Setting] = queue.SimpleQueue()
        for setting in self.settings(base_url, trained):
            if setting.student is not None:
                todo.put(setting)
        product: list[Setting] = []

        def the_product() -> None:
            product.append(self.serve_product())
            self.infer_from(todo)

        lanes = {"the students' settings": lambda: self.infer_from(todo)}
        if "S_D-R" in trained:
            lanes["the product"] = the_product
        self.steps_together(lanes, announce=False)
        return product

    def infer_from(self, todo: "queue.SimpleQueue[Setting]") -> None:
        """Run settings from ``todo`` until it is empty. Lanes that share one queue each take the next setting when
        they free up, so that no lane idles while another still has several to run (dealt in advance, the students'
        three settings ran one after another beside the product's one: 25 s on one core at the end of qs33)."""
        while True:
            try:
                setting = todo.get_nowait()
            except queue.Empty:
                return
            self.infer(setting)

    def infer_config(self, setting: Setting) -> InferConfig:
        """The infer job of one setting over every test question."""
        prices = {"teacher": self.cfg.prices.teacher_per_1m, "student": self.cfg.prices.student_per_1m}
        models = {}
        for backend, size in zip((setting.decomposer, setting.solver), setting.sizes):
            if backend is not None:
                models[backend.model] = ModelPrice(prompt_per_1m=prices[size], completion_per_1m=prices[size])
        test = {"path": self.p("prepare"), "splits": ["test"], "datasets": None}
        return updated(self.shipped.infer, {
            "input": test, "setting": setting.name, "mode": setting.mode, "decomposer": setting.decomposer,
            "solver": setting.solver, "output": {"dir": self.p("infer", setting.folder), "shard_size": 256},
            "decomposer_sampling": {"max_tokens": 80}, "solver_sampling": {"max_tokens": 112},
            "method": {"decomposer_few_shot": False, "solver_few_shot": False, "max_dynamic_steps": 5},
            "cache_dir": self.response_cache() if setting.shares_cache else None,
            # no CPU reserved: the actor mostly waits on the served teacher, and the teacher's settings run while the
            # students train (run), whose jobs need every CPU of the cluster (one each)
            "pricing": PricingConfig(models=models, bill_cached=True), "pool": {"max_actors": 1, "num_cpus": 0}})

    def response_cache(self) -> str:
        """The settings' response cache: a folder per teacher (a digest of its weights), so that a rerun into the
        same output with a retrained teacher never reads the old one's replies: the settings reach it by its served
        name, which a retraining keeps. The local models (students, their base) name their weights in the cache's
        keys themselves (``HFBackend.cache_name``, by the same digest), so the teacher's settings, run before the
        students exist, and the students' share one folder."""
        return self.p("cache", weights_digest(self.p("teacher", "model")) or "untrained")

    def serve_product(self) -> Setting:
        """The product (S_D-R with the teacher as solver; served since its train job ended): ask ``/v1/solve`` once,
        infer through it, then stop it."""
        base_url = self.product_url = self.product_url or self.start_app(self.product_config(), STUDENT_QD)
        try:
            question = W.generate(self.plan.world).questions["test"][0].to_row()
            body = {"question": question["question"], "dataset": question["dataset"]}
            demo = httpx.post(base_url + "/v1/solve", json=body, timeout=120).json()
            storage.write_json(self.p("serve_demo.json"), demo)
            # every call through the product app: no reply from the cache
            setting = Setting("S_D-R + teacher QA (served)", "sd_r-served", "static", self.remote(base_url, STUDENT_QD),
                              self.remote(base_url, TEACHER_QA), ("student", "teacher"), shares_cache=False)
            self.infer(setting)
        finally:
            self.stop_product()
        return setting

    def stop_product(self) -> None:
        """The product's app, if it is up: after its setting, or when a failed run left it (Serve apps outlive their
        driver on a cluster)."""
        if self.product_url is not None:
            try:
                shutdown(PRODUCT_APP)
            except Exception as e:  # Ray already gone; the run's own error is the one to report
                log.warning("could not delete the product's app: %s", e)
            self.product_url = None

    def evaluate(self, settings: list[Setting]) -> str:
        refs = [SettingRef(name=s.name, predictions=self.p("infer", s.folder)) for s in settings]
        cfg = updated(self.shipped.evaluate, {"settings": refs, "output": {"dir": self.p("report")}, "title": REPORT_TITLE})
        self.step("evaluate", lambda: evaluation.run(cfg))
        return self.p("report", "report.md")

    def run(self) -> Manifest:
        """Run every stage into ``cfg.out``; the manifest's ``report`` is the evaluation report's path."""
        started = time.time()
        init_ray(self.cfg.ray)
        self.prepare()
        try:
            self.train_teacher_and_student_base()
            with self.served() as base_url:
                trained = self.distill_beside_teacher_settings(base_url)
                product = self.students_settings(base_url, trained)
                settings = self.settings(base_url, trained)
            settings[4:4] = product
        except BaseException:
            if any(not f.done() for f in self._students.values()):
                shutdown_ray()  # the students' jobs wait for a select that will not come: end them with this run
            raise
        finally:
            self.stop_product()
        report = self.evaluate(settings)
        shutdown()
        storage.write_json(self.p("timings.json"), self.timings)
        return Manifest.of("quickstart", self.cfg, inputs={"configs": [cfg_path(n) for n in Shipped.__dataclass_fields__]},
                           counts={"steps": len(self.timings)}, started_at=started,
                           extra={"report": report, "timings": self.timings, "world": W.describe(W.generate(self.plan.world))})


def _counts(manifest: Any) -> str:
    """A short tail for a stage's progress line: rows in and out, quarantined, steps, accuracy."""
    counts = getattr(manifest, "counts", None) or {}
    shown = [f"{k.replace('_', ' ')} {counts[k]}" for k in ("rows_in", "rows_out", "quarantined", "models", "steps", "train_rows")
             if isinstance(counts.get(k), (int, float))]
    accuracy = ((getattr(manifest, "model_extra", None) or {}).get("accuracy") or {}).get("all", {}).get("accuracy")
    if accuracy is not None:
        shown.append(f"correct {100 * accuracy:.1f} %")
    return "".join(", " + x for x in shown)


def run(cfg: QuickstartConfig, progress: Optional[Callable[[str], None]] = None) -> Manifest:
    """The quickstart job: the paper's experiment in miniature (see :class:`Quickstart`)."""
    return Quickstart(cfg, progress).run()


__all__ = ["QuickstartConfig", "Quickstart", "Plan", "run", "json"]
