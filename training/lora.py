"""LoRA / QLoRA students with peft, inside the DeepSpeed loop and at export.

* :func:`load_base` loads the frozen base (QLoRA: 4-bit NF4 through bitsandbytes, GPU only)
  and :func:`wrap` adds the adapters (``model.lora``), so only they are trainable: DeepSpeed
  then builds optimizer states for the adapter alone, and checkpoints are written with
  ``exclude_frozen_parameters=True`` (the base is never copied into a checkpoint).
* :func:`save_adapter` writes a peft adapter directory (``adapter_config.json`` +
  ``adapter_model.safetensors`` + tokenizer) from the adapter weights gathered on rank 0;
  ``base_model_name_or_path`` names the base the run trained on, so ``transformers``
  (with peft installed), ``peft`` and vLLM's LoRA support load it.
* :func:`merge_adapter` loads base + adapter on the CPU, merges (``merge_and_unload``) and
  writes an ordinary Hugging Face model directory.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from pipeline import storage


def peft_config(section):
    from peft import LoraConfig, TaskType  # lazy: peft costs ~2 s of import per worker; only LoRA runs use it

    targets = section.target_modules if isinstance(section.target_modules, str) else list(section.target_modules)
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      target_modules=targets)


def quantization_kwargs(section, compute_dtype) -> dict[str, Any]:
    """``from_pretrained`` kwargs of the 4-bit base (QLoRA); a clear error where it cannot run."""
    if not torch.cuda.is_available():
        raise RuntimeError("model.lora.qlora needs a CUDA GPU (bitsandbytes 4-bit); this worker has none")
    try:
        import bitsandbytes  # noqa: F401  # lazy: an optional GPU extra
    except ImportError as e:
        raise RuntimeError("model.lora.qlora needs bitsandbytes: pip install 'divconq[gpu]'") from e
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=compute_dtype)
    return {"quantization_config": bnb, "device_map": {"": torch.cuda.current_device()}}


def wrap(model, section, gradient_checkpointing: bool):
    """``model`` with LoRA adapters; everything else frozen."""
    from peft import get_peft_model, prepare_model_for_kbit_training  # lazy: see peft_config

    if section.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need an input with grad
    return get_peft_model(model, peft_config(section))


def checkpoint_adapter_only(engine) -> None:
    """Make ``save_checkpoint(exclude_frozen_parameters=True)`` drop *every* frozen weight.

    DeepSpeed drops the frozen names that ``named_parameters()`` lists, which names a tied weight
    once (the input embedding), so a tied ``lm_head.weight`` (Llama 3.2, Qwen2, Gemma) would still
    be written; DeepSpeed has no option for this, hence the instance-level wrapper."""
    frozen = {n for n, p in engine.module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    original = engine.module_state_dict

    def module_state_dict(*args: Any, **kwargs: Any):
        sd = original(*args, **kwargs)
        if kwargs.get("exclude_frozen_parameters") and sd is not None:
            for name in frozen:
                sd.pop(name, None)
        return sd

    engine.module_state_dict = module_state_dict


def gather_adapter(engine, rank: int) -> Optional[dict[str, Any]]:
    """The trainable (adapter) weights on CPU on rank 0, ``None`` elsewhere. Collective: call on
    every rank. ZeRO-3 gathers only these parameters, never the frozen base."""
    import deepspeed  # lazy: DeepSpeed picks its accelerator at import (training.engine.choose_accelerator first)

    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    gather = (deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
              if engine.zero_optimization_partition_weights() else contextlib.nullcontext())
    with gather:
        if rank != 0:
            return None
        return {n: p.detach().cpu().clone().contiguous() for n, p in named}


def save_adapter(peft_model, adapter_sd: dict[str, Any], tokenizer, out_dir: str, base_model: str) -> str:
    """A peft adapter directory that names ``base_model`` as its base."""
    os.makedirs(out_dir, exist_ok=True)
    peft_model.peft_config["default"].base_model_name_or_path = base_model
    # peft filters the named trainable weights down to the adapter; embeddings are never adapted here
    peft_model.save_pretrained(out_dir, state_dict=adapter_sd, save_embedding_layers=False)
    tokenizer.save_pretrained(out_dir)
    base_gen = getattr(peft_model.get_base_model(), "generation_config", None)
    if base_gen is not None:
        base_gen.save_pretrained(out_dir)
    return out_dir


def adapter_base_name(model_cfg, staged_base: str) -> str:
    """What the adapter names as its base: the hub name when the run started from one (loadable
    anywhere), else the staged base dir the run trained on (a local dir, or s3://)."""
    name = model_cfg.name_or_path
    if not model_cfg.build_tiny and name and storage.is_local(name) and not os.path.isdir(os.path.expanduser(name)):
        return name
    return staged_base


def merge_adapter(adapter_dir: str, out_dir: str, base_model: Optional[str] = None, dtype: str = "float32") -> str:
    """Base + adapter merged into a plain HF model directory at ``out_dir`` (local)."""
    from peft import PeftModel  # lazy: see peft_config
    if base_model is None:
        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            base_model = json.load(f)["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(storage.localize(base_model), dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    os.makedirs(out_dir, exist_ok=True)
    merged.save_pretrained(out_dir)
    merged.generation_config.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out_dir)
    return out_dir
