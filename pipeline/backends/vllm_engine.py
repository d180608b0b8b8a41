"""vLLM (or SGLang) generation through Ray Data LLM (``ray.data.llm``), imported lazily.

``type: vllm`` backends run each ``generate`` call (one shard of a ``generate``, ``solve``
or ``infer`` job: the shard machinery in :mod:`pipeline.sharded` keeps its resume, exactly-once
commit and quarantine) as a Ray Data LLM pipeline: chat template -> tokenize -> engine ->
detokenize, with ``concurrency`` engine replicas of ``tensor_parallel_size x
pipeline_parallel_size`` GPUs each (of ``accelerator_type`` when set), ``batch_size`` rows per
engine call, and the job's sampling parameters per row (the seed shifted by the sample
index, as every backend does). Rows the engine fails on come back as errors (quarantined by
the job), not as a failed job (``should_continue_on_error``).

Every shard starts its engine replicas once (Ray Data's actor pools live for one execution),
so for vLLM set ``output.shard_size`` to minutes of work (thousands of rows) and the job's
``pool`` to CPU-only actors (``num_gpus: 0``): the GPUs are taken by the engine stage.

Only :func:`processor_config` and :func:`build_processor` need ``ray.data.llm`` (shipped with
Ray); the engine stage itself needs vLLM (``pip install 'divconq[gpu]'``) or SGLang on the GPU
nodes.
"""

from __future__ import annotations

import time
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from pipeline import storage
from pipeline.backends.base import Backend, BackendUnavailable, Completion, Request, SamplingParams
from pipeline.config import Tagged
from pipeline.structured import STRUCTURED_ROLES, guided_decoding_params


class VLLMBackendConfig(Tagged):
    """GPU generation through Ray Data LLM (``pipeline/backends/vllm_engine.py``)."""

    type: Literal["vllm"] = "vllm"
    engine: Literal["vllm", "sglang"] = Field("vllm", description="vLLMEngineProcessorConfig or SGLangEngineProcessorConfig.")
    model: str = Field(..., description="Hub name or a model dir every GPU node can read (s3:// is fetched to the local disk).")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict,
                                          description="Engine arguments, e.g. {max_model_len: 4096, gpu_memory_utilization: 0.9}.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine replica (tensor parallel).")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages per engine replica.")
    concurrency: int = Field(1, ge=1, description="Engine replicas (each tensor x pipeline parallel GPUs).")
    batch_size: int = Field(64, ge=1, description="Rows per batch sent to an engine replica.")
    accelerator_type: Optional[str] = Field(None, description="Ray accelerator type of the engine's GPUs, e.g. A10G, H100.")
    structured_output: bool = Field(False, description="vLLM guided decoding of the subquestion list as JSON.")

    @model_validator(mode="after")
    def _parallelism_in_one_place(self) -> "VLLMBackendConfig":
        for key in ("tensor_parallel_size", "pipeline_parallel_size", "tp_size", "pp_size"):
            if key in self.engine_kwargs:
                raise ValueError(f"set tensor_parallel_size / pipeline_parallel_size as fields, not engine_kwargs.{key}")
        return self


def engine_kwargs(cfg) -> dict[str, Any]:
    """The engine's own kwargs: ``cfg.engine_kwargs`` plus the parallelism fields."""
    kwargs = dict(cfg.engine_kwargs)
    if cfg.engine == "vllm":
        kwargs.update(tensor_parallel_size=cfg.tensor_parallel_size, pipeline_parallel_size=cfg.pipeline_parallel_size)
    else:  # SGLang's names: tp_size / pp_size
        kwargs.update(tp_size=cfg.tensor_parallel_size, pp_size=cfg.pipeline_parallel_size)
    return kwargs


def processor_config(cfg, model_source: str | None = None):
    """``vLLMEngineProcessorConfig`` / ``SGLangEngineProcessorConfig`` with every field of ``cfg``."""
    from ray.data import llm  # lazy: ray.data costs ~2 s to import; only a type: vllm backend needs it

    cls = llm.vLLMEngineProcessorConfig if cfg.engine == "vllm" else llm.SGLangEngineProcessorConfig
    return cls(model_source=model_source or cfg.model, engine_kwargs=engine_kwargs(cfg), concurrency=cfg.concurrency,
               batch_size=cfg.batch_size, accelerator_type=cfg.accelerator_type, should_continue_on_error=True)


def sampling_params(engine: str, params: SamplingParams, sample_index: int) -> dict[str, Any]:
    """One row's sampling parameters in the engine's own names."""
    stop = list(params.stop) or None
    if engine == "vllm":
        return {"temperature": params.temperature, "top_p": params.top_p, "max_tokens": params.max_tokens,
                "seed": params.seed + sample_index, "stop": stop}
    return {"temperature": params.temperature, "top_p": params.top_p, "max_new_tokens": params.max_tokens,
            "sampling_seed": params.seed + sample_index, "stop": stop}


class _Preprocess:
    """Row -> engine input (a class, not a closure: Ray pickles it to the stage actors)."""

    def __init__(self, engine: str, params: SamplingParams):
        self.engine, self.params = engine, params

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        sampling = sampling_params(self.engine, self.params, int(row["sample_index"]))
        if row.get("guided") and self.engine == "vllm":  # structured_output: the subquestion list as JSON
            sampling.update(guided_decoding_params())
        return {"request_index": int(row["request_index"]), "messages": list(row["messages"]), "sampling_params": sampling}


def postprocess(row: dict[str, Any]) -> dict[str, Any]:
    """Engine output -> the fields of a :class:`Completion` (+ the request's index)."""
    return {"request_index": int(row["request_index"]), "text": row.get("generated_text") or "",
            "prompt_tokens": int(row.get("num_input_tokens") or 0),
            "completion_tokens": int(row.get("num_generated_tokens") or 0),
            "error": row.get("__inference_error__") or None}


def to_completion(out: dict[str, Any], max_tokens: int, latency_s: float) -> Completion:
    if out["error"]:
        return Completion(text="", error=str(out["error"]), latency_s=latency_s)
    finish = "length" if out["completion_tokens"] >= max_tokens else "stop"
    return Completion(text=out["text"].strip(), prompt_tokens=out["prompt_tokens"],
                      completion_tokens=out["completion_tokens"], latency_s=latency_s, finish_reason=finish)


def build_processor(cfg, params: SamplingParams, model_source: str | None = None):
    """A Ray Data LLM processor mapping rows ``{request_index, sample_index, messages}`` to
    ``{request_index, text, prompt_tokens, completion_tokens, error}``."""
    from ray.data.llm import build_processor as build  # lazy: as in processor_config

    return build(processor_config(cfg, model_source), preprocess=_Preprocess(cfg.engine, params), postprocess=postprocess)


class VLLMBackend(Backend):
    """``type: vllm``: each ``generate`` call runs one Ray Data LLM pipeline over its requests."""

    def __init__(self, cfg, **_: Any):
        self.cfg = cfg
        self.name = cfg.model
        # storage URLs (s3://...) are fetched once here; engines on other nodes need the model at the same
        # path (shared storage) or a hub name
        self.model_source = cfg.model if storage.is_local(cfg.model) else storage.localize(cfg.model)
        self.processor_config = processor_config(cfg, self.model_source)  # validates every field now

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        import ray.data  # lazy: ~2 s to import; only a type: vllm backend needs it

        guided = bool(getattr(self.cfg, "structured_output", False))
        rows = [{"request_index": i, "sample_index": r.sample_index, "messages": r.messages,
                 "guided": guided and r.role in STRUCTURED_ROLES} for i, r in enumerate(requests)]
        start = time.perf_counter()
        try:
            processor = build_processor(self.cfg, params, self.model_source)
            outs = processor(ray.data.from_items(rows)).take_all()
        except Exception as e:  # the engine could not start (no vLLM / GPUs): an infrastructure failure
            raise BackendUnavailable(f"{self.cfg.engine} engine for {self.name} failed: {type(e).__name__}: "
                                     f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}") from e
        latency = (time.perf_counter() - start) / max(1, len(requests))
        by_index = {int(o["request_index"]): o for o in outs}
        missing = {"request_index": -1, "text": "", "prompt_tokens": 0, "completion_tokens": 0,
                   "error": "the engine returned no output for this request"}
        return [to_completion(by_index.get(i, missing), params.max_tokens, latency) for i in range(len(requests))]
