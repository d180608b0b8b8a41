"""The decomposer student on GPU with vLLM, through Ray Serve LLM (``ray.serve.llm``).

``decomposer.engine: vllm`` replaces the ``transformers`` Decomposer with two deployments:
Ray Serve LLM's ``LLMServer`` (a vLLM engine per replica: continuous batching, tensor
parallel, placement groups; built from :func:`llm_config`) and :class:`VLLMDecomposer`, a
thin deployment with the Decomposer's interface (``generate(messages, params)``, ``stats()``)
that the Ingress composes in ``/v1/solve`` and ``/v1/chat/completions`` exactly like the
CPU default. ``ray.serve.llm`` needs vLLM (``pip install 'divconq[gpu]'``); it is imported only
when this engine is chosen, and a missing vLLM is one clear error at build time.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

from ray import serve


def llm_config(dec) -> Any:
    """Ray Serve LLM's ``LLMConfig`` for a ``DecomposerConfig`` with ``engine: vllm``."""
    # lazy: ray.llm's serve configs load the vLLM-facing modules; only engine: vllm needs them
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig  # the class ray.serve.llm exports

    if os.path.exists(os.path.join(dec.model, "adapter_config.json")):
        raise ValueError(f"decomposer.model {dec.model!r} is a LoRA adapter: export the merged student "
                         "(model.lora.export=merged) to serve it with decomposer.engine=vllm")
    deployment: dict[str, Any] = {"max_ongoing_requests": dec.deployment_options()["max_ongoing_requests"]}
    if dec.autoscaling is not None:
        deployment["autoscaling_config"] = dec.autoscaling.to_ray()
    else:
        deployment["num_replicas"] = dec.num_replicas or 1
    engine_kwargs = {**dec.vllm.engine_kwargs, "tensor_parallel_size": dec.vllm.tensor_parallel_size,
                     "trust_remote_code": dec.trust_remote_code, "dtype": dec.dtype, "max_model_len": dec.max_input_tokens + dec.sampling.max_tokens}
    return LLMConfig(model_loading_config={"model_id": dec.served_name, "model_source": dec.model},
                     engine_kwargs=engine_kwargs, accelerator_type=dec.vllm.accelerator_type,
                     deployment_config=deployment)


def build_llm_server(dec):
    """The bound ``LLMServer`` deployment; a clear error where ray.serve.llm cannot load (no vLLM)."""
    try:
        from ray.serve.llm import build_llm_deployment  # lazy: needs vLLM, which only GPU nodes have
    except ImportError as e:
        raise RuntimeError(f"decomposer.engine=vllm needs Ray Serve LLM with vLLM on the serving nodes "
                           f"(pip install 'divconq[gpu]'): {e}") from None
    return build_llm_deployment(llm_config(dec), name_prefix="DecomposerLLM:")


@serve.deployment(name="Decomposer")
class VLLMDecomposer:
    """The Decomposer interface over an ``LLMServer`` handle (vLLM batches continuously itself)."""

    role = "decomposer"

    def __init__(self, llm_server: Any, served_name: str) -> None:
        self.llm = llm_server
        self.served_name = served_name
        self._counts: Counter = Counter()
        self._pid = os.getpid()
        self._started_at = time.time()

    async def generate(self, messages: list[dict[str, str]], params: dict[str, Any]) -> dict[str, Any]:
        # lazy: as in llm_config (vLLM-facing modules, GPU nodes only)
        from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionRequest

        self._counts["requests"] += 1
        request = ChatCompletionRequest(model=self.served_name, messages=messages, max_tokens=int(params["max_tokens"]),
                                        temperature=float(params["temperature"]), top_p=float(params["top_p"]),
                                        seed=int(params["seed"]), stop=list(params.get("stop") or []) or None, stream=False)
        try:
            async for response in self.llm.options(stream=True).chat.remote(request):
                return self._result(response)
        except Exception as e:  # an engine failure is an error result; the replica keeps serving
            self._counts["errors"] += 1
            return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        return {"error": "the vLLM server returned no response"}

    def _result(self, response: Any) -> dict[str, Any]:
        body = response.model_dump() if hasattr(response, "model_dump") else dict(response)
        if "error" in body and body["error"]:
            self._counts["errors"] += 1
            return {"error": str(body["error"].get("message", body["error"]))}
        choice, usage = body["choices"][0], body.get("usage") or {}
        self._counts["prompt_tokens"] += int(usage.get("prompt_tokens", 0))
        self._counts["completion_tokens"] += int(usage.get("completion_tokens", 0))
        return {"text": (choice["message"]["content"] or "").strip(), "prompt_tokens": int(usage.get("prompt_tokens", 0)),
                "completion_tokens": int(usage.get("completion_tokens", 0)),
                "finish_reason": choice.get("finish_reason") or "stop", "error": None}

    def stats(self) -> dict[str, Any]:
        return {"role": self.role, "model": self.served_name, "backend": "vllm", "pid": self._pid,
                "started_at": self._started_at, "requests": self._counts["requests"], "errors": self._counts["errors"],
                "prompt_tokens": self._counts["prompt_tokens"], "completion_tokens": self._counts["completion_tokens"],
                "batch_sizes": {}, "generate_sizes": {}}
