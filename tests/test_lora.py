"""LoRA students (peft) on Ray Train + DeepSpeed: adapter-only checkpoints, resume, adapter and
merged exports (both loadable by transformers, equal outputs), serving either; QLoRA's config
gate (it runs in scripts/gpu_check.sh)."""

from __future__ import annotations

import glob
import os

import httpx
import pytest

from tests.servers import free_port
from tests.test_training import make_rows, write_parquet

LORA = "{r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj], export: adapter}"


def _cfg(**over):
    from pipeline.config import load_config
    from training.config import TrainConfig

    base = ["data.train_path=/d", "model.build_tiny=true", "output.dir=/o", "output.checkpoint_dir=/c"]
    return load_config(TrainConfig, None, base + [f"{k}={v}" for k, v in over.items()])


def test_lora_config_and_qlora_gate():
    from pipeline.config import ConfigError

    cfg = _cfg(**{"model.lora": LORA})
    assert cfg.model.lora.r == 4 and cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert _cfg(**{"model.lora": "{}"}).model.lora.target_modules == "all-linear"
    with pytest.raises(ConfigError, match="needs a GPU"):
        _cfg(**{"model.lora": "{qlora: true}"})
    with pytest.raises(ConfigError, match="zero_stage"):
        _cfg(**{"model.lora": "{qlora: true}", "scaling.use_gpu": "true", "deepspeed.zero_stage": 3})
    with pytest.raises(ConfigError, match="model.lora.rank"):
        _cfg(**{"model.lora": "{rank: 4}"})


def test_wrap_trains_only_the_adapter_and_merge_is_exact(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training import lora

    section = _cfg(**{"model.lora": LORA}).model.lora
    model = lora.wrap(AutoModelForCausalLM.from_pretrained(tiny_model_dir), section, gradient_checkpointing=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # a non-zero adapter (B starts at zero)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    sd = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    adapter = lora.save_adapter(model, sd, AutoTokenizer.from_pretrained(tiny_model_dir), str(tmp_path / "a"), tiny_model_dir)
    merged = lora.merge_adapter(adapter, str(tmp_path / "m"))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits
        via_transformers = AutoModelForCausalLM.from_pretrained(adapter)(input_ids=ids).logits  # peft integration
    assert torch.allclose(want, got, atol=1e-4) and torch.allclose(want, via_transformers, atol=1e-4)
    assert not os.path.exists(os.path.join(adapter, "model.safetensors"))


def _model_state_keys(checkpoint_dir: str) -> set[str]:
    import torch

    from training.export import weights_only_loads

    keys: set[str] = set()
    for path in glob.glob(os.path.join(checkpoint_dir, "global_step*", "*model_states.pt")):
        with weights_only_loads():
            keys |= set((torch.load(path, weights_only=True).get("module") or {}).keys())
    return keys


@pytest.mark.slow
def test_lora_training_resumes_exports_merges_and_serves(ray_session, tiny_model_dir, tmp_path):
    from ray.train import Checkpoint
    from safetensors.torch import load_file

    from pipeline import storage
    from pipeline.serving import shutdown, start
    from pipeline.serving.app import load_serve_config
    from ray_jobs.train import main
    from training.export import export_from_checkpoint

    data = write_parquet(str(tmp_path / "train"), make_rows(32))
    out = str(tmp_path / "run")
    args = {"ray.num_cpus": 2, "data.train_path": data, "data.validation_path": "null", "data.max_length": 128,
            "model.build_tiny": "false", "model.name_or_path": tiny_model_dir, "model.lora": LORA,
            "deepspeed.zero_stage": 2, "deepspeed.micro_batch_size": 4, "deepspeed.precision": "fp32",
            "optim.lr": 2.0e-2, "optim.scheduler": "constant", "schedule.epochs": 1, "schedule.log_every_steps": 2,
            "schedule.eval_every_epoch": "false", "scaling.num_workers": 2, "output.dir": f"{out}/adapter",
            "output.checkpoint_dir": f"{out}/checkpoints", "output.run_name": "lora"}
    argv = lambda **o: [f"{k}={v}" for k, v in {**args, **o}.items()]  # noqa: E731
    assert main(argv()) == 0
    first = storage.read_json(f"{out}/adapter/manifest.json")
    keys = _model_state_keys(first["checkpoint"])
    assert keys and all("lora_" in k for k in keys), sorted(keys)[:5]  # the frozen base is not checkpointed

    assert main(argv(**{"schedule.epochs": 2})) == 0  # same run: resumes from the adapter-only checkpoint
    m = storage.read_json(f"{out}/adapter/manifest.json")
    assert m["history"][-1]["start_step"] == first["counts"]["steps"] and m["counts"]["steps"] == 2 * first["counts"]["steps"]
    adapter = f"{out}/adapter"
    assert os.path.exists(f"{adapter}/adapter_config.json") and not os.path.exists(f"{adapter}/model.safetensors")
    assert any(v.abs().max() > 0 for k, v in load_file(f"{adapter}/adapter_model.safetensors").items() if "lora_B" in k)

    merged = export_from_checkpoint(Checkpoint(path=m["checkpoint"]), f"{out}/merged", merge_lora=True)  # export: merged
    assert os.path.exists(f"{merged}/model.safetensors") and not os.path.exists(f"{merged}/adapter_config.json")

    deploy = dict(max_batch_size=4, num_replicas=1, ray_actor_options={"num_cpus": 0.25})
    cfg = load_serve_config(sections={
        "http": {"host": "127.0.0.1", "port": free_port()}, "app_name": "lora", "blocking": False,
        "decomposer": {"model": adapter, "served_name": "lora-student", "device": "cpu", "sampling": {"max_tokens": 6}, **deploy},
        "solver": {"backend": {"type": "hf", "model": merged, "device": "cpu"}, "sampling": {"max_tokens": 6}, **deploy}})
    try:
        base = start(cfg)
        r = httpx.post(base + "/v1/solve", json={"question": "Bob has 3 pens and buys 2 more. How many?"}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["decomposer"]["completion_tokens"] > 0 and r.json()["usage"]["solver"]["completion_tokens"] > 0
    finally:
        shutdown()


def test_torch_compile_flag_is_a_validated_model_option():
    """model.torch_compile (kept because pack + compile won bench_training_throughput) is a plain
    bool of the model section; the compiled path itself is too slow to compile in the suite on CPU."""
    from pipeline.config import ConfigError

    assert _cfg().model.torch_compile is False
    assert _cfg(**{"model.torch_compile": "true", "data.pack_or_group": "pack"}).model.torch_compile is True
    with pytest.raises(ConfigError, match="torch_compile"):
        _cfg(**{"model.torch_compile": "maybe"})
