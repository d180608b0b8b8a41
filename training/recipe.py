"""The training recipe: supervised fine-tuning of a causal LM with DeepSpeed inside Ray Train.

:class:`SFTRecipe` trains one model, in torchtune's shape::

    recipe = SFTRecipe(plan, worker, callbacks)
    recipe.setup()      # tokenizer, data and batch plan, DeepSpeed engine, resume state
    recipe.train()      # epochs of steps; checkpoints, validation and reports at their boundaries
    recipe.cleanup()    # free the engine before the next model

:func:`recipe_main` is Ray Train's ``train_loop_per_worker``: it trains the job's models
(:class:`JobPlan`) one after another in the same worker group, so a job of several models pays
for Ray Train's workers, the imports and DeepSpeed's communication set-up once.

* Data: every rank tokenizes all rows and builds the same seeded batch plan per epoch, then takes
  its share (:mod:`training.sft_data`); the loss counts assistant tokens only.
* Checkpoints (:mod:`training.checkpointing`): every ``schedule.checkpoint_every_steps`` optimizer
  steps and at every epoch end every rank calls ``engine.save_checkpoint`` (DeepSpeed needs all
  ranks: with ZeRO each writes its shard) and ``ray.train.report`` with the same folder name. The
  final one also holds ``hf_model/``, which the driver exports.
* Resume: the model's latest checkpoint among the run's reported ones (after a worker failure,
  ``FailureConfig.max_failures``, or when the job is re-run with the same run name and storage),
  else ``resume_from``. ``engine.load_checkpoint`` restores module, optimizer and lr-scheduler
  state (pickles loaded weights-only) and training continues at the saved optimizer step: the
  epoch's plan is deterministic, so the micro-batches already trained are skipped exactly. A model
  whose final checkpoint covers all its steps is not loaded at all.
* Test hooks are callbacks (:mod:`training.callbacks`), outside the loop.

Why not transformers' ``Trainer`` or TRL's ``SFTTrainer`` under Ray Train's ``prepare_trainer``
(``python -m benchmarks.bench_hf_trainer``, results in benchmarks/results: the same worker group of 2
CPU workers, model, rows, batches, optimizer and DeepSpeed ZeRO-2 config, one epoch of GSM8K SFT rows,
3 interleaved rounds, on the shared 2-core Xeon): they do not win on all counts, so the recipe stays.

* throughput: Trainer 1.00x ours in tokens per CPU-second (7,392 vs 7,388, medians; 0.97x in wall
  tokens/s, and its token count includes the batch accelerate fetches ahead, +1.8 %): parity.
  TRL 0.68x (5,040): its loss path also computes per-token entropy and accuracy and gathers them
  every step;
* mid-epoch resume: exact for all three (max |dw| = 0, stopped at step 31 of 62 and resumed);
* assistant-only loss: all three (Trainer with our labels; TRL with ``completion_only_loss``);
* code: Trainer would replace ~257 lines (loop, validation, checkpoint save/load, metrics, engine
  init, batch plans) by ~75 of glue, while ~225 stay either way (several models per worker group,
  per-model resume and retention among Ray Train's checkpoints, the HF export in the final
  checkpoint, callbacks, timings); packing with block-diagonal attention comes only with TRL (0.68x);
  and Trainer checks its arguments against the DeepSpeed config (TRL's default bf16=True fails
  against an fp32 CPU config).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from pipeline import storage
from training import export, lora, sft_data
from training.callbacks import Callback, progress_logger, quiet_worker_logs
from training.checkpointing import (
    RETENTION_METRIC, STATE_FILE, TrainerState, checkpoint_dir_name, checkpoint_from_uri, latest_of, retention_score,
)
from training.config import TrainConfig
from training.engine import Engine, build_engine, choose_accelerator


@dataclass
class ModelPlan:
    """One model of the job: its one-model config, its staged base model, its place in the job."""

    cfg: TrainConfig
    base_model: str
    index: int = 0


@dataclass
class JobPlan:
    """What the driver hands every worker (pickled: config objects, not dicts)."""

    models: list[ModelPlan]
    several: bool = False
    callbacks: list[Callback] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)  # the driver's fit() call, for the timings


@dataclass
class Worker:
    """This process's place in the worker group."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    use_gpu: bool

    @classmethod
    def current(cls, want_gpu: bool) -> "Worker":
        ctx = ray.train.get_context()
        use_gpu = bool(want_gpu and torch.cuda.is_available())
        device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
        return cls(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(), device, use_gpu)

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def recipe_main(config: dict[str, Any]) -> None:
    """Ray Train's loop: train every model of the job's plan, in order, in this worker group."""
    plan: JobPlan = config["plan"]
    entered = time.time()
    quiet_worker_logs()
    choose_accelerator(plan.models[0].cfg.scaling.use_gpu)
    worker = Worker.current(plan.models[0].cfg.scaling.use_gpu)
    if not worker.use_gpu:
        # as many threads as the worker's CPUs: torch defaults to every core, and its OpenMP threads spin
        # in the kernel while other processes hold the cores (measured on 2 cores: 8k tokens/s for a tiny
        # Llama with the default, 30k with one thread; benchmarks/results/probe_world.md)
        torch.set_num_threads(max(1, int(plan.models[0].cfg.scaling.cpus_per_worker)))
    for i, model in enumerate(plan.models):
        recipe = SFTRecipe(model, worker, several=plan.several, callbacks=plan.callbacks)
        if i == 0:
            recipe.timings["worker_start_s"] = entered - plan.started_at
        recipe.setup()
        recipe.train()
        recipe.cleanup()


class SFTRecipe:
    """Train one model: see the module docstring for the life cycle."""

    def __init__(self, plan: ModelPlan, worker: Worker, several: bool = False, callbacks: Optional[list[Callback]] = None):
        self.cfg, self.base_model, self.index = plan.cfg, plan.base_model, plan.index
        self.name = self.cfg.output.run_name
        self.worker, self.several = worker, several
        self.callbacks = list(callbacks or [])
        self.state = TrainerState(model=self.name)
        self.timings: dict[str, float] = {}
        self.finished = False  # a final checkpoint already covers every step: nothing to load or train
        self.skipped = False  # an empty train set with data.skip_if_empty: nothing to train or export
        self.engine: Optional[Engine] = None
        self._window = [0.0, 0.0]  # loss sum, micro-steps since the last report
        self._session_tokens = 0.0
        self._session_start, self._session_cpu = time.time(), time.process_time()
        self._tokens_base = 0.0  # tokens trained before this session (resumed runs)
        self._start_step = 0
        self._reports, self._last_ray_report = 0, time.monotonic()

    # ================================================================ setup
    def setup(self) -> None:
        torch.manual_seed(self.cfg.seed + self.worker.rank)
        with self._timed("load_s"):
            self._load_tokenizer()
        if self.cfg.data.wait_for:
            with self._timed("wait_input_s"):
                self._wait_for_input()
        with self._timed("tokenize_s"):
            self._load_data()
        if self.skipped:
            return
        with self._timed("find_checkpoint_s"):  # waits for Ray Train to register this group's earlier reports
            resume = self._find_resume_checkpoint()
        if self.finished:
            if self.worker.rank == 0:
                progress_logger().info("train %s: finished earlier at step %d, nothing to train", self.name, self.state.global_step)
            return
        with self._timed("engine_s"):
            self.engine = build_engine(self.cfg, self.base_dir, self.total_steps, self.worker.world, self.worker.use_gpu)
        if resume is not None:
            with self._timed("resume_s"):
                self.load_checkpoint(resume)
        self._start_step = self.state.global_step
        self._call("on_model_begin")

    def _load_tokenizer(self) -> None:
        """Local rank 0 fetches the base model files (s3://) first; the others then reuse its copy."""
        if self.worker.local_rank == 0:
            self.base_dir = storage.localize(self.base_model)
        dist.barrier()
        if self.worker.local_rank != 0:
            self.base_dir = storage.localize(self.base_model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir, trust_remote_code=self.cfg.model.trust_remote_code)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _wait_for_input(self) -> None:
        """Until ``data.wait_for`` exists (the upstream job's completion marker): the worker group has started and
        loaded the base model by then; DeepSpeed, which the engine needs next, is imported while it waits."""
        # lazy: imported now, while the worker only waits (the engine, next, needs it; it picks its accelerator at import)
        import deepspeed  # noqa: F401

        storage.wait_for(self.cfg.data.wait_for, self.cfg.data.wait_timeout_s,
                         f"train {self.name}: data.wait_for (the input {self.cfg.data.train_path})")

    def _load_data(self) -> None:
        data = self.cfg.data
        self.train_data = sft_data.tokenize_rows(self.tokenizer, sft_data.read_conversations(data.train_path), data.max_length)
        if not self.train_data.examples and data.skip_if_empty:
            self.skipped = True
            if self.worker.rank == 0:
                progress_logger().info("train %s: no usable training examples in %s: skipped (data.skip_if_empty)",
                                       self.name, data.train_path)
            return
        if not self.train_data.examples:
            raise ValueError(f"no usable training examples in {data.train_path}")
        self.val_data = None
        if data.validation_path:
            rows = sft_data.read_conversations(data.validation_path)
            self.val_data = sft_data.tokenize_rows(self.tokenizer, rows, data.max_length)
        gas = self.cfg.deepspeed.gradient_accumulation_steps
        self.micro_per_epoch, steps, cap = [], 0, self.cfg.schedule.max_steps
        for e in range(self.cfg.schedule.epochs):  # the same on every rank; planned only as far as max_steps reaches
            self.micro_per_epoch.append(len(self.plan_epoch(e)))
            steps += self.micro_per_epoch[-1] // gas
            if cap and steps >= cap:
                break
        self.total_steps = min(steps, cap) if cap else steps
        self.state.total_steps = self.total_steps

    def plan_epoch(self, epoch: int) -> list[sft_data.Batch]:
        """This rank's micro-batches of ``epoch`` (the same global plan on every rank, seeded by epoch)."""
        d, ds = self.cfg.data, self.cfg.deepspeed
        batches = sft_data.plan_epoch(self.train_data.lengths, ds.micro_batch_size, self.worker.world, epoch, self.cfg.seed,
                                      d.pack_or_group, d.max_length, d.shuffle, d.mega_batch_multiplier)
        return sft_data.shard_batches(batches, self.worker.rank, self.worker.world, multiple_of=ds.gradient_accumulation_steps)

    def _find_resume_checkpoint(self) -> Optional[ray.train.Checkpoint]:
        """This model's latest reported checkpoint, else ``resume_from``; marks a finished model."""
        reported = [(r.checkpoint, r.metrics) for r in ray.train.get_all_reported_checkpoints()]
        latest = latest_of(self.name, reported, self.several)
        if latest is None:
            return checkpoint_from_uri(self.cfg.resume_from) if self.cfg.resume_from else None
        checkpoint, metrics = latest
        if metrics.get("done") and metrics.get("step", 0) >= self.total_steps:
            self.finished = True
            self.state.global_step = int(metrics["step"])
        return checkpoint

    # ================================================================ train
    def train(self) -> None:
        """Train from the resume position to the end of the schedule, then hand back a final checkpoint."""
        if self.skipped:  # no rows (data.skip_if_empty): no model, no checkpoint
            return
        if self.finished:
            self._call("on_model_end")
            return
        self.engine.engine.train()
        self._session_start, self._tokens_base = time.time(), self.state.tokens
        self._session_cpu = time.process_time()
        epoch, skip = self.state.epoch, self.state.micro_step_in_epoch
        if epoch < len(self.micro_per_epoch) and skip >= self.micro_per_epoch[epoch]:
            epoch, skip = epoch + 1, 0
        while epoch < self.cfg.schedule.epochs and self.state.global_step < self.total_steps:
            self.train_epoch(epoch, skip)
            epoch, skip = epoch + 1, 0
        if self._reports == 0:  # resumed at the end of the schedule: still hand back a final checkpoint
            self.state.val_loss = self.validate()
            last = max(epoch - 1, 0)
            self.save_checkpoint(last, self.state.micro_step_in_epoch, done=True)
        self._call("on_model_end")

    def train_epoch(self, epoch: int, skip: int = 0) -> None:
        """Micro-batches ``skip..`` of ``epoch``; an intermediate checkpoint or report at step
        boundaries, the epoch-end (or final) checkpoint after its last batch."""
        batches = self.plan_epoch(epoch)
        gas, every = self.cfg.deepspeed.gradient_accumulation_steps, self.cfg.schedule.checkpoint_every_steps
        position = skip
        for i in range(skip, len(batches)):
            self.train_step(batches[i])
            position = i + 1
            if position % gas:
                continue
            self.state.global_step += 1
            self._call("on_step_end")
            step = self.state.global_step
            if step >= self.total_steps or (position == len(batches) and self.cfg.schedule.checkpoint_every_epoch):
                break  # the final or the epoch's checkpoint follows
            # a step that ends an epoch is checkpointed and reported like any other (measured: a 145-row set, 5
            # micro-batches an epoch, ended every interval there and trained 600 steps with no report or checkpoint)
            if every and step % every == 0:
                self.save_checkpoint(epoch, position, done=False)
            elif step % self.cfg.schedule.log_every_steps == 0:
                self._report(self._metrics(epoch))
        done = self.state.global_step >= self.total_steps or epoch + 1 >= self.cfg.schedule.epochs
        if self.cfg.schedule.eval_every_epoch or done:
            self.state.val_loss = self.validate()
        if done or self.cfg.schedule.checkpoint_every_epoch:
            self.save_checkpoint(epoch, position, done=done)

    def train_step(self, batch: sft_data.Batch) -> None:
        """Forward, backward and (at accumulation boundaries, inside DeepSpeed) the optimizer step."""
        engine = self.engine.engine
        pack = self.cfg.data.pack_or_group == "pack"
        tensors = self._to_device(sft_data.collate(self.train_data.examples, batch, self.pad_id, pack=pack))
        loss = sft_data.causal_lm_loss(engine, tensors)
        engine.backward(loss)
        engine.step()
        self._window[0] += float(loss.detach())
        self._window[1] += 1
        self._session_tokens += sft_data.real_tokens(self.train_data.examples, batch)

    def validate(self) -> Optional[float]:
        """Mean token loss on the validation set (assistant tokens only), across ranks; None without one."""
        if self.val_data is None or not self.val_data.examples:
            return None
        start, engine, mbs = time.time(), self.engine.engine, self.cfg.deepspeed.micro_batch_size
        batches = sft_data.plan_epoch(self.val_data.lengths, mbs, self.worker.world, 0, self.cfg.seed, "group_by_length",
                                      self.cfg.data.max_length, False)
        loss_sum, n_tok = 0.0, 0.0
        engine.eval()
        with torch.no_grad():
            for batch, counts in sft_data.shard_eval_batches(batches, self.worker.rank, self.worker.world):
                tensors = self._to_device(sft_data.collate(self.val_data.examples, batch, self.pad_id, pack=False))
                loss = sft_data.causal_lm_loss(engine, tensors)  # every rank runs the same count (ZeRO-3 gathers)
                n = float((tensors["labels"][:, 1:] != sft_data.IGNORE_INDEX).sum())
                if counts and n > 0:
                    loss_sum, n_tok = loss_sum + float(loss) * n, n_tok + n
        engine.train()
        loss_sum, n_tok = self.worker.all_sum([loss_sum, n_tok])
        self._add_timing("validate_s", time.time() - start)
        return loss_sum / n_tok if n_tok else None

    # ================================================================ checkpoints
    def save_checkpoint(self, epoch: int, micro_step: int, done: bool) -> None:
        """Every rank: DeepSpeed state (+ the exported model when done) + trainer state, then one
        ``ray.train.report`` that Ray Train persists as one checkpoint folder."""
        start = time.time()
        metrics = self._metrics(epoch, done=done)
        step = self.state.global_step
        self.state.epoch, self.state.micro_step_in_epoch, self.state.done = epoch, micro_step, done
        self.state.tag, self.state.tokens = f"global_step{step}", metrics["tokens"]
        with self._scratch_dir() as folder:
            self.engine.engine.save_checkpoint(folder, tag=self.state.tag, exclude_frozen_parameters=self.cfg.model.lora is not None)
            if done:
                self.export(os.path.join(folder, export.HF_SUBDIR))
            self._add_timing("checkpoint_s", time.time() - start)
            if self.worker.rank == 0:
                self.state.timings = dict(self.timings)
                with open(os.path.join(folder, STATE_FILE), "w") as f:
                    f.write(self.state.to_json())
            dist.barrier()
            self._report(metrics, ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name(self.name, step, self.several))

    def load_checkpoint(self, checkpoint: ray.train.Checkpoint) -> None:
        """Restore engine (module, optimizer, lr scheduler) and trainer state from a checkpoint."""
        with checkpoint.as_directory() as folder:
            with open(os.path.join(folder, STATE_FILE)) as f:
                saved = TrainerState.from_json(f.read())
            with export.weights_only_loads():
                # LoRA checkpoints hold the adapter only: the frozen base comes from base_model
                path, _ = self.engine.engine.load_checkpoint(folder, tag=saved.tag, load_module_strict=self.cfg.model.lora is None)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load checkpoint {folder} (tag {saved.tag})")
        saved.model, saved.total_steps, saved.timings = self.name, self.total_steps, self.state.timings
        self.state = saved
        if self.worker.rank == 0:
            progress_logger().info("train %s: resumed at step %d (epoch %d, micro-batch %d)", self.name, saved.global_step,
                                   saved.epoch, saved.micro_step_in_epoch)

    def export(self, folder: str) -> None:
        """The trained model as a Hugging Face folder (LoRA: the adapter). Collective: every rank."""
        start, engine = time.time(), self.engine.engine
        if self.cfg.model.lora is not None:
            adapter = lora.gather_adapter(engine, self.worker.rank)
            if self.worker.rank == 0:
                base = lora.adapter_base_name(self.cfg.model, self.base_model)
                lora.save_adapter(engine.module, adapter, self.tokenizer, folder, base)
        else:
            state_dict = export.gather_state_dict(engine)
            if self.worker.rank == 0:
                export.save_hf_model(engine.module, state_dict, self.tokenizer, folder)
        self._add_timing("export_s", time.time() - start)

    def cleanup(self) -> None:
        """Release the engine so that the next model of the job starts from a clean process state."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    # ================================================================ reports
    def _metrics(self, epoch: int, done: bool = False) -> dict[str, Any]:
        """Metrics since the last report, summed over ranks; appended to the model's history."""
        cpu = time.process_time() - self._session_cpu
        loss_sum, n, tokens, cpu = self.worker.all_sum([self._window[0], self._window[1], self._session_tokens, cpu])
        self._window = [0.0, 0.0]
        elapsed = max(time.time() - self._session_start, 1e-6)
        lrs = self.engine.engine.get_lr()
        step = self.state.global_step
        m = {"model": self.name, "loss": loss_sum / n if n else float("nan"), "lr": float(lrs[0]) if lrs else 0.0,
             "step": step, "epoch": epoch, "tokens": self._tokens_base + tokens,
             "tokens_per_s": tokens / elapsed, "elapsed_s": elapsed, "cpu_s": cpu, "truncated_rows": self.train_data.truncated_rows,
             "total_steps": self.total_steps, "start_step": self._start_step, "done": done,
             RETENTION_METRIC: retention_score(self.index, step, done)}
        if self.state.val_loss is not None:
            m["val_loss"] = self.state.val_loss
        keep = ("step", "epoch", "loss", "lr", "val_loss", "tokens", "start_step")
        self.state.history.append({k: m[k] for k in keep if k in m})
        return m

    def _report(self, metrics: dict[str, Any], checkpoint: Optional[ray.train.Checkpoint] = None,
                dir_name: Optional[str] = None) -> None:
        # Ray Train's report waits for the controller's next poll (about 2 s here): metrics alone go to Ray
        # at most every schedule.report_every_s, the callbacks (progress lines) see every one
        now = time.monotonic()
        if checkpoint is not None or metrics.get("done") or now - self._last_ray_report >= self.cfg.schedule.report_every_s:
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=dir_name)
            self._last_ray_report = now
            self._reports += 1
        self._call("on_report", metrics)

    # ================================================================ helpers
    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.worker.device) for k, v in batch.items()}

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def _add_timing(self, key: str, seconds: float) -> None:
        self.timings[key] = round(self.timings.get(key, 0.0) + seconds, 3)

    @contextlib.contextmanager
    def _timed(self, key: str) -> Iterator[None]:
        start = time.time()
        try:
            yield
        finally:
            self._add_timing(key, time.time() - start)

    @contextlib.contextmanager
    def _scratch_dir(self) -> Iterator[str]:
        folder = tempfile.mkdtemp(prefix=f"divconq-ckpt-r{self.worker.rank}-")
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
