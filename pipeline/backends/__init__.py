"""Backends: OpenAI-compatible HTTP, local Hugging Face, vLLM / SGLang through ray.data.llm (GPU, lazy), and offline reference."""

from __future__ import annotations

from typing import Annotated, Optional, Union

from pydantic import Field

from pipeline.backends.base import Backend, BackendUnavailable, Completion, Request, SamplingParams
from pipeline.backends.cache import CachedBackend
from pipeline.backends.hf_local import HFBackend, HFBackendConfig
from pipeline.backends.openai_batch import OpenAIBatchBackend
from pipeline.backends.openai_http import OpenAIBackend, OpenAIBackendConfig, OpenAIBatchConfig
from pipeline.backends.reference import ReferenceBackend, ReferenceBackendConfig
from pipeline.backends.vllm_engine import VLLMBackend, VLLMBackendConfig

# A job config's backend section: each type's schema lives beside its backend.
BackendConfig = Annotated[
    Union[OpenAIBackendConfig, HFBackendConfig, ReferenceBackendConfig, VLLMBackendConfig],
    Field(discriminator="type"),
]

__all__ = ["Backend", "BackendConfig", "BackendUnavailable", "Completion", "HFBackendConfig", "OpenAIBackendConfig",
           "OpenAIBatchConfig", "ReferenceBackendConfig", "Request", "SamplingParams", "VLLMBackendConfig", "make_backend"]


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
                            truncate_prompts=cfg.truncate_prompts, generation_kwargs=cfg.generation_kwargs,
                            wait_for=cfg.wait_for, wait_timeout_s=cfg.wait_timeout_s)
    elif kind == "reference":
        backend = ReferenceBackend(cfg.model, role=cfg.role, coverage_threshold=cfg.coverage_threshold)
    elif kind == "vllm":
        backend = VLLMBackend(cfg)
    else:  # pragma: no cover - pydantic rejects unknown types first
        raise ValueError(f"unknown backend type {kind!r}")
    if cache_dir:
        backend = CachedBackend(backend, cache_dir)
    return backend
