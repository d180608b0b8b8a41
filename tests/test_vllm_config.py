"""``type: vllm``: the Ray Data LLM processor is built for real from the config (every field
honoured); only starting the engine needs vLLM and a GPU (scripts/gpu_check.sh runs that)."""

from __future__ import annotations

import pytest

from pipeline.backends.base import SamplingParams


def _cfg(**over):
    from pydantic import TypeAdapter

    from pipeline.backends import BackendConfig

    return TypeAdapter(BackendConfig).validate_python({"type": "vllm", "model": "/models/teacher", **over})


def test_config_validation():
    from pydantic import ValidationError

    cfg = _cfg()
    assert (cfg.engine, cfg.tensor_parallel_size, cfg.pipeline_parallel_size, cfg.concurrency, cfg.batch_size) == \
        ("vllm", 1, 1, 1, 64)
    with pytest.raises(ValidationError, match="tensor_parallel_size"):
        _cfg(engine_kwargs={"tensor_parallel_size": 2})
    with pytest.raises(ValidationError, match="extra"):
        _cfg(tensor_parallel=2)
    with pytest.raises(ValidationError):
        _cfg(engine="tgi")


def test_processor_config_honours_every_field():
    from ray.data.llm import SGLangEngineProcessorConfig, vLLMEngineProcessorConfig

    from pipeline.backends.vllm_engine import processor_config

    cfg = _cfg(engine_kwargs={"max_model_len": 2048}, tensor_parallel_size=2, pipeline_parallel_size=2, concurrency=3,
               batch_size=16, accelerator_type="A10G")
    pc = processor_config(cfg)
    assert isinstance(pc, vLLMEngineProcessorConfig)
    assert (pc.model_source, pc.concurrency, pc.batch_size, pc.accelerator_type) == ("/models/teacher", 3, 16, "A10G")
    assert pc.engine_kwargs["tensor_parallel_size"] == 2 and pc.engine_kwargs["pipeline_parallel_size"] == 2
    assert pc.engine_kwargs["max_model_len"] == 2048 and pc.should_continue_on_error is True
    sg = processor_config(_cfg(engine="sglang", tensor_parallel_size=2, concurrency=2, batch_size=8))
    assert isinstance(sg, SGLangEngineProcessorConfig)
    assert sg.engine_kwargs["tp_size"] == 2 and (sg.concurrency, sg.batch_size) == (2, 8)


def test_sampling_and_row_mapping():
    from pipeline.backends.vllm_engine import _Preprocess, postprocess, to_completion

    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=5, seed=10, stop=("\n\n",))
    row = _Preprocess("vllm", params)({"request_index": 3, "sample_index": 2, "messages": [{"role": "user", "content": "q"}]})
    assert row["sampling_params"] == {"temperature": 0.7, "top_p": 0.9, "max_tokens": 5, "seed": 12, "stop": ["\n\n"]}
    assert row["request_index"] == 3 and row["messages"][0]["content"] == "q"
    sg = _Preprocess("sglang", params)({"request_index": 0, "sample_index": 1, "messages": []})["sampling_params"]
    assert sg["max_new_tokens"] == 5 and sg["sampling_seed"] == 11
    guided = _Preprocess("vllm", params)({"request_index": 0, "sample_index": 0, "messages": [], "guided": True})
    assert guided["sampling_params"]["guided_decoding"]["json"]["properties"]["subquestions"]["type"] == "array"
    out = postprocess({"request_index": 3, "generated_text": " 1. What? ", "num_input_tokens": 7, "num_generated_tokens": 5,
                       "__inference_error__": ""})
    c = to_completion(out, max_tokens=5, latency_s=0.1)
    assert (c.text, c.prompt_tokens, c.completion_tokens, c.finish_reason, c.error) == ("1. What?", 7, 5, "length", None)
    bad = to_completion(postprocess({"request_index": 1, "__inference_error__": "prompt too long"}), 5, 0.0)
    assert bad.error == "prompt too long"  # quarantined by the job, not a job failure


def test_backend_builds_the_ray_data_llm_processor(ray_session, tiny_model_dir):
    """make_backend -> VLLMBackend -> a real ray.data.llm Processor whose engine stage carries the
    concurrency, batch size, accelerator type and GPU bundle (tensor x pipeline parallel)."""
    from pipeline.backends import make_backend
    from pipeline.backends.vllm_engine import build_processor

    cfg = _cfg(model=tiny_model_dir, tensor_parallel_size=2, concurrency=2, batch_size=8, accelerator_type="L4")
    backend = make_backend(cfg)
    assert backend.name == tiny_model_dir and backend.processor_config.batch_size == 8
    processor = build_processor(cfg, SamplingParams(max_tokens=4))
    stages = {type(s).__name__: s for s in processor.stages.values()}
    assert list(stages) == ["ChatTemplateStage", "TokenizeStage", "vLLMEngineStage", "DetokenizeStage"]
    engine = stages["vLLMEngineStage"]
    kw = engine.map_batches_kwargs
    assert kw["compute"].max_size == 2 and kw["accelerator_type"] == "L4"
    assert kw["ray_remote_args_fn"].args[:2] == (2, "L4")  # one placement-group bundle per GPU of a replica
    assert engine.fn_constructor_kwargs["engine_kwargs"]["tensor_parallel_size"] == 2
    assert engine.fn_constructor_kwargs["batch_size"] == 8
    assert stages["ChatTemplateStage"].fn_constructor_kwargs["model"] == tiny_model_dir


# ---------------------------------------------------------------- GPU serving of the student (ray.serve.llm)
def _serve_cfg(model: str, **dec):
    from pipeline.serving.app import load_serve_config

    return load_serve_config(sections={"decomposer": {"model": model, "engine": "vllm", "served_name": "student", **dec},
                                       "solver": {"backend": {"type": "hf", "model": model}}})


def test_serve_llm_config_for_the_decomposer(tmp_path):
    from pipeline.serving.llm_deployment import llm_config

    cfg = _serve_cfg(str(tmp_path), vllm={"tensor_parallel_size": 2, "accelerator_type": "L4",
                                          "engine_kwargs": {"gpu_memory_utilization": 0.8}},
                     autoscaling={"min_replicas": 1, "max_replicas": 3}, num_replicas=None, max_input_tokens=1024,
                     sampling={"max_tokens": 128})
    lc = llm_config(cfg.decomposer)
    assert lc.model_id == "student" and lc.model_loading_config.model_source == str(tmp_path)
    assert lc.accelerator_type == "L4"
    assert lc.engine_kwargs["tensor_parallel_size"] == 2 and lc.engine_kwargs["gpu_memory_utilization"] == 0.8
    assert lc.engine_kwargs["max_model_len"] == 1024 + 128
    assert lc.deployment_config["autoscaling_config"]["max_replicas"] == 3
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="merged"):
        llm_config(cfg.decomposer)


def test_serve_llm_without_vllm_is_one_clear_error(tmp_path):
    import importlib.util

    from pipeline.serving.app import build_app

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: scripts/gpu_check.sh serves through ray.serve.llm instead")
    with pytest.raises(RuntimeError, match=r"divconq\[gpu\]"):
        build_app(_serve_cfg(str(tmp_path)))
