"""The model and its DeepSpeed engine inside a Ray Train worker: load the base model (full, LoRA or
QLoRA, ZeRO-3 partitioned as it loads), wrap it in a DeepSpeed engine, and tear it down again so that
the next model of the job starts clean."""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from training import lora
from training.config import TrainConfig
from training.deepspeed_config import build_deepspeed_config, fused_adam_available, resolve_precision

SHM_COMM_OP = "deepspeed_shm_comm"

log = logging.getLogger("divconq.train")


def choose_accelerator(use_gpu: bool) -> None:
    """Pin DeepSpeed's accelerator before it is imported (it picks one at import): CPU unless the job
    trains on GPUs, even on a node that has one. A GPU job drops a ``DS_ACCELERATOR=cpu`` inherited from
    the driver's environment (a CPU test session, a CPU job run before it): DeepSpeed would keep the model on
    the CPU and nccl would fail on its first broadcast ("No backend type associated with device type cpu")."""
    if not use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    elif os.environ.get("DS_ACCELERATOR") == "cpu":
        log.warning("scaling.use_gpu is true: ignoring DS_ACCELERATOR=cpu from the environment")
        del os.environ["DS_ACCELERATOR"]


def skip_unused_shm_op() -> None:
    """Keep DeepSpeed from JIT-building its shared-memory all-reduce op on CPU.

    DeepSpeed's CPU comm backend builds ``deepspeed_shm_comm`` with ninja when it starts (30 s of both
    cores on a 2-core Xeon, ~100 s on an EPYC), although only tensor-parallel inference
    (``inference_all_reduce``) uses it: ZeRO training's collectives go through torch.distributed
    (gloo). Its build command holds the venv's absolute paths, so every venv that shares
    ``~/.cache/torch_extensions`` (a CI clone, another checkout) invalidates the cache for the others
    and the next job rebuilds it (benchmarks/bench_train_fixed_cost). Marking the op incompatible in
    DeepSpeed's own table makes ``build_shm_op`` return None and ``inference_all_reduce`` fall back
    to torch.distributed; there is no DeepSpeed setting for it.
    """
    import deepspeed.ops  # lazy: DeepSpeed picks its accelerator at import (choose_accelerator first)

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def torch_dtype(name: str, precision: str) -> torch.dtype:
    if name == "auto":
        name = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@dataclass
class Engine:
    """A DeepSpeed engine and what must live as long as it (ZeRO-3's HF config hook)."""

    engine: Any
    hf_ds_config: Optional[HfDeepSpeedConfig] = None

    def close(self) -> None:
        """Release the engine (hooks, partitioned parameters, optimizer state) before the next model."""
        destroy = getattr(self.engine, "destroy", None)
        if callable(destroy):
            destroy()
        if self.hf_ds_config is not None:
            unset_hf_deepspeed_config()
        self.engine = self.hf_ds_config = None
        gc.collect()


def load_model(cfg: TrainConfig, base_dir: str, precision: str):
    """The base causal LM, ready to train: gradient checkpointing, no KV cache, LoRA adapters."""
    kwargs: dict[str, Any] = {"dtype": torch_dtype(cfg.model.dtype, precision), "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    lora_cfg = cfg.model.lora
    if lora_cfg is not None and lora_cfg.qlora:
        kwargs.update(lora.quantization_kwargs(lora_cfg, kwargs["dtype"]))
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    if lora_cfg is not None:
        model = lora.wrap(model, lora_cfg, cfg.model.gradient_checkpointing)
    return model


def build_engine(cfg: TrainConfig, base_dir: str, total_steps: int, world_size: int, use_gpu: bool) -> Engine:
    """``deepspeed.initialize`` over the loaded model (torch.distributed is already up: Ray Train)."""
    import deepspeed  # lazy: DeepSpeed picks its accelerator at import (choose_accelerator first)

    if not use_gpu:
        skip_unused_shm_op()
    bf16_ok = use_gpu and torch.cuda.is_bf16_supported()
    precision = resolve_precision(cfg.deepspeed.precision, use_gpu, bf16_ok)
    ds_config = build_deepspeed_config(cfg, total_steps, world_size, use_gpu=use_gpu, bf16_supported=bf16_ok,
                                       fused_adam_available=use_gpu and fused_adam_available())
    # ZeRO-3: keeps from_pretrained under deepspeed.zero.Init, so weights are partitioned as they load.
    hf_ds_config = HfDeepSpeedConfig(ds_config) if cfg.deepspeed.zero_stage == 3 else None
    model = load_model(cfg, base_dir, precision)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           config=ds_config, dist_init_required=False)
    if cfg.model.lora is not None:
        lora.checkpoint_adapter_only(engine)
    if cfg.model.torch_compile:
        engine.compile(compile_kwargs={"dynamic": True})  # compiles lazily, at the first forward
    return Engine(engine, hf_ds_config)
