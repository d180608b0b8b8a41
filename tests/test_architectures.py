"""Hub architectures: tiny random-weight models of six families (Llama 3, Qwen2, Mistral, GPT-2,
Gemma, Phi-3) built offline from their transformers config classes, each with its family's chat
template (tests/fixtures/chat_templates/). Cheap checks run for every family: conventions, loss
masking of the assistant span (decoded), generation through the serving backend. Four families
go through the whole path: train (Ray Train + DeepSpeed, ZeRO-2 and ZeRO-3) -> export ->
AutoModelForCausalLM -> Ray Serve (/v1/solve and /v1/chat/completions)."""

from __future__ import annotations

import math
import os

import httpx
import pytest

from tests.servers import free_port
from tests.test_training import make_rows, write_parquet

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "chat_templates")
FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "gemma", "phi3"]
# (family, ZeRO stage, workers) of the full train -> export -> serve round trip
TRAINED = [("llama", 3, 2), ("qwen2", 2, 1), ("mistral", 3, 1), ("gpt2", 2, 1)]

# What each family's prompt ends with and what follows the assistant text in the target.
PROMPT_END = {"llama": "<|start_header_id|>assistant<|end_header_id|>\n\n", "qwen2": "<|im_start|>assistant\n",
              "mistral": "[/INST]", "gpt2": "Assistant:", "gemma": "<start_of_turn>model\n", "phi3": "<|assistant|>\n"}
TARGET_END = {"llama": "<|eot_id|>", "qwen2": "<|im_end|>\n", "mistral": "</s>", "gpt2": "<|endoftext|>",
              "gemma": "<end_of_turn>\n<eos>", "phi3": "<|end|>\n<|endoftext|>"}
CONFIG_CLASS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig", "gpt2": "GPT2Config",
                "gemma": "GemmaConfig", "phi3": "Phi3Config"}


def chat_template(family: str):
    path = os.path.join(FIXTURES, f"{family}.jinja")
    return open(path).read() if os.path.exists(path) else None  # GPT-2 has none


@pytest.fixture(scope="module")
def corpus():
    from training.sft_data import corpus_from_rows

    return corpus_from_rows(make_rows(40))


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, corpus):
    from pipeline.tiny_models import build_family_model

    root = tmp_path_factory.mktemp("families")
    return {f: build_family_model(str(root / f), f, corpus, chat_template(f), vocab_size=400)
            for f in FAMILIES}


# ================================================================ cheap, per family
@pytest.mark.parametrize("family", FAMILIES)
def test_family_conventions_and_masked_span(family_models, family):
    from transformers import AutoConfig, AutoTokenizer

    from training.sft_data import IGNORE_INDEX, tokenize_messages

    path = family_models[family]
    cfg, tok = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert type(cfg).__name__ == CONFIG_CLASS[family]
    assert cfg.tie_word_embeddings == (family not in ("mistral", "phi3"))
    if family == "llama":
        assert cfg.rope_parameters["rope_type"] == "llama3"
    if family == "mistral":
        assert cfg.sliding_window == 32 and tok.pad_token is None
    assert (tok.chat_template is None) == (family == "gpt2")

    msgs = make_rows(1, seed=5)[0]["messages"]
    ex = tokenize_messages(tok, msgs, max_length=256)
    first = next(i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX)
    assert all(t == IGNORE_INDEX for t in ex.labels[:first]) and ex.labels[first:] == ex.input_ids[first:]
    prompt = tok.decode(ex.input_ids[:first], skip_special_tokens=False)
    target = tok.decode(ex.labels[first:], skip_special_tokens=False)
    assert prompt.endswith(PROMPT_END[family]), prompt[-80:]
    assert msgs[0]["content"] in prompt and msgs[1]["content"] in prompt  # system text kept (merged where no role)
    assert target.strip() == (msgs[2]["content"] + TARGET_END[family]).strip(), target
    assert ex.input_ids[first:].count(tok.eos_token_id) == 1  # exactly one eos, inside the learned span


@pytest.mark.parametrize("family", FAMILIES)
def test_family_generates_through_the_serving_backend(family_models, family):
    from pipeline.backends.base import Request, SamplingParams
    from pipeline.backends.hf_local import HFBackend

    backend = HFBackend(family_models[family], device="cpu", dtype="float32", batch_size=2)
    reqs = [Request(messages=make_rows(2, seed=7)[i]["messages"][:2], sample_index=i) for i in range(2)]
    out = backend.generate(reqs, SamplingParams(temperature=0.0, max_tokens=6))
    assert len(out) == 2 and all(c.prompt_tokens > 0 and 0 < c.completion_tokens <= 6 for c in out)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_prompt_is_the_served_prompt(family_models, family):
    """One renderer (pipeline.chat): the tokens a student is trained to continue (everything before
    its first learned label) are exactly the tokens of the prompt it is served, with a chat template
    (five families) and without one (GPT-2)."""
    from transformers import AutoTokenizer

    from pipeline.backends.base import Request, SamplingParams
    from pipeline.backends.hf_local import HFBackend
    from pipeline.chat import render_chat
    from training.sft_data import IGNORE_INDEX, tokenize_messages

    tok = AutoTokenizer.from_pretrained(family_models[family])
    for seed in range(3):
        msgs = make_rows(1, seed=seed)[0]["messages"]
        ex = tokenize_messages(tok, msgs, max_length=256)
        first = next(i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX)
        served = tok(render_chat(tok, msgs[:-1], add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        assert ex.input_ids[:first] == served, (family, tok.decode(ex.input_ids[:first])[-40:], tok.decode(served)[-40:])
    backend = HFBackend(family_models[family], device="cpu", dtype="float32", batch_size=1)
    out = backend.generate([Request(messages=msgs[:-1])], SamplingParams(temperature=0.0, max_tokens=2))
    assert out[0].prompt_tokens == first


# ================================================================ train -> export -> load -> serve
def _train_family(family: str, base: str, data: str, out: str, zero: int, workers: int) -> str:
    from ray_jobs.train import main

    args = {
        "ray.num_cpus": 2, "data.train_path": data, "data.validation_path": "null", "data.max_length": 128,
        "model.build_tiny": "false", "model.name_or_path": base, "deepspeed.zero_stage": zero,
        "deepspeed.micro_batch_size": 4, "deepspeed.precision": "fp32", "optim.lr": 1.0e-2, "optim.scheduler": "constant",
        "schedule.epochs": 1, "schedule.max_steps": 6, "schedule.log_every_steps": 2, "schedule.eval_every_epoch": "false",
        "schedule.checkpoint_every_steps": "null", "scaling.num_workers": workers, "output.dir": f"{out}/model",
        "output.checkpoint_dir": f"{out}/checkpoints", "output.run_name": family,
    }
    assert main([f"{k}={v}" for k, v in args.items()]) == 0
    return f"{out}/model"


def _mean_loss(model_dir: str, tokenizer_dir: str, rows) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.sft_data import collate, tokenize_rows

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = tokenize_rows(tok, rows, 128)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = collate(data.examples, [[i] for i in range(len(data.examples))], pad)
    with torch.no_grad():
        return float(model(**batch, use_cache=False).loss)


@pytest.fixture(scope="module")
def trained(ray_session, family_models, tmp_path_factory):
    """``trained(family)``: the family's exported student, trained on first use (so each training
    runs inside the test that needs it first, under that test's timeout)."""
    root = tmp_path_factory.mktemp("trained")
    data = write_parquet(str(root / "train"), make_rows(48, seed=0))
    plan = {f: (zero, workers) for f, zero, workers in TRAINED}
    done: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in done:
            done[family] = _train_family(family, family_models[family], data, str(root / family), *plan[family])
        return done[family]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("family,zero,workers", TRAINED)
def test_trained_family_exports_a_loadable_better_model(trained, family_models, family, zero, workers):
    from pipeline import storage

    out = trained(family)
    manifest = storage.read_json(f"{out}/manifest.json")
    assert manifest["counts"]["steps"] == 6 and manifest["config"]["deepspeed"]["zero_stage"] == zero
    assert all(math.isfinite(h["loss"]) for h in manifest["history"])
    rows = make_rows(16, seed=0)
    before, after = _mean_loss(family_models[family], out, rows), _mean_loss(out, out, rows)
    assert after < before - 0.1, (family, before, after)  # the exported (gathered) weights are the trained ones


@pytest.mark.slow
def test_trained_families_serve_and_solve(trained, ray_session):
    """Two Serve apps, each composing two trained families (decomposer + solver) in /v1/solve."""
    from pipeline.serving import shutdown, start
    from pipeline.serving.app import load_serve_config

    port = free_port()
    deploy = dict(max_batch_size=4, batch_wait_timeout_s=0.05, num_replicas=1, ray_actor_options={"num_cpus": 0.25})
    try:
        for i, (dec, sol) in enumerate([("llama", "qwen2"), ("mistral", "gpt2")]):
            cfg = load_serve_config(sections={
                "http": {"host": "127.0.0.1", "port": port}, "app_name": f"arch-{i}", "route_prefix": f"/a{i}",
                "blocking": False,
                "decomposer": {"model": trained(dec), "served_name": dec, "device": "cpu", "dtype": "float32",
                               "sampling": {"max_tokens": 8}, **deploy},
                "solver": {"backend": {"type": "hf", "model": trained(sol), "device": "cpu", "dtype": "float32"},
                           "sampling": {"max_tokens": 8}, "few_shot": False, **deploy},
            })
            base = start(cfg)
            r = httpx.post(base + "/v1/solve", json={"question": "Bob has 3 pens and buys 2 more. How many?"}, timeout=120)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["models"]["decomposer"] == dec and body["usage"]["solver"]["completion_tokens"] > 0
            r = httpx.post(base + "/v1/chat/completions", timeout=120,
                           json={"model": dec, "messages": [{"role": "user", "content": "How many pens?"}], "max_tokens": 4})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0, r.text
    finally:
        shutdown()
