"""vLLM on GPU nodes, imported lazily so CPU installs never need it.

Two ways to use vLLM:
* ``VLLMBackend``: an in-actor ``vllm.LLM`` engine behind the common backend interface
  (used by ``generate``/``solve``/``infer`` actor pools with ``num_gpus`` per actor).
* ``build_ray_data_llm_processor``: Ray's own ``ray.data.llm`` vLLM processor, for users
  who want Ray's engine management (tensor/pipeline parallel, continuous batching)
  over a Ray Dataset of chat messages.
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.backends.base import Backend, Completion, Request, SamplingParams


def _require_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only where vLLM is missing by design
        raise ImportError("the vllm backend needs vLLM on a GPU node: pip install 'divconq[gpu]'") from e
    return vllm


class VLLMBackend(Backend):  # pragma: no cover - needs a GPU and vLLM
    def __init__(self, model: str, engine_kwargs: dict[str, Any] | None = None, structured_output: bool = False, **_: Any):
        vllm = _require_vllm()
        self.structured_output = structured_output
        from pipeline import storage

        self.name = model
        self._vllm = vllm
        path = storage.localize(model) if storage.is_s3(model) else model
        self.llm = vllm.LLM(model=path, **(engine_kwargs or {}))

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        sp = [
            self._vllm.SamplingParams(temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens,
                                      seed=params.seed + r.sample_index, stop=list(params.stop) or None,
                                      **self._guided(r.role))
            for r in requests
        ]
        start = time.perf_counter()
        outs = self.llm.chat([r.messages for r in requests], sp, use_tqdm=False)
        latency = (time.perf_counter() - start) / max(1, len(requests))
        result = []
        for o in outs:
            c = o.outputs[0]
            result.append(Completion(text=c.text.strip(), prompt_tokens=len(o.prompt_token_ids or []),
                                     completion_tokens=len(c.token_ids), latency_s=latency, finish_reason=c.finish_reason))
        return result

    def _guided(self, role: str) -> dict[str, Any]:
        """vLLM guided decoding of the subquestion JSON for decomposer requests (``structured_output``)."""
        from pipeline.structured import STRUCTURED_ROLES, SUBQUESTIONS_SCHEMA

        if not (self.structured_output and role in STRUCTURED_ROLES):
            return {}
        return {"guided_decoding": self._vllm.sampling_params.GuidedDecodingParams(json=SUBQUESTIONS_SCHEMA)}


def build_ray_data_llm_processor(model: str, params: SamplingParams, engine_kwargs: dict[str, Any] | None = None,
                                 concurrency: int = 1, batch_size: int = 64, accelerator_type: str | None = None,
                                 structured_output: bool = False):
    """A ``ray.data.llm`` vLLM processor mapping rows with a ``messages`` column to ``generated_text``."""
    from ray.data.llm import build_llm_processor, vLLMEngineProcessorConfig  # noqa: WPS433 - lazy on purpose

    config = vLLMEngineProcessorConfig(model_source=model, engine_kwargs=engine_kwargs or {}, concurrency=concurrency,
                                       batch_size=batch_size, accelerator_type=accelerator_type)
    sampling = dict(temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens)
    if structured_output:  # the subquestion list as JSON via vLLM guided decoding (pipeline.structured)
        from pipeline.structured import guided_decoding_params

        sampling.update(guided_decoding_params())
    return build_llm_processor(
        config,
        preprocess=lambda row: dict(messages=list(row["messages"]), sampling_params=sampling),
        postprocess=lambda row: dict(row, generated_text=row["generated_text"]),
    )
