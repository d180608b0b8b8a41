"""The train job as a library call: ``run(cfg: TrainConfig) -> Manifest`` (``divconq train`` and
``python -m ray_jobs.train`` are thin shells over it).

Recipe: config -> Ray -> base model (tiny built from the training text, or any HF causal
LM) -> TorchTrainer(DeepSpeed loop, checkpoints + fault tolerance) -> export the final
Hugging Face model -> manifest.json. Re-running with the same output.checkpoint_dir and
output.run_name resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

from pipeline import storage
from pipeline.cluster import init_ray
from pipeline.manifest import Manifest, write_manifest
from training.config import TrainConfig

log = logging.getLogger("divconq.train")


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
    if storage.exists(storage.join(dest, "config.json")):  # staged by an earlier run of this run_name
        return dest
    if not cfg.model.build_tiny:
        from huggingface_hub import snapshot_download  # hub name: fetch once on the driver, then put it

        # in the run's storage, which every node (and a resumed run) can read; a driver-local cache is not
        storage.copy_dir(snapshot_download(name), dest)
        return dest
    from pipeline.tiny_models import build_tiny_model
    from training.sft_data import corpus_from_rows, read_rows

    t = cfg.model.tiny
    tmp = tempfile.mkdtemp(prefix="divconq-tiny-")
    try:
        texts = corpus_from_rows(read_rows(cfg.data.train_path))
        build_tiny_model(tmp, texts, arch=t.arch, vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                         num_layers=t.num_layers, num_heads=t.num_heads,
                         max_positions=max(t.max_positions, cfg.data.max_length), seed=cfg.seed)
        storage.copy_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def run(cfg: TrainConfig) -> Manifest:
    """The train job: distill into a student (DeepSpeed on Ray Train), export it to ``cfg.output.dir``
    with its manifest. A rerun with the same checkpoint_dir and run_name resumes its latest checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from training.export import export_from_checkpoint
    from training.sft_data import count_rows
    from training.train_loop import read_trainer_state, train_loop_per_worker

    started = time.time()
    cfg = cfg.with_absolute_paths()
    init_ray(cfg.ray)
    base_model = prepare_base_model(cfg)
    log.info("train: base model %s", base_model)

    fs, storage_path = storage.arrow_filesystem(cfg.output.checkpoint_dir)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train_config": cfg.model_dump(mode="json"),
            "base_model": base_model,
            "resume_from": cfg.resume_from,
            "test_hooks": {k: v for k, v in os.environ.items() if k.startswith("DIVCONQ_TEST_")},
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.output.run_name,
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.output.num_checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=cfg.failure.max_failures),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise ValueError("training produced no checkpoint")
    lora = cfg.model.lora
    export_from_checkpoint(result.checkpoint, cfg.output.dir, merge_lora=bool(lora and lora.export == "merged"))
    trainer_state = read_trainer_state(result.checkpoint)

    metrics = dict(result.metrics or {})
    final = {k: metrics.get(k) for k in ("loss", "val_loss", "lr", "step", "epoch", "tokens", "tokens_per_s", "truncated_rows")}
    manifest = write_manifest(
        cfg.output.dir,
        "train",
        cfg,
        inputs={"train_path": cfg.data.train_path, "validation_path": cfg.data.validation_path, "base_model": base_model},
        counts={
            "train_rows": count_rows(cfg.data.train_path),
            "val_rows": count_rows(cfg.data.validation_path),
            "truncated_rows": int(metrics.get("truncated_rows") or 0),
            "steps": int(metrics.get("step") or 0),
        },
        started_at=started,
        usage={"train_tokens": metrics.get("tokens")},
        extra={"metrics": final, "history": trainer_state.get("history", []), "checkpoint": str(result.checkpoint.path),
               "model_dir": cfg.output.dir},
    )
    log.info("train: step %s loss %.4f val_loss %s -> %s", final["step"], final["loss"] or float("nan"), final["val_loss"], cfg.output.dir)
    return manifest
