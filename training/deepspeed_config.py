"""Build the DeepSpeed config dict from a ``TrainConfig`` (a pure function, unit-tested)."""

from __future__ import annotations

import shutil
from typing import Any

from pipeline.config import deep_merge
from training.config import TrainConfig


def resolve_precision(precision: str, use_gpu: bool, bf16_supported: bool = False) -> str:
    """``auto`` -> bf16 on a GPU that supports it, else fp32 (CPU trains in fp32)."""
    if precision == "auto":
        return "bf16" if use_gpu and bf16_supported else "fp32"
    if precision in ("bf16", "fp16") and not use_gpu:
        # Half-precision DeepSpeed engines need an accelerator; CPU training stays fp32.
        return "fp32"
    return precision


def fused_adam_available() -> bool:
    """Whether DeepSpeed's FusedAdam can be used here: prebuilt, or JIT-buildable (nvcc + ninja)."""
    try:
        from deepspeed.git_version_info import installed_ops  # lazy: DeepSpeed loads only in workers

        if installed_ops.get("fused_adam"):
            return True
        from deepspeed.ops.op_builder import FusedAdamBuilder  # lazy: DeepSpeed loads only in workers

        return bool(FusedAdamBuilder().is_compatible(verbose=False) and shutil.which("nvcc") and shutil.which("ninja"))
    except Exception:
        return False


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.optim.warmup_steps is not None:
        return cfg.optim.warmup_steps
    return int(round(cfg.optim.warmup_ratio * total_steps))


def scheduler_config(cfg: TrainConfig, total_steps: int) -> dict[str, Any]:
    lr = cfg.optim.lr
    warm = warmup_steps(cfg, total_steps)
    # DeepSpeed schedulers need warmup_num_steps >= 1; with no warmup start at the peak lr.
    num_warm = max(1, warm)
    start_lr = 0.0 if warm > 0 else lr
    total = max(1, total_steps)
    if cfg.optim.scheduler == "cosine":
        return {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": total,
                "warmup_min_ratio": 0.0 if warm > 0 else 1.0,
                "warmup_num_steps": num_warm,
                "cos_min_ratio": cfg.optim.min_lr_ratio,
                "warmup_type": "linear",
            },
        }
    if cfg.optim.scheduler == "linear":
        return {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": total,
                "warmup_min_lr": start_lr,
                "warmup_max_lr": lr,
                "warmup_num_steps": num_warm,
                "warmup_type": "linear",
            },
        }
    return {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": start_lr, "warmup_max_lr": lr, "warmup_num_steps": num_warm, "warmup_type": "linear"},
    }


def build_deepspeed_config(
    cfg: TrainConfig,
    total_steps: int,
    world_size: int,
    use_gpu: bool | None = None,
    bf16_supported: bool = False,
    fused_adam_available: bool = True,
) -> dict[str, Any]:
    """DeepSpeed JSON config for ``cfg``; ``total_steps`` = optimizer steps of the whole run.

    ``fused_adam_available``: DeepSpeed's FusedAdam op is prebuilt or can be JIT-built (see
    :func:`fused_adam_available`); without it torch's AdamW is used everywhere."""
    ds = cfg.deepspeed
    use_gpu = cfg.scaling.use_gpu if use_gpu is None else use_gpu
    precision = resolve_precision(ds.precision, use_gpu, bf16_supported)
    # torch's AdamW needs no compiled DeepSpeed op (CPU, any GPU); fused Adam only for bf16 on GPU.
    torch_adam = not (use_gpu and precision == "bf16" and fused_adam_available)

    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 2:
        zero.update({"contiguous_gradients": True, "overlap_comm": bool(use_gpu)})
    if ds.zero_stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": True})
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(use_gpu)}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": bool(use_gpu)}

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": ds.micro_batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "gradient_clipping": ds.gradient_clipping,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.optim.lr,
                "betas": list(cfg.optim.betas),
                "eps": cfg.optim.eps,
                "weight_decay": cfg.optim.weight_decay,
                "torch_adam": torch_adam,
            },
        },
        "scheduler": scheduler_config(cfg, total_steps),
    }
    if ds.offload_optimizer and torch_adam:
        config["zero_force_ds_cpu_optimizer"] = False  # keep torch AdamW (no compiled CPUAdam)
    return deep_merge(config, ds.extra)
