"""Backends: OpenAI-compatible HTTP, local Hugging Face, vLLM / SGLang through ray.data.llm (GPU, lazy), and offline reference."""

from __future__ import annotations

from typing import Optional

from pipeline.backends.base import Backend, BackendUnavailable, Completion, Request, SamplingParams
from pipeline.backends.cache import CachedBackend
from pipeline.backends.hf_local import HFBackend
from pipeline.backends.openai_batch import OpenAIBatchBackend
from pipeline.backends.openai_http import OpenAIBackend
from pipeline.backends.reference import ReferenceBackend
from pipeline.backends.vllm_engine import VLLMBackend

__all__ = ["Backend", "BackendUnavailable", "Completion", "Request", "SamplingParams", "make_backend"]


def make_backend(cfg, cache_dir: Optional[str] = None, job_dir: Optional[str] = None) -> Backend:
    """Build the backend a config section describes (``type``: openai | hf | reference | vllm).

    ``job_dir`` is the job's output dir: a batch-mode teacher keeps its batch ids there (resume)."""
    kind = cfg.type
    if kind == "openai" and cfg.mode == "batch":
        backend: Backend = OpenAIBatchBackend(cfg, job_dir=job_dir)
    elif kind == "openai":
        backend = OpenAIBackend(cfg)
    elif kind == "hf":
        backend = HFBackend(cfg.model, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size,
                            trust_remote_code=cfg.trust_remote_code, max_input_tokens=cfg.max_input_tokens,
                            truncate_prompts=cfg.truncate_prompts,
                            generation_kwargs=cfg.generation_kwargs)
    elif kind == "reference":
        backend = ReferenceBackend(cfg.model, role=cfg.role, coverage_threshold=cfg.coverage_threshold)
    elif kind == "vllm":
        backend = VLLMBackend(cfg)
    else:  # pragma: no cover - pydantic rejects unknown types first
        raise ValueError(f"unknown backend type {kind!r}")
    if cache_dir:
        backend = CachedBackend(backend, cache_dir)
    return backend
