"""Turn trained DeepSpeed weights into an ordinary Hugging Face model directory.

In the workers, at the end of training: :func:`gather_state_dict` collects the full
weights on rank 0 (ZeRO-3: layer by layer, via DeepSpeed's consolidated state dict;
ZeRO-0/1/2: every rank already holds full weights) and :func:`save_hf_model` writes
``config.json`` + ``model.safetensors`` + tokenizer + ``generation_config.json`` into the
``hf_model/`` folder of the final Ray Train checkpoint. On the driver,
:func:`export_from_checkpoint` copies that folder to ``output.dir`` (local or s3://).

:func:`state_dict_from_deepspeed_checkpoint` rebuilds fp32 weights offline from any
DeepSpeed checkpoint folder (e.g. an intermediate one) with DeepSpeed's ``zero_to_fp32``,
loading the pickles with ``torch.load(weights_only=True)`` (see :func:`weights_only_loads`).
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import tempfile
from typing import Any, Iterator, Optional

import pyarrow.fs as pafs
import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pipeline import storage
from pipeline.chat import render_chat
from training import lora

HF_SUBDIR = "hf_model"


# ---------------------------------------------------------------- safe torch.load
def _deepspeed_safe_globals() -> list[Any]:
    """Non-tensor classes DeepSpeed pickles into its checkpoints (allow-listed for weights_only)."""
    # lazy: DeepSpeed picks its accelerator at import (training.engine.choose_accelerator first)
    out: list[Any] = []
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum  # lazy: see above

        out.append(ZeroStageEnum)
    except Exception:  # pragma: no cover - optional across DeepSpeed versions
        pass
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # lazy: see above

        out.extend([LossScaler, DynamicLossScaler])
    except Exception:  # pragma: no cover
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address  # lazy: see above

        out.append(fragment_address)
    except Exception:  # pragma: no cover
        pass
    out.extend([collections.OrderedDict, collections.defaultdict, dict, list, set, tuple])
    return out


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Force ``torch.load(weights_only=True)`` inside the block, even where a library passes
    ``weights_only=False`` (DeepSpeed does), allow-listing DeepSpeed's own plain classes. A
    checkpoint holding anything else fails to load instead of running arbitrary pickle code."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


# ---------------------------------------------------------------- in the workers
def gather_state_dict(engine) -> Optional[dict[str, Any]]:
    """Full weights on CPU on global rank 0 (``None`` elsewhere). Collective: call on every rank."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if engine.zero_optimization_partition_weights():  # ZeRO-3
        return engine._zero3_consolidated_16bit_state_dict()
    if rank != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def save_hf_model(model, state_dict: dict[str, Any], tokenizer, out_dir: str) -> str:
    """Write a loadable HF model dir (safetensors) from ``model``'s config and ``state_dict``."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=state_dict)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------- on the driver
def export_from_checkpoint(checkpoint, dest: str, merge_lora: bool = False, dtype: str = "float32") -> str:
    """Copy ``hf_model/`` of a Ray Train checkpoint (local or remote) to ``dest`` (local or s3://).

    ``merge_lora``: the folder is a LoRA adapter; write base + adapter merged instead."""
    src_fs, src_path = checkpoint.filesystem, checkpoint.path.rstrip("/") + "/" + HF_SUBDIR
    if src_fs.get_file_info(src_path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"checkpoint {checkpoint.path} has no {HF_SUBDIR}/ (training did not finish?)")
    if merge_lora:
        adapter = tempfile.mkdtemp(prefix="divconq-adapter-")
        try:
            pafs.copy_files(src_path, adapter, source_filesystem=src_fs, destination_filesystem=pafs.LocalFileSystem())
            return write_hf_dir(lambda d: lora.merge_adapter(adapter, d, dtype=dtype), dest)
        finally:
            shutil.rmtree(adapter, ignore_errors=True)
    dst_fs, dst_path = storage.arrow_filesystem(dest)
    dst_fs.create_dir(dst_path, recursive=True)
    pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)
    return dest


def state_dict_from_deepspeed_checkpoint(checkpoint_dir: str, tag: Optional[str] = None) -> dict[str, Any]:
    """fp32 weights from a (ZeRO-1/2/3) DeepSpeed checkpoint folder, loaded weights-only."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # lazy: accelerator, as above

    with weights_only_loads():
        return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)


def export_deepspeed_checkpoint(checkpoint_dir: str, base_model_dir: str, dest: str, tag: Optional[str] = None) -> str:
    """Offline export of any DeepSpeed checkpoint to an HF dir at ``dest`` (local or s3://)."""
    base = storage.localize(base_model_dir)
    state_dict = state_dict_from_deepspeed_checkpoint(checkpoint_dir, tag)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    tokenizer = AutoTokenizer.from_pretrained(base)
    return write_hf_dir(lambda d: save_hf_model(model, state_dict, tokenizer, d), dest)


def write_hf_dir(write, dest: str) -> str:
    """Run ``write(local_dir)``; for storage URLs (s3://...) write to a temp dir and upload."""
    if storage.is_local(dest):
        write(storage.localize(dest))
        return dest
    tmp = tempfile.mkdtemp(prefix="divconq-export-")
    try:
        write(tmp)
        storage.copy_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def smoke_generate(model_dir: str, messages: list[dict[str, str]], max_new_tokens: int = 16) -> str:
    """Load an exported dir with ``AutoModelForCausalLM``/``AutoTokenizer`` and greedily generate."""
    local = storage.localize(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(local)
    model = AutoModelForCausalLM.from_pretrained(local)
    model.eval()
    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
