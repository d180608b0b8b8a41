"""Training: SFT data, DeepSpeed config, 2-worker ZeRO-2/3 on CPU, crash + resume on S3, export.

The S3 server (moto, real HTTP) and Ray fixtures are module-scoped and live here; the S3
env vars are set before ``ray.init`` so Ray workers inherit them.
"""

from __future__ import annotations

import math
import os
import random
import re
import socket
import uuid

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

SYSTEM = "Decompose the question into subquestions."
NAMES = ["Alice", "Bob", "Carol", "Dan"]
ITEMS = ["apples", "pens", "books", "coins"]


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        who, it = rng.choice(NAMES), rng.choice(ITEMS)
        q = f"{who} has {a} {it} and buys {b} more. How many {it} does {who} have now?"
        target = f"1. How many {it} did {who} have at first?\n2. How many {it} did {who} buy?\n3. What is {a} plus {b}?"
        rows.append(
            {
                "id": f"gsm8k:train:{seed}-{i}",
                "question_id": f"q{seed}-{i}",
                "dataset": "gsm8k",
                "variant": "decomposer_correct",
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": target},
                ],
            }
        )
    return rows


def write_parquet(path: str, rows: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(path, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(path, "part-00000.parquet"))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    from pipeline.tiny_models import train_tokenizer
    from training.sft_data import corpus_from_rows

    return train_tokenizer(corpus_from_rows(make_rows(40)), vocab_size=400)


# ================================================================ pure: sft_data
def test_assistant_only_labels(tokenizer):
    from training.sft_data import IGNORE_INDEX, tokenize_messages

    msgs = make_rows(1)[0]["messages"]
    ex = tokenize_messages(tokenizer, msgs, max_length=512)
    assert not ex.truncated and len(ex.input_ids) == len(ex.labels)
    first = next(i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX)
    assert all(t == IGNORE_INDEX for t in ex.labels[:first])
    assert all(t != IGNORE_INDEX for t in ex.labels[first:])
    assert ex.labels[first:] == ex.input_ids[first:]
    prompt = tokenizer.decode(ex.input_ids[:first])
    target = tokenizer.decode(ex.labels[first:])
    assert prompt.endswith("<|assistant|>\n") and msgs[1]["content"] in prompt
    assert target.startswith(msgs[2]["content"]) and "<|end|>" in target
    assert ex.input_ids.count(tokenizer.eos_token_id) == 3  # one per turn, no extra eos appended


def test_fallback_template_and_eos(tokenizer):
    from transformers import PreTrainedTokenizerFast

    from training.sft_data import IGNORE_INDEX, tokenize_messages

    plain = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|end|>", pad_token="<|pad|>")
    plain.chat_template = None
    msgs = [{"role": "user", "content": "Bob has 3 pens."}, {"role": "assistant", "content": "1. How many pens?"}]
    ex = tokenize_messages(plain, msgs, max_length=512)
    first = next(i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX)
    assert plain.decode(ex.input_ids[:first]).startswith("User: Bob has 3 pens.\nAssistant:")
    assert plain.decode(ex.labels[first:-1]).strip() == "1. How many pens?"
    assert ex.input_ids[-1] == plain.eos_token_id and ex.labels[-1] == plain.eos_token_id


def test_truncation_counts(tokenizer):
    from training.sft_data import tokenize_rows

    rows = make_rows(6)
    rows[0]["messages"][1]["content"] = "very long question " * 200  # prompt alone > max_length: dropped
    rows[1]["messages"][2]["content"] = "very long answer " * 200  # target truncated, kept
    data = tokenize_rows(tokenizer, rows, max_length=128)
    assert data.rows == 6 and data.truncated_rows == 2 and data.dropped_rows == 1
    assert len(data.examples) == 5 and max(data.lengths) == 128


def test_packing_keeps_masks(tokenizer):
    from training.sft_data import IGNORE_INDEX, collate, pack_sequences, tokenize_rows

    data = tokenize_rows(tokenizer, make_rows(8), max_length=256)
    rows = pack_sequences(list(range(8)), data.lengths, 256)
    assert sorted(i for r in rows for i in r) == list(range(8))
    assert all(sum(data.lengths[i] for i in r) <= 256 for r in rows)
    assert any(len(r) > 1 for r in rows)
    batch = collate(data.examples, rows, tokenizer.pad_token_id, pack=True)
    assert "attention_mask" not in batch
    for b, row in enumerate(rows):
        want_labels = [t for i in row for t in data.examples[i].labels]
        want_pos = [p for i in row for p in range(data.lengths[i])]
        n = len(want_labels)
        assert batch["labels"][b, :n].tolist() == want_labels
        assert batch["position_ids"][b, :n].tolist() == want_pos
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][b, n:] == tokenizer.pad_token_id).all()


def test_packed_attention_is_block_diagonal(tokenizer, tmp_path):
    """A packed example gets the same logits as alone: examples don't attend to each other."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.tiny_models import build_tiny_model
    from training.sft_data import collate, corpus_from_rows, tokenize_rows

    build_tiny_model(str(tmp_path / "m"), corpus_from_rows(make_rows(40)), vocab_size=400)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    data = tokenize_rows(tokenizer, make_rows(2, seed=3), max_length=128)
    packed = collate(data.examples, [[0, 1]], 0, pack=True)
    alone = collate(data.examples, [[1]], 0, pack=False)
    with torch.no_grad():
        lp = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        la = model(**{k: v for k, v in alone.items() if k != "labels"}).logits
    n0, n1 = data.lengths
    assert torch.allclose(lp[0, n0 : n0 + n1], la[0, :n1], atol=1e-4)


@pytest.mark.parametrize("arch,pack", [("llama", False), ("llama", True), ("gpt2", False)])
def test_loss_on_labelled_positions_equals_the_models_own(tokenizer, tmp_path, arch, pack):
    """causal_lm_loss (the output layer only where a row has a label) gives the loss and gradients of the
    model's own ``labels=`` loss, padded or packed."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.tiny_models import build_tiny_model
    from training.sft_data import causal_lm_loss, collate, corpus_from_rows, tokenize_rows

    build_tiny_model(str(tmp_path / "m"), corpus_from_rows(make_rows(40)), arch=arch, vocab_size=400)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    data = tokenize_rows(tokenizer, make_rows(6, seed=4), max_length=128)
    batch = collate(data.examples, [[0, 1], [2], [3, 4, 5]] if pack else [[i] for i in range(6)], 0, pack=pack)
    ours = causal_lm_loss(model, batch)
    ours.backward()
    our_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    theirs = model(**batch, use_cache=False).loss
    theirs.backward()
    assert torch.isclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert all(torch.allclose(a, p.grad, rtol=1e-4, atol=1e-6) for a, p in zip(our_grads, model.parameters()))


def test_a_seed_fixes_a_tiny_models_weights_when_threads_build_at_once(tmp_path):
    """Two threads building tiny models at once (the quickstart's teacher and students' base) each get the
    weights their seed gives alone: torch's generator is process-wide, so the builder initializes under a lock."""
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import load_file

    from pipeline.tiny_models import build_tiny_model
    from training.sft_data import corpus_from_rows

    texts = corpus_from_rows(make_rows(40))

    def build(name: str, hidden: int) -> dict:
        return load_file(f"{build_tiny_model(str(tmp_path / name), texts, vocab_size=400, hidden_size=hidden)}/model.safetensors")

    alone = [build("a0", 64), build("b0", 32)]
    for attempt in range(3):
        with ThreadPoolExecutor(2) as pool:
            together = list(pool.map(build, [f"a{attempt + 1}", f"b{attempt + 1}"], [64, 32]))
        for want, got in zip(alone, together):
            assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)


def test_batch_plans_are_deterministic_and_balanced():
    from training.sft_data import plan_epoch, shard_batches, shard_eval_batches

    lengths = [random.Random(i).randint(5, 100) for i in range(57)]
    a = plan_epoch(lengths, 4, 2, epoch=1, seed=7)
    assert a == plan_epoch(lengths, 4, 2, epoch=1, seed=7)
    assert a != plan_epoch(lengths, 4, 2, epoch=2, seed=7)
    assert sorted(i for b in a for r in b for i in r) == list(range(57))
    # group_by_length: each mega-batch (4 * 2 * 32 > 57: one) is sorted longest first and cut into micro-batches ...
    ordered = plan_epoch(lengths, 4, 2, epoch=1, seed=7, shuffle_batches=False)
    flat = [lengths[r[0]] for b in ordered for r in b]
    assert flat == sorted(flat, reverse=True)
    # ... whose steps (2 ranks: pairs of neighbours) run in a shuffled order, the longest first, the partial one last
    steps = lambda plan: [tuple(map(str, plan[s : s + 2])) for s in range(0, len(plan), 2)]  # noqa: E731
    assert sorted(steps(a)) == sorted(steps(ordered)) and steps(a) != steps(ordered)
    assert a[:2] == ordered[:2] and a[-1] == ordered[-1] and len(ordered) % 2 == 1
    assert [b for e in (2, 3) for b in plan_epoch(lengths, 4, 2, epoch=e, seed=7)][:10] != a[:10]
    r0, r1 = shard_batches(a, 0, 2, multiple_of=3), shard_batches(a, 1, 2, multiple_of=3)
    assert len(r0) == len(r1) and len(r0) % 3 == 0 and len(r0) * 2 >= len(a)
    ev0, ev1 = shard_eval_batches(a, 0, 2), shard_eval_batches(a, 1, 2)
    assert len(ev0) == len(ev1) and sum(c for _, c in ev0 + ev1) == len(a)
    none = plan_epoch(lengths, 4, 2, epoch=0, seed=7, mode="none")
    assert sorted(i for b in none for r in b for i in r) == list(range(57))


# ================================================================ pure: config + deepspeed
def _cfg(**over):
    from pipeline.config import load_config
    from training.config import TrainConfig

    base = [
        "data.train_path=/d/train", "model.build_tiny=true", "output.dir=/o/m", "output.checkpoint_dir=/o/c",
    ]
    return load_config(TrainConfig, None, base + [f"{k}={v}" for k, v in over.items()])


def test_train_yaml_is_valid():
    from pipeline.config import load_config
    from training.config import TrainConfig

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(TrainConfig, os.path.join(here, "configs", "train.yaml"))
    assert cfg.deepspeed.zero_stage == 2 and cfg.scaling.num_workers == 2 and cfg.model.build_tiny


def test_config_rejects_bad_keys():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="deepspeed.zero_stag"):
        _cfg(**{"deepspeed.zero_stag": 2})
    with pytest.raises(ConfigError, match="offload_param"):
        _cfg(**{"deepspeed.offload_param": "true", "deepspeed.zero_stage": 2})
    with pytest.raises(ConfigError, match="name_or_path"):
        _cfg(**{"model.build_tiny": "false"})


def test_deepspeed_config_builder():
    from training.deepspeed_config import build_deepspeed_config, resolve_precision

    cfg = _cfg(**{"deepspeed.zero_stage": 3, "deepspeed.offload_optimizer": "true", "deepspeed.micro_batch_size": 2,
                  "deepspeed.gradient_accumulation_steps": 4, "optim.warmup_ratio": 0.1, "optim.lr": 0.01,
                  "deepspeed.extra": "{zero_optimization: {reduce_bucket_size: 1000}}"})
    ds = build_deepspeed_config(cfg, total_steps=100, world_size=2, use_gpu=False)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["reduce_bucket_size"] == 1000
    assert z["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["zero_force_ds_cpu_optimizer"] is False
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    s = ds["scheduler"]
    assert s["type"] == "WarmupCosineLR" and s["params"]["total_num_steps"] == 100 and s["params"]["warmup_num_steps"] == 10

    lin = build_deepspeed_config(_cfg(**{"optim.scheduler": "linear", "optim.lr": 0.5}), 50, 1, use_gpu=False)
    assert lin["scheduler"]["type"] == "WarmupDecayLR" and lin["scheduler"]["params"]["warmup_min_lr"] == 0.5  # no warmup
    const = build_deepspeed_config(_cfg(**{"optim.scheduler": "constant", "optim.warmup_steps": 5}), 50, 1, use_gpu=False)
    assert const["scheduler"]["type"] == "WarmupLR" and const["scheduler"]["params"]["warmup_num_steps"] == 5

    gpu = build_deepspeed_config(_cfg(**{"deepspeed.precision": "auto"}), 10, 8, use_gpu=True, bf16_supported=True)
    assert gpu["bf16"]["enabled"] and gpu["optimizer"]["params"]["torch_adam"] is False
    no_fused = build_deepspeed_config(_cfg(**{"deepspeed.precision": "auto"}), 10, 8, use_gpu=True, bf16_supported=True,
                                      fused_adam_available=False)
    assert no_fused["optimizer"]["params"]["torch_adam"] is True
    assert resolve_precision("auto", use_gpu=False) == "fp32"
    assert resolve_precision("fp16", use_gpu=True) == "fp16"
    assert resolve_precision("bf16", use_gpu=False) == "fp32"


def test_a_gpu_job_ignores_an_inherited_cpu_accelerator(monkeypatch):
    """A GPU job started from an environment pinned to the CPU (this suite's own DS_ACCELERATOR=cpu, found
    on the H200 by scripts/gpu_check.py) must let DeepSpeed find the GPU; a CPU job pins the CPU."""
    from training.engine import choose_accelerator

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    choose_accelerator(use_gpu=True)
    assert "DS_ACCELERATOR" not in os.environ
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")  # an accelerator the user chose stays
    choose_accelerator(use_gpu=True)
    assert os.environ["DS_ACCELERATOR"] == "xpu"
    choose_accelerator(use_gpu=False)
    assert os.environ["DS_ACCELERATOR"] == "cpu"


STUDENTS = """
model: {build_tiny: true, tiny: {hidden_size: 64, num_layers: 2}}
schedule: {max_steps: 300}
data: {max_length: 256}
output: {dir: /r/train, checkpoint_dir: /r/ckpt, run_name: students}
runs:
  - {name: s_dt, data: {train_path: /s/all/train}}
  - {name: s_dr, data: {train_path: /s/correct/train}, schedule: {max_steps: 200}, output_dir: /x/dr,
     model: {tiny: {hidden_size: 32}}}
"""


def test_several_models_share_the_job_and_inherit_defaults():
    import yaml

    from pipeline.config import ConfigError, load_config
    from training.config import TrainConfig

    cfg = TrainConfig.model_validate(yaml.safe_load(STUDENTS))
    assert cfg.several and cfg.data is None and cfg.model is None
    dt, dr = cfg.model_runs()
    assert (dt.output.run_name, dt.output.dir, dt.data.train_path) == ("s_dt", "/r/train/s_dt", "/s/all/train")
    assert (dr.output.run_name, dr.output.dir, dr.data.train_path) == ("s_dr", "/x/dr", "/s/correct/train")
    assert dt.schedule.max_steps == 300 and dr.schedule.max_steps == 200  # a default, and its override
    assert dt.data.max_length == dr.data.max_length == 256 and dr.model.build_tiny  # merged key by key
    assert (dt.model.tiny.hidden_size, dr.model.tiny.hidden_size, dr.model.tiny.num_layers) == (64, 32, 2)
    assert not dt.several and dt.output.checkpoint_dir == "/r/ckpt" and dt.deepspeed == cfg.deepspeed

    single = _cfg()
    assert not single.several and single.model_runs() == [single]
    base = ["output.checkpoint_dir=/c", "model.build_tiny=true"]
    with pytest.raises(ConfigError, match="names must be unique"):
        load_config(TrainConfig, None, base + ["output.dir=/o", "runs=[{name: a, data: {train_path: /a}}, {name: a, data: {train_path: /b}}]"])
    with pytest.raises(ConfigError, match="runs.0.output_dir"):
        load_config(TrainConfig, None, base + ["runs=[{name: a, data: {train_path: /a}}]"])
    with pytest.raises(ConfigError, match="runs.0.data.train_pth"):
        load_config(TrainConfig, None, base + ["output.dir=/o", "runs=[{name: a, data: {train_pth: /a}}]"])
    with pytest.raises(ConfigError, match="data: missing required field"):
        load_config(TrainConfig, None, base + ["output.dir=/o"])


def test_an_exported_model_is_skipped_only_for_the_same_config(tmp_path):
    """A re-run skips a model whose output holds a complete manifest of the same config; Ray and
    failure settings do not count, anything that changes the model does."""
    import time

    from pipeline.manifest import write_manifest
    from training.job import already_trained

    cfg = _cfg(**{"output.dir": str(tmp_path / "m"), "schedule.max_steps": 10}).with_absolute_paths()
    assert not already_trained(cfg)
    write_manifest(cfg.output.dir, "train", cfg, inputs={}, counts={}, started_at=time.time())
    assert already_trained(cfg)
    assert already_trained(cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"num_cpus": 7})}))
    assert not already_trained(cfg.model_copy(update={"schedule": cfg.schedule.model_copy(update={"max_steps": 20})}))
    write_manifest(cfg.output.dir, "generate", cfg, inputs={}, counts={}, started_at=time.time())
    assert not already_trained(cfg)


def test_weights_only_loads_refuses_arbitrary_pickles(tmp_path):
    import torch

    from training.export import weights_only_loads

    path = str(tmp_path / "evil.pt")
    torch.save({"w": torch.ones(2), "obj": socket.AF_INET.__class__}, path)  # a non-allow-listed global
    torch.save({"w": torch.ones(2)}, str(tmp_path / "ok.pt"))
    with weights_only_loads():
        with pytest.raises(Exception):
            torch.load(path, weights_only=False)
        assert torch.load(str(tmp_path / "ok.pt"), weights_only=False)["w"].sum() == 2


# ================================================================ Ray + DeepSpeed runs
@pytest.fixture(scope="module")
def ray_cluster(ray_session):
    """The session's local Ray (tests/conftest.py), started after the S3 env vars are set."""
    return ray_session


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    train = write_parquet(str(root / "train"), make_rows(48, seed=0))
    val = write_parquet(str(root / "val"), make_rows(12, seed=1))
    return train, val


def _train_args(data, out, **over) -> list[str]:
    train, val = data
    args = {
        "ray.num_cpus": 2,
        "data.train_path": train,
        "data.validation_path": val,
        "data.max_length": 128,
        "model.build_tiny": "true",
        "model.tiny": "{vocab_size: 400, hidden_size: 64, num_layers: 2, num_heads: 4, max_positions: 256}",
        "deepspeed.micro_batch_size": 4,
        "deepspeed.precision": "fp32",
        "optim.lr": 3.0e-3,
        "optim.warmup_steps": 1,
        "optim.scheduler": "constant",
        "schedule.epochs": 2,
        "schedule.log_every_steps": 2,
        "scaling.num_workers": 2,
        "output.dir": f"{out}/model",
        "output.checkpoint_dir": f"{out}/checkpoints",
        "output.run_name": "run",
    }
    args.update(over)
    return [f"{k}={v}" for k, v in args.items()]


def _manifest(out: str) -> dict:
    from pipeline import storage

    return storage.read_json(storage.join(out, "model", "manifest.json"))


def _losses(manifest: dict) -> list[float]:
    return [h["loss"] for h in manifest["history"] if isinstance(h.get("loss"), float) and math.isfinite(h["loss"])]


def _generates(model_dir: str) -> None:
    from training.export import smoke_generate

    text = smoke_generate(model_dir, make_rows(1, seed=9)[0]["messages"][:2], max_new_tokens=8)
    assert isinstance(text, str)


@pytest.mark.slow
def test_zero2_training_lowers_loss_exports_and_rerun_resumes(ray_cluster, sft_data, tmp_path):
    from ray_jobs.train import main

    out = str(tmp_path)
    # no epoch-end checkpoints: the interval's (6 steps, one epoch of 2 workers x 6 micro-batches of 4 rows) and the final
    every = {"deepspeed.zero_stage": 2, "schedule.checkpoint_every_epoch": "false", "schedule.checkpoint_every_steps": 6}
    assert main(_train_args(sft_data, out, **every)) == 0
    m = _manifest(out)
    assert m["counts"] == {"train_rows": 48, "val_rows": 12, "truncated_rows": 0, "steps": 12}
    losses = _losses(m)
    assert len(losses) >= 3 and losses[-1] < losses[0]
    assert math.isfinite(m["metrics"]["val_loss"]) and m["metrics"]["tokens"] > 0
    assert [h["step"] for h in m["history"]] == [2, 4, 6, 8, 10, 12]  # step 6 ends an epoch: checkpointed all the same
    _generates(f"{out}/model")

    # Same run name + storage again with one more epoch: resumes at the saved step, not at zero.
    assert main(_train_args(sft_data, out, **every, **{"schedule.epochs": 3})) == 0
    m2 = _manifest(out)
    assert m2["counts"]["steps"] == 18
    assert m2["history"][-1]["start_step"] == 12
    assert [h["step"] for h in m2["history"][: len(m["history"])]] == [h["step"] for h in m["history"]]


@pytest.mark.slow
def test_zero3_packed_training_lowers_loss_and_exports(ray_cluster, sft_data, tmp_path):
    from safetensors.torch import load_file

    from ray_jobs.train import main

    out = str(tmp_path)
    args = _train_args(sft_data, out, **{"deepspeed.zero_stage": 3, "data.pack_or_group": "pack", "schedule.epochs": 3})
    assert main(args) == 0
    m = _manifest(out)
    losses = _losses(m)
    assert len(losses) >= 3 and losses[-1] < losses[0]
    trained = load_file(f"{out}/model/model.safetensors")
    base = load_file(f"{out}/checkpoints/run-base_model/model.safetensors")
    assert set(trained) == set(base)
    assert all(trained[k].shape == base[k].shape for k in base)  # full (gathered) weights, not ZeRO-3 shards
    assert any((trained[k] - base[k]).abs().max() > 0 for k in base)
    _generates(f"{out}/model")


@pytest.mark.slow
def test_worker_crash_resumes_from_s3_checkpoint(ray_cluster, s3_bucket, sft_data, tmp_path, monkeypatch):
    from pipeline import storage
    from ray_jobs.train import main

    marker = str(tmp_path / "crashed")
    monkeypatch.setenv("DIVCONQ_TEST_CRASH_AT_STEP", "5")
    monkeypatch.setenv("DIVCONQ_TEST_CRASH_MARKER", marker)
    out = f"{s3_bucket}/crash-{uuid.uuid4().hex[:12]}"
    args = _train_args(
        sft_data, out,
        **{"deepspeed.zero_stage": 2, "schedule.checkpoint_every_steps": 2, "failure.max_failures": 1,
           "schedule.epochs": 1},
    )
    assert main(args) == 0
    assert os.path.exists(marker), "the test hook did not crash a worker"
    m = _manifest(out)
    steps = [h["step"] for h in m["history"]]
    starts = [h["start_step"] for h in m["history"]]
    # The restarted worker group began at a saved checkpoint (step 4, or step 2 when the crash beat
    # the controller to registering step 4's report), not at 0, continued from there and finished.
    assert steps == sorted(steps) and steps[-1] == 6 == m["counts"]["steps"]
    resumed = starts[-1]
    assert starts[0] == 0 and resumed in (2, 4)
    assert all(h["step"] <= resumed for h in m["history"] if h["start_step"] == 0)
    assert min(h["step"] for h in m["history"] if h["start_step"] == resumed) > resumed
    assert storage.exists(f"{out}/model/model.safetensors")
    assert any("checkpoint_00000006" in p for p in storage.list_files(f"{out}/checkpoints/run"))
    _generates(f"{out}/model")


@pytest.mark.slow
def test_one_job_trains_several_models_and_resumes_each(ray_cluster, sft_data, tmp_path):
    """Two students in one worker group: a crash in the second restarts the group, which skips the
    finished first (its final checkpoint covers its steps) and resumes the second at its checkpoint;
    a re-run trains nothing; a longer schedule for one model resumes only that one."""
    import yaml

    from pipeline import storage
    from training.callbacks import CrashAtStep
    from training.config import TrainConfig
    from training.job import run

    train, val = sft_data
    out, marker = str(tmp_path), str(tmp_path / "crashed")

    def config(b_steps: int) -> TrainConfig:
        return TrainConfig.model_validate(yaml.safe_load(f"""
            ray: {{num_cpus: 2}}
            data: {{train_path: {train}, max_length: 128}}
            model: {{build_tiny: true, tiny: {{vocab_size: 400, hidden_size: 32, num_layers: 1, num_heads: 4, max_positions: 256}}}}
            deepspeed: {{micro_batch_size: 4, precision: fp32}}
            optim: {{lr: 3.0e-3, warmup_steps: 1, scheduler: constant}}
            schedule: {{epochs: 2, checkpoint_every_steps: 2, log_every_steps: 1}}
            scaling: {{num_workers: 2}}
            failure: {{max_failures: 1}}
            output: {{dir: {out}/students, checkpoint_dir: {out}/checkpoints, run_name: students, num_checkpoints_to_keep: 1}}
            runs:
              - {{name: a, schedule: {{max_steps: 4}}}}
              - {{name: b, data: {{validation_path: {val}}}, schedule: {{max_steps: {b_steps}}}, model: {{tiny: {{hidden_size: 48}}}}}}
        """))

    summary = run(config(6), callbacks=[CrashAtStep(5, marker, model="b")]).to_dict()
    assert os.path.exists(marker), "the test hook did not crash a worker"
    assert [m["model"] for m in summary["models"]] == ["a", "b"] and [m["steps"] for m in summary["models"]] == [4, 6]
    a, b = (storage.read_json(f"{out}/students/{n}/manifest.json") for n in "ab")
    assert {h["start_step"] for h in a["history"]} == {0} and a["history"][-1]["step"] == 4  # trained once, never again
    steps, starts = [h["step"] for h in b["history"]], [h["start_step"] for h in b["history"]]
    # resumed at a saved checkpoint (step 4, or 2 when the crash beat the controller to registering step 4's report)
    assert steps == sorted(steps) and steps[-1] == 6 and starts[0] == 0 and starts[-1] in (2, 4)
    assert math.isfinite(b["metrics"]["val_loss"]) and a["metrics"]["val_loss"] is None
    assert a["config"]["output"]["run_name"] == "a" and b["config"]["model"]["tiny"]["hidden_size"] == 48
    assert "a-checkpoint_00000004" in a["checkpoint"] and "b-checkpoint_00000006" in b["checkpoint"]
    assert storage.exists(a["checkpoint"]) and storage.exists(b["checkpoint"])  # each model keeps its final one
    for n in "ab":
        assert storage.exists(f"{out}/checkpoints/{n}-base_model/config.json")
        _generates(f"{out}/students/{n}")

    again = run(config(6)).to_dict()  # everything exported with this config: nothing trains, nothing is rewritten
    assert [m["steps"] for m in again["models"]] == [4, 6]
    assert storage.read_json(f"{out}/students/b/manifest.json")["started_at"] == b["started_at"]

    run(config(8))  # a longer schedule for b only: a is skipped, b resumes from its final checkpoint
    a2, b2 = (storage.read_json(f"{out}/students/{n}/manifest.json") for n in "ab")
    assert a2 == a and b2["counts"]["steps"] == 8 and b2["history"][-1]["start_step"] == 6


def test_a_job_waits_for_its_input_and_skips_a_model_whose_set_is_empty(ray_cluster, sft_data, tiny_model_dir, tmp_path):
    """``data.wait_for``: a job started before its input exists (the quickstart starts the students' jobs while the
    teacher still trains) trains once the upstream job's completion marker appears, written here after the job's
    data, as select writes its sets before its manifest. ``data.skip_if_empty``: a model whose set has no rows is
    skipped and the job goes on. A marker that never appears fails the job, naming the marker."""
    import shutil
    import threading

    import yaml

    from pipeline import storage
    from training.config import TrainConfig
    from training.job import run

    train, _ = sft_data
    out, upstream = str(tmp_path), str(tmp_path / "select")
    marker = f"{upstream}/manifest.json"

    def config(timeout_s: float, names: str) -> TrainConfig:
        runs = "\n".join(f"              - {{name: {n}, data: {{train_path: {upstream}/{n}}}}}" for n in names)
        return TrainConfig.model_validate(yaml.safe_load(f"""
            ray: {{num_cpus: 2}}
            data: {{train_path: {upstream}/a, max_length: 128, wait_for: {marker}, wait_timeout_s: {timeout_s}, skip_if_empty: true}}
            model: {{build_tiny: false, name_or_path: {tiny_model_dir}}}
            deepspeed: {{micro_batch_size: 4, precision: fp32}}
            optim: {{lr: 3.0e-3, warmup_steps: 1, scheduler: constant}}
            schedule: {{epochs: 1, max_steps: 3, log_every_steps: 1}}
            scaling: {{num_workers: 1, cpus_per_worker: 0.01}}
            failure: {{max_failures: 0}}
            output: {{dir: {out}/students, checkpoint_dir: {out}/checkpoints, run_name: students{len(names)}}}
            runs:
{runs}
        """))

    # the students' base is built already (a tiny model built by the job would read its training text on the driver)
    os.makedirs(upstream)
    shutil.copytree(train, f"{upstream}/a")
    with pytest.raises(Exception, match=f"wait_for \\(the input {re.escape(upstream)}/a\\)"):  # nothing writes the marker
        run(config(1, "a"))
    assert not storage.exists(f"{out}/students/a/manifest.json")

    done: dict = {}
    job = threading.Thread(target=lambda: done.update(summary=run(config(600, "ab")).to_dict()))
    job.start()
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(f"{upstream}/b")  # b: a set that the upstream filter left empty (its columns, no rows)
    pq.write_table(pa.Table.from_pylist(make_rows(1)).slice(0, 0), f"{upstream}/b/part-00000.parquet")
    storage.write_json(marker, {"job": "select"})  # last, as select writes its manifest
    job.join()
    assert [m["model"] for m in done["summary"]["models"]] == ["a"], done
    a = storage.read_json(f"{out}/students/a/manifest.json")
    assert a["counts"]["steps"] == 3 and "wait_input_s" in a["timings"]
    assert not storage.exists(f"{out}/students/b/manifest.json")
