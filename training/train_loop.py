"""``train_loop_per_worker``: DeepSpeed SFT of a causal LM inside a Ray Train worker.

Checkpoints: every ``schedule.checkpoint_every_steps`` optimizer steps and at every epoch
end, *every* rank calls ``engine.save_checkpoint`` into its own temp dir (DeepSpeed needs
all ranks: with ZeRO each rank writes its own optimizer/parameter shard, rank 0 the
module states and ``latest``) and rank 0 adds ``trainer_state.json`` ({epoch,
global_step, micro_step_in_epoch, tag, done}); then every rank calls
``ray.train.report(metrics, checkpoint=...)`` with the same ``checkpoint_dir_name`` and
Ray Train merges the rank folders into one checkpoint directory in ``storage_path``.
The final checkpoint also holds ``hf_model/`` (the exported Hugging Face model).

Resume: ``ray.train.get_checkpoint()`` is set after a worker failure
(``FailureConfig.max_failures``) or when the run is restarted with the same name and
storage path; else ``resume_from`` (from the config) is used. Every rank downloads the
merged folder, ``engine.load_checkpoint`` restores module, optimizer and lr-scheduler
state (pickles loaded weights-only), and training continues at the saved global step: the
epoch's batch plan is deterministic (seeded by epoch), so the already-trained micro-batches
are skipped exactly.

Test hook: ``config["test_hooks"]`` (copied by ``ray_jobs.train`` from ``DIVCONQ_TEST_*``
env vars of the driver; never a config-file knob) may hold ``DIVCONQ_TEST_CRASH_AT_STEP``
and ``DIVCONQ_TEST_CRASH_MARKER``: the last rank exits hard once at that step (the marker
file records that the crash happened, so the restarted group does not crash again).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Iterator, Optional

log = logging.getLogger("divconq.train")

STATE_FILE = "trainer_state.json"


def read_trainer_state(checkpoint) -> dict:
    """``trainer_state.json`` of a Ray Train checkpoint (epoch, step, metrics history)."""
    with checkpoint.filesystem.open_input_stream(checkpoint.path.rstrip("/") + "/" + STATE_FILE) as f:
        return json.loads(f.read().decode("utf-8"))


def _torch_dtype(name: str, precision: str):
    import torch

    if name == "auto":
        name = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _checkpoint_from_uri(uri: str):
    from ray.train import Checkpoint

    from pipeline import storage

    fs, path = storage.filesystem(uri)
    return Checkpoint(path=path, filesystem=fs)


@contextlib.contextmanager
def _local_checkpoint_dir(checkpoint, local_rank: int, dist) -> Iterator[str]:
    """The checkpoint as a local folder: used in place when local, else downloaded once per node
    (local rank 0 downloads, the others wait at a barrier; removed after every rank loaded)."""
    import pyarrow.fs as pafs

    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield checkpoint.path
        return
    key = hashlib.sha256(f"{checkpoint.filesystem.type_name}:{checkpoint.path}".encode()).hexdigest()[:16]
    local = os.path.join(tempfile.gettempdir(), f"divconq-resume-{key}")
    if local_rank == 0:
        shutil.rmtree(local, ignore_errors=True)
        checkpoint.to_directory(local)
    dist.barrier()
    try:
        yield local
    finally:
        dist.barrier()
        if local_rank == 0:
            shutil.rmtree(local, ignore_errors=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    from training.config import TrainConfig

    cfg = TrainConfig.model_validate(config["train_config"])
    hooks: dict[str, str] = dict(config.get("test_hooks") or {})

    import torch

    use_gpu = bool(cfg.scaling.use_gpu and torch.cuda.is_available())
    if not use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
        from training.engine import skip_unused_shm_op

        skip_unused_shm_op()

    import deepspeed
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline import storage
    from training import export, lora, sft_data
    from training.deepspeed_config import build_deepspeed_config, fused_adam_available, resolve_precision

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    local_rank = ctx.get_local_rank()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    torch.manual_seed(cfg.seed + rank)

    # ---- model files: local rank 0 downloads (s3://) first, the others then reuse the cache
    base_uri = config["base_model"]
    if local_rank == 0:
        base_dir = storage.localize(base_uri)
    dist.barrier()
    if local_rank != 0:
        base_dir = storage.localize(base_uri)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=cfg.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ---- data: every rank tokenizes all rows and takes its deterministic share of the plan
    train = sft_data.tokenize_rows(tokenizer, sft_data.read_rows(cfg.data.train_path), cfg.data.max_length)
    if not train.examples:
        raise ValueError(f"no usable training examples in {cfg.data.train_path}")
    val = None
    if cfg.data.validation_path:
        val = sft_data.tokenize_rows(tokenizer, sft_data.read_rows(cfg.data.validation_path), cfg.data.max_length)
    mbs, gas = cfg.deepspeed.micro_batch_size, cfg.deepspeed.gradient_accumulation_steps
    pack = cfg.data.pack_or_group == "pack"

    def plan(epoch: int) -> list[sft_data.Batch]:
        batches = sft_data.plan_epoch(
            train.lengths, mbs, world, epoch, cfg.seed, cfg.data.pack_or_group, cfg.data.max_length,
            cfg.data.shuffle, cfg.data.mega_batch_multiplier,
        )
        return sft_data.shard_batches(batches, rank, world, multiple_of=gas)

    micro_per_epoch = [len(plan(e)) for e in range(cfg.schedule.epochs)]  # same on every rank
    total_steps = sum(n // gas for n in micro_per_epoch)
    if cfg.schedule.max_steps:
        total_steps = min(total_steps, cfg.schedule.max_steps)

    # ---- DeepSpeed engine
    bf16_ok = use_gpu and torch.cuda.is_bf16_supported()
    precision = resolve_precision(cfg.deepspeed.precision, use_gpu, bf16_ok)
    ds_config = build_deepspeed_config(
        cfg, total_steps, world, use_gpu=use_gpu, bf16_supported=bf16_ok, fused_adam_available=use_gpu and fused_adam_available()
    )
    hf_ds_config = None
    if cfg.deepspeed.zero_stage == 3:
        # Keeps from_pretrained under deepspeed.zero.Init: weights are partitioned as they load.
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841 (must stay alive)
    load_kwargs: dict[str, Any] = {"dtype": _torch_dtype(cfg.model.dtype, precision), "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.attn_implementation:
        load_kwargs["attn_implementation"] = cfg.model.attn_implementation
    lora_cfg = cfg.model.lora
    if lora_cfg is not None and lora_cfg.qlora:
        load_kwargs.update(lora.quantization_kwargs(lora_cfg, load_kwargs["dtype"]))
    model = AutoModelForCausalLM.from_pretrained(base_dir, **load_kwargs)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    if lora_cfg is not None:
        model = lora.wrap(model, lora_cfg, cfg.model.gradient_checkpointing)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        dist_init_required=False,  # Ray Train already initialized torch.distributed
    )
    if lora_cfg is not None:
        lora.checkpoint_adapter_only(engine)
    if cfg.model.torch_compile:
        engine.compile(compile_kwargs={"dynamic": True})  # compiles lazily, at the first forward

    # ---- resume
    state = {"epoch": 0, "micro_step_in_epoch": 0, "global_step": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume_from"):
        checkpoint = _checkpoint_from_uri(config["resume_from"])
    if checkpoint is not None:
        with _local_checkpoint_dir(checkpoint, local_rank, dist) as ckpt_dir:
            with open(os.path.join(ckpt_dir, STATE_FILE)) as f:
                state = json.load(f)
            with export.weights_only_loads():
                # LoRA checkpoints hold the adapter only: the frozen base comes from base_model
                load_path, _ = engine.load_checkpoint(ckpt_dir, tag=state["tag"], load_module_strict=lora_cfg is None)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir} (tag {state['tag']})")
        log.info("rank %d resumed from step %d (epoch %d, micro-batch %d)", rank, state["global_step"], state["epoch"], state["micro_step_in_epoch"])
    start_step = int(state["global_step"])
    global_step = start_step

    # ---- helpers
    def to_device(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(device) for k, v in batch.items()}

    def all_sum(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def evaluate() -> Optional[float]:
        if val is None or not val.examples:
            return None
        batches = sft_data.plan_epoch(val.lengths, mbs, world, 0, cfg.seed, "group_by_length", cfg.data.max_length, False)
        loss_sum, n_tok = 0.0, 0.0
        engine.eval()
        with torch.no_grad():
            for batch, counts in sft_data.shard_eval_batches(batches, rank, world):
                tensors = to_device(sft_data.collate(val.examples, batch, pad_id, pack=False))
                out = engine(**tensors, use_cache=False)  # every rank runs the same count (ZeRO-3 gathers)
                n = float((tensors["labels"][:, 1:] != sft_data.IGNORE_INDEX).sum())
                if counts and n > 0:
                    loss_sum += float(out.loss) * n
                    n_tok += n
        engine.train()
        loss_sum, n_tok = all_sum([loss_sum, n_tok])
        return loss_sum / n_tok if n_tok else None

    session_start = time.time()
    tokens_session = 0.0
    tokens_base = float(state.get("tokens", 0.0))
    window_loss, window_n = 0.0, 0
    last_val: Optional[float] = state.get("val_loss")
    history: list[dict[str, Any]] = list(state.get("history", []))  # every report, across restarts
    reports = 0

    def metrics(epoch: int, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        nonlocal window_loss, window_n
        loss_sum, n, tokens = all_sum([window_loss, float(window_n), tokens_session])
        window_loss, window_n = 0.0, 0
        elapsed = max(time.time() - session_start, 1e-6)
        lrs = engine.get_lr()
        m = {
            "loss": loss_sum / n if n else float("nan"),
            "lr": float(lrs[0]) if lrs else 0.0,
            "step": global_step,
            "epoch": epoch,
            "tokens": tokens_base + tokens,
            "tokens_per_s": tokens / elapsed,
            "truncated_rows": train.truncated_rows,
            "total_steps": total_steps,
            "start_step": start_step,
        }
        if last_val is not None:
            m["val_loss"] = last_val
        m.update(extra or {})
        history.append({k: m[k] for k in ("step", "epoch", "loss", "lr", "val_loss", "tokens", "start_step") if k in m})
        return m

    def save_and_report(m: dict[str, Any], epoch: int, micro_step: int, done: bool, dir_name: Optional[str]) -> None:
        nonlocal reports
        tmp = tempfile.mkdtemp(prefix=f"divconq-ckpt-r{rank}-")
        tag = f"global_step{global_step}"
        engine.save_checkpoint(tmp, tag=tag, exclude_frozen_parameters=lora_cfg is not None)
        if done and lora_cfg is not None:
            adapter = lora.gather_adapter(engine, rank)  # collective
            if rank == 0:
                lora.save_adapter(engine.module, adapter, tokenizer, os.path.join(tmp, export.HF_SUBDIR),
                                  lora.adapter_base_name(cfg.model, base_uri))
        elif done:
            state_dict = export.gather_state_dict(engine)  # collective
            if rank == 0:
                export.save_hf_model(engine.module, state_dict, tokenizer, os.path.join(tmp, export.HF_SUBDIR))
        if rank == 0:
            trainer_state = {
                "epoch": epoch, "micro_step_in_epoch": micro_step, "global_step": global_step, "tag": tag,
                "done": done, "tokens": m["tokens"], "val_loss": m.get("val_loss"), "total_steps": total_steps,
                "history": history,
            }
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(trainer_state, f, indent=2)
        dist.barrier()
        ray.train.report(m, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=dir_name)
        reports += 1
        shutil.rmtree(tmp, ignore_errors=True)

    crash_at = int(hooks.get("DIVCONQ_TEST_CRASH_AT_STEP", 0) or 0)
    crash_marker = hooks.get("DIVCONQ_TEST_CRASH_MARKER", "")
    every = cfg.schedule.checkpoint_every_steps

    # ---- train
    engine.train()
    epoch = int(state["epoch"])
    skip = int(state["micro_step_in_epoch"])
    if epoch < len(micro_per_epoch) and skip >= micro_per_epoch[epoch]:
        epoch, skip = epoch + 1, 0
    while epoch < cfg.schedule.epochs and global_step < total_steps:
        batches = plan(epoch)
        i = skip
        for i in range(skip, len(batches)):
            tensors = to_device(sft_data.collate(train.examples, batches[i], pad_id, pack=pack))
            out = engine(**tensors, use_cache=False)
            engine.backward(out.loss)
            engine.step()
            window_loss += float(out.loss.detach())
            window_n += 1
            tokens_session += sft_data.real_tokens(train.examples, batches[i])
            if (i + 1) % gas:
                continue
            global_step += 1
            if crash_at and global_step == crash_at and rank == world - 1 and crash_marker and not os.path.exists(crash_marker):
                open(crash_marker, "w").close()
                log.warning("test hook: rank %d crashing at step %d", rank, global_step)
                os._exit(1)
            last_batch = i + 1 == len(batches) or global_step >= total_steps
            if last_batch:
                break  # epoch-end / final checkpoint below
            if every and global_step % every == 0:
                save_and_report(metrics(epoch), epoch, i + 1, False, f"checkpoint_{global_step:08d}")
            elif global_step % cfg.schedule.log_every_steps == 0:
                ray.train.report(metrics(epoch))
                reports += 1
        done = global_step >= total_steps or epoch + 1 >= cfg.schedule.epochs
        if cfg.schedule.eval_every_epoch or done:
            last_val = evaluate()
        save_and_report(metrics(epoch), epoch, i + 1, done, f"checkpoint_{global_step:08d}")
        epoch, skip = epoch + 1, 0

    if reports == 0:
        # Nothing left to train (resumed from a finished run): still hand back a final checkpoint.
        last_val = evaluate()
        save_and_report(metrics(max(epoch - 1, 0)), max(epoch - 1, 0), int(state["micro_step_in_epoch"]), True, None)

