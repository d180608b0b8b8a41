"""The ``train`` job: ``run(cfg) -> manifest``, callable in-process (``ray_jobs/train.py`` is its CLI).

config -> Ray -> each model's base model (a tiny one built from its training text, or any HF causal
LM, staged next to the checkpoints) -> one ``TorchTrainer`` whose workers run
:func:`training.recipe.recipe_main` over every model still to train -> export each model's final
Hugging Face folder to its ``output.dir`` -> one ``manifest.json`` per model.

A model whose ``output.dir`` already holds a complete manifest of the same configuration is
skipped (not even loaded); when no model is left, Ray Train does not start. Re-running with the
same ``output.checkpoint_dir`` and ``output.run_name`` resumes each unfinished model at its latest
checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Any, Optional, Sequence

from huggingface_hub import snapshot_download
from pydantic import ValidationError

from pipeline import storage, tables
from pipeline.config import config_to_dict
from pipeline.cluster import init_ray
from pipeline.manifest import Manifest, read_manifest, write_manifest
from pipeline.tiny_models import build_tiny_model
from training.config import TrainConfig

if TYPE_CHECKING:
    from training.callbacks import Callback
    from training.recipe import JobPlan, ModelPlan

# The worker-side modules (training.recipe, callbacks, checkpointing, export, sft_data) import Ray Train,
# torch, transformers and DeepSpeed: they are imported inside the functions that train, so that
# `divconq train` validates its config in a fraction of a second (tests/test_structure.py).

log = logging.getLogger("divconq.train")

# Config sections that do not change what a model learns (a re-run may change them and still skip it).
_NOT_IN_FINGERPRINT = ("ray", "failure")


def run(cfg: TrainConfig, callbacks: Sequence[Callback] = ()) -> Manifest:
    """Train every model of ``cfg``; returns the manifest (one model) or a summary of the models."""
    started = time.time()
    cfg = cfg.with_absolute_paths()
    models = cfg.model_runs()
    todo, skipped = [], set()
    for i, m in enumerate(models):
        if already_trained(m):
            log.info("train %s: already trained and exported to %s, skipped", m.output.run_name, m.output.dir)
        else:
            todo.append((i, m))
    if todo:
        from training.callbacks import ProgressLog, test_callbacks_from_env  # lazy: worker side (see the note above)
        from training.recipe import JobPlan, ModelPlan  # lazy: worker side (see the note above)

        timings = {"ray_init_s": _seconds(init_ray, cfg.ray)[1]}
        plans, timings["base_model_s"] = _seconds(lambda: [ModelPlan(m, prepare_base_model(m), index=i) for i, m in todo])
        callbacks = [ProgressLog(), *callbacks, *test_callbacks_from_env()]
        job_plan = JobPlan(plans, several=cfg.several, callbacks=callbacks)
        result, timings["fit_s"] = _seconds(_fit, cfg, job_plan, len(models))
        skipped = {plan.cfg.output.run_name for plan in plans if _finish_model(plan, result, cfg.several, started, timings) is None}
    manifests = [read_manifest(m.output.dir) if m.output.run_name not in skipped else None for m in models]
    if cfg.several:
        return _job_summary(cfg, manifests, started)
    if manifests[0] is None:  # its only model had no rows (data.skip_if_empty)
        return Manifest.of("train", cfg, inputs={"train_path": cfg.data.train_path}, counts={"models": 0}, started_at=started)
    return Manifest.model_validate(manifests[0])


def fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """What decides a model's result: its one-model config without Ray and failure settings."""
    data = config_to_dict(cfg)
    for key in _NOT_IN_FINGERPRINT:
        data.pop(key, None)
    return data


def already_trained(cfg: TrainConfig) -> bool:
    """A complete manifest of the same configuration in the model's ``output.dir``."""
    manifest = read_manifest(cfg.output.dir)
    if not manifest or manifest.get("job") != "train" or manifest.get("status") != "complete":
        return False
    try:
        done = TrainConfig.model_validate(manifest.get("config"))
    except ValidationError:  # written by another version of the schema: train (resuming) to be sure
        return False
    return fingerprint(done) == fingerprint(cfg)


def prepare_base_model(cfg: TrainConfig) -> str:
    """The base model every worker loads: a hub name / dir / storage URL, or a tiny one built here
    (stored next to the checkpoints so that workers on any node, and resumed runs, use the same one)."""
    name = cfg.model.name_or_path
    if not cfg.model.build_tiny:
        if not storage.is_local(name):
            return name
        if os.path.isdir(os.path.expanduser(name)):
            return os.path.abspath(os.path.expanduser(name))
    dest = storage.join(cfg.output.checkpoint_dir, f"{cfg.output.run_name}-base_model")
    if storage.exists(storage.join(dest, "config.json")):  # staged by an earlier run of this model
        return dest
    if not cfg.model.build_tiny:
        # a hub name: fetched once on the driver into the run's storage, which every node (and a
        # resumed run) can read; a driver-local cache is not
        storage.copy_dir(snapshot_download(name), dest)
        return dest
    from training.sft_data import corpus_from_rows, read_conversations  # lazy: worker side (torch; see the note above)

    t = cfg.model.tiny
    tmp = tempfile.mkdtemp(prefix="divconq-tiny-")
    try:
        texts = corpus_from_rows(read_conversations(cfg.data.train_path))
        build_tiny_model(tmp, texts, arch=t.arch, vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                         num_layers=t.num_layers, num_heads=t.num_heads,
                         max_positions=max(t.max_positions, cfg.data.max_length), seed=cfg.seed,
                         tokenizer=t.tokenizer,
                         tokenizer_from=storage.localize(t.tokenizer_from) if t.tokenizer_from else None)
        storage.copy_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _fit(cfg: TrainConfig, plan: JobPlan, num_models: int):
    """One Ray Train run (``output.run_name``) for every model of the plan."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig  # lazy: Ray Train (see the note above)
    from ray.train.torch import TorchConfig, TorchTrainer  # lazy: Ray Train (see the note above)

    from training.checkpointing import checkpoint_config  # lazy: worker side (see the note above)
    from training.recipe import recipe_main  # lazy: worker side (see the note above)

    fs, storage_path = storage.arrow_filesystem(cfg.output.checkpoint_dir)
    s = cfg.scaling
    trainer = TorchTrainer(
        recipe_main,
        train_loop_config={"plan": plan},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker, **s.resources_per_worker}),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.output.run_name,
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=checkpoint_config(cfg.output.num_checkpoints_to_keep, num_models),
            failure_config=FailureConfig(max_failures=cfg.failure.max_failures),
        ),
    )
    plan.started_at = time.time()
    return trainer.fit()


def _seconds(fn, *args: Any) -> tuple[Any, float]:
    start = time.time()
    out = fn(*args)
    return out, round(time.time() - start, 3)


def _finish_model(plan: ModelPlan, result, several: bool, started: float, job_timings: dict[str, float]) -> Optional[dict[str, Any]]:
    """Export the model's final checkpoint to its ``output.dir`` and write its manifest (None: skipped, no rows)."""
    from training.checkpointing import latest_of, read_trainer_state  # lazy: worker side (see the note above)
    from training.export import export_from_checkpoint  # lazy: torch, transformers (see the note above)

    cfg, name = plan.cfg, plan.cfg.output.run_name
    final = latest_of(name, list(result.best_checkpoints or []), several, final_only=True)
    if final is None and cfg.data.skip_if_empty:  # the recipe found no usable rows and trained nothing
        log.info("train %s: not trained: no usable rows in %s (data.skip_if_empty)", name, cfg.data.train_path)
        return None
    if final is None:
        raise ValueError(f"training {name} produced no final checkpoint")
    checkpoint, metrics = final
    export_start = time.time()
    lora = cfg.model.lora
    export_from_checkpoint(checkpoint, cfg.output.dir, merge_lora=bool(lora and lora.export == "merged"))
    state = read_trainer_state(checkpoint)
    timings = {**state.timings, "driver_export_s": round(time.time() - export_start, 3), "job": job_timings}
    keys = ("loss", "val_loss", "lr", "step", "epoch", "tokens", "tokens_per_s", "elapsed_s", "cpu_s", "truncated_rows")
    final_metrics = {k: metrics.get(k) for k in keys}
    manifest = write_manifest(
        cfg.output.dir, "train", cfg,
        inputs={"train_path": cfg.data.train_path, "validation_path": cfg.data.validation_path, "base_model": plan.base_model},
        counts={"train_rows": tables.count_rows(cfg.data.train_path), "val_rows": tables.count_rows(cfg.data.validation_path),
                "truncated_rows": int(metrics.get("truncated_rows") or 0), "steps": int(metrics.get("step") or 0)},
        started_at=started, usage={"train_tokens": metrics.get("tokens")},
        extra={"model": name, "metrics": final_metrics, "history": state.history, "timings": timings,
               "checkpoint": str(checkpoint.path), "model_dir": cfg.output.dir},
    )
    log.info("train %s: step %s loss %.4f val_loss %s -> %s", name, final_metrics["step"], final_metrics["loss"] or float("nan"),
             final_metrics["val_loss"], cfg.output.dir)
    return manifest


def _job_summary(cfg: TrainConfig, manifests: list[Optional[dict[str, Any]]], started: float) -> Manifest:
    """A several-model job's result: every model's manifest entry (also written to ``output.dir`` when set)."""
    models = [{"model": m["model"], "model_dir": m["model_dir"], "steps": m["counts"]["steps"], "metrics": m["metrics"],
               "timings": m.get("timings", {})} for m in manifests if m]
    summary = Manifest.of("train", cfg, inputs={}, counts={"models": len(models)}, started_at=started, extra={"models": models})
    return summary.write(cfg.output.dir) if cfg.output.dir else summary
