"""Shared fixtures: one real local Ray for the session, a real S3 server (moto) on 127.0.0.1."""

from __future__ import annotations

import os
import uuid

import pytest

from tests.servers import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(REPO, "data", "samples")

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server mode) on loopback; env vars point every client at it.

    Session-scoped and started before Ray, so Ray workers inherit the endpoint and keys.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield {"endpoint": env["AWS_ENDPOINT_URL"], "port": port, "server": server}
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket; returns its ``s3://name`` URI."""
    import boto3

    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server["endpoint"]).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the test session (4 logical CPUs on this 2-core machine, no dashboard)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama + tokenizer trained on the GSM8K sample, built once per session."""
    from pipeline.data import SourceConfig, load_questions
    from pipeline.tiny_models import build_tiny_model, corpus_texts

    good, _ = load_questions(SourceConfig(dataset="gsm8k", path=os.path.join(SAMPLES, "gsm8k", "train_socratic.jsonl"), split="train", limit=300))
    out = str(tmp_path_factory.mktemp("tiny-llama"))
    return build_tiny_model(out, corpus_texts(q.to_row() for q in good), vocab_size=1024, hidden_size=64, num_layers=2)


@pytest.fixture(scope="session")
def trained_tiny_model_dir(tmp_path_factory):
    """The tiny Llama trained in process on the decomposer's and the solver's reply formats (its replies
    parse: see tests/trained_model.py), built once per session."""
    from tests.trained_model import train_two_stage_model

    return train_two_stage_model(str(tmp_path_factory.mktemp("trained-tiny-llama")))


@pytest.fixture(scope="session")
def prepared_samples(tmp_path_factory):
    """The shipped samples run through ``prepare`` (GSM8K socratic train/test, DROP, Bamboogle)."""
    from pipeline.data import SourceConfig
    from pipeline.preparation import PrepareConfig, PrepareOutput, prepare

    out = str(tmp_path_factory.mktemp("prepared"))
    cfg = PrepareConfig(
        sources=[
            SourceConfig(dataset="gsm8k", path=os.path.join(SAMPLES, "gsm8k", "train_socratic.jsonl"), split="train", limit=200),
            SourceConfig(dataset="gsm8k", path=os.path.join(SAMPLES, "gsm8k", "test_socratic.jsonl"), split="test", limit=40),
            SourceConfig(dataset="drop", path=os.path.join(SAMPLES, "drop", "dev.jsonl"), split="dev", limit=20),
            SourceConfig(dataset="bamboogle", path=os.path.join(SAMPLES, "bamboogle", "test.jsonl"), split="test", limit=20),
        ],
        output=PrepareOutput(dir=out),
    )
    prepare(cfg)
    return out


def pytest_collection_modifyitems(config, items):
    """Tests marked ``pattern`` (the whole miniature, ~13 min) run only when ``-m`` names them."""
    if "pattern" in (config.getoption("markexpr") or ""):
        return
    kept = [item for item in items if item.get_closest_marker("pattern") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("pattern") is not None])
        items[:] = kept
