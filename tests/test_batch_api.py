"""The Batch API teacher (teacher.mode=batch) against a real local server implementing /v1/files and
/v1/batches: request shapes, per-batch limits, expired / failed / partly failed batches, resume
without a second batch, and a generate job killed while its batches are in flight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from pipeline import storage, tables
from pipeline.backends.base import BackendUnavailable, Request, SamplingParams
from pipeline.backends.openai_batch import OpenAIBatchBackend
from pipeline.manifest import read_manifest
from ray_jobs import generate
from tests.conftest import REPO
from tests.servers.openai_stub import DECOMPOSITION_REPLY, OpenAIStubServer, StubHTTPError

CONFIG = os.path.join(REPO, "configs", "generate.yaml")
KEY_VAR = "DIVCONQ_TEST_BATCH_KEY"
SECRET = "sk-test-BATCH-SECRET-42"


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_VAR, SECRET)
    with OpenAIStubServer(required_api_key=SECRET) as srv:
        yield srv


def backend(srv, job_dir, **batch) -> OpenAIBatchBackend:
    cfg = dict(base_url=srv.base_url, model="gpt-4o-mini", api_key_env=KEY_VAR, mode="batch", max_retries=3,
               backoff_base_s=0.01, backoff_max_s=0.05, batch={"poll_interval_s": 0.02, **batch})
    return OpenAIBatchBackend(cfg, job_dir=str(job_dir))


def reqs(n: int) -> list[Request]:
    return [Request(messages=[{"role": "user", "content": f"Write the subquestions of question {i}"}], sample_index=i)
            for i in range(n)]


def input_lines(srv, batch_id: str) -> list[dict]:
    content = srv.files[srv.batches[batch_id]["input_file_id"]]["content"].decode()
    return [json.loads(line) for line in content.splitlines()]


def test_batch_round_trip_uses_the_real_shapes(server, tmp_path):
    be = backend(server, tmp_path)
    params = SamplingParams(temperature=0.7, max_tokens=64, seed=3)
    out = be.generate(reqs(5), params)
    assert [c.text for c in out] == [DECOMPOSITION_REPLY] * 5
    assert all(c.error is None and c.prompt_tokens == 6 and c.completion_tokens > 0 for c in out)
    assert len(server.batches) == 1 and server.request_count == 0  # nothing went through the online endpoint
    (batch,) = server.batches.values()
    assert batch["status"] == "completed" and batch["endpoint"] == "/v1/chat/completions"
    assert batch["metadata"]["divconq_model"] == "gpt-4o-mini"
    lines = input_lines(server, batch["id"])
    assert [ln["method"] for ln in lines] == ["POST"] * 5 and {ln["url"] for ln in lines} == {"/v1/chat/completions"}
    assert [ln["body"]["seed"] for ln in lines] == [3, 4, 5, 6, 7]  # the online body: seed + sample_index
    assert lines[0]["body"]["temperature"] == 0.7 and lines[0]["body"]["max_tokens"] == 64
    assert len({ln["custom_id"] for ln in lines}) == 5
    (state_file,) = os.listdir(tmp_path / "_batches")  # the batch id was persisted in the job dir
    state = storage.read_json(str(tmp_path / "_batches" / state_file))
    assert [b["id"] for b in state["batches"]] == [batch["id"]] and state["batches"][0]["status"] == "completed"
    assert SECRET not in (tmp_path / "_batches" / state_file).read_text()


def test_large_request_sets_are_split_by_count_and_file_size(server, tmp_path):
    server.batch_max_requests = 4  # the provider would reject a bigger batch as failed
    out = backend(server, tmp_path, max_requests=4).generate(reqs(10), SamplingParams())
    assert all(c.error is None for c in out) and len(out) == 10
    assert sorted(len(input_lines(server, b)) for b in server.batches) == [2, 4, 4]
    server.batches.clear()
    out = backend(server, tmp_path / "bytes", max_file_bytes=1024).generate(reqs(12), SamplingParams())
    assert all(c.error is None for c in out)
    sizes = [len(server.files[b["input_file_id"]]["content"]) for b in server.batches.values()]
    assert len(sizes) > 1 and max(sizes) <= 1024 and sum(len(input_lines(server, b)) for b in server.batches) == 12


def test_expired_batch_resubmits_only_the_missing_requests(server, tmp_path):
    server.force_batches(("expired", 3))
    out = backend(server, tmp_path).generate(reqs(8), SamplingParams())
    assert all(c.error is None and c.text == DECOMPOSITION_REPLY for c in out)
    first, second = sorted(server.batches)
    assert server.batches[first]["status"] == "expired" and server.batches[first]["request_counts"]["completed"] == 3
    resent = [ln["custom_id"] for ln in input_lines(server, second)]
    assert resent == [ln["custom_id"] for ln in input_lines(server, first)][3:]
    assert server.batch_requests == 8  # every request answered exactly once


def test_per_request_errors_quarantine_or_retry(server, tmp_path):
    calls: dict[str, int] = {}

    def responder(messages, body):
        text = messages[-1]["content"]
        calls[text] = calls.get(text, 0) + 1
        if text.endswith(" 1"):
            raise StubHTTPError(400, "Invalid prompt: flagged")
        if text.endswith(" 2") and calls[text] == 1:
            raise StubHTTPError(500, "The server had an error")
        return DECOMPOSITION_REPLY

    server.responder = responder
    out = backend(server, tmp_path).generate(reqs(4), SamplingParams())
    assert out[1].error == "HTTP 400: Invalid prompt: flagged" and not out[1].text
    assert [out[i].error for i in (0, 2, 3)] == [None] * 3  # the 500 was resubmitted and then answered
    assert len(server.batches) == 2 and len(input_lines(server, sorted(server.batches)[1])) == 1


def test_failed_batches_are_retried_then_stop_the_job(server, tmp_path):
    server.force_batches("failed")
    assert all(c.error is None for c in backend(server, tmp_path).generate(reqs(3), SamplingParams()))
    assert [b["status"] for b in server.batches.values()] == ["failed", "completed"]
    server.force_batches("failed", "failed")
    with pytest.raises(BackendUnavailable, match="failed: Batch failed to process"):
        backend(server, tmp_path / "again", max_submissions=2).generate(reqs(3), SamplingParams())
    # requests that never get a result within the rounds are quarantined, not lost
    server.force_batches(("expired", 1), ("expired", 0))
    out = backend(server, tmp_path / "expired", max_submissions=2).generate(reqs(3), SamplingParams())
    assert out[0].error is None and all("no batch result" in c.error for c in out[1:])


def test_resume_polls_the_same_batch_and_adopts_an_unsaved_one(server, tmp_path):
    server.batch_hold = True
    be = backend(server, tmp_path, max_wait_s=0.3)
    with pytest.raises(BackendUnavailable, match="rerun the job to resume"):
        be.generate(reqs(4), SamplingParams())
    assert len(server.batches) == 1 and next(iter(server.batches.values()))["status"] == "in_progress"
    server.batch_hold = False
    again = backend(server, tmp_path)  # a new process: only the state file links it to the batch
    assert all(c.error is None for c in again.generate(reqs(4), SamplingParams()))
    assert len(server.batches) == 1 and again.batches_created == 0 and again.batches_resumed == 1
    # killed after creating a batch but before saving its id: the batch is found by its metadata tag
    server.batch_hold = True
    with pytest.raises(BackendUnavailable):
        backend(server, tmp_path / "lost", max_wait_s=0.2).generate(reqs(2), SamplingParams())
    storage.delete(str(tmp_path / "lost" / "_batches"))
    server.batch_hold = False
    adopted = backend(server, tmp_path / "lost")
    assert all(c.error is None for c in adopted.generate(reqs(2), SamplingParams()))
    assert len(server.batches) == 2 and adopted.batches_created == 0


def test_stub_batch_api_validates_input(server):
    headers = {"Authorization": f"Bearer {SECRET}"}
    bad = b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m"}}\nnot json\n'
    with httpx.Client(base_url=server.base_url + "/", headers=headers) as client:
        f = client.post("files", data={"purpose": "batch"}, files={"file": ("in.jsonl", bad)}).json()
        assert f["object"] == "file" and f["purpose"] == "batch" and f["bytes"] == len(bad)
        b = client.post("batches", json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                                         "completion_window": "24h"}).json()
        assert b["status"] == "validating" and b["request_counts"]["total"] == 0
        b = client.get(f"batches/{b['id']}").json()
        assert b["status"] == "failed" and {e["code"] for e in b["errors"]["data"]} == {"invalid_url", "invalid_json"}
        assert client.get("batches", params={"limit": 1}).json()["data"][0]["id"] == b["id"]
        assert client.get("batches/batch_nope").status_code == 404
        assert httpx.post(server.base_url + "/batches", json={}).status_code == 401


# ---------------------------------------------------------------- the generate job in batch mode
def _teacher(srv) -> str:
    return ("teacher={type: openai, model: gpt-4o-mini, base_url: '" + srv.base_url + "', api_key_env: " + KEY_VAR +
            ", mode: batch, batch: {poll_interval_s: 0.05}}")


def _rows(out: str) -> list[dict]:
    rows = []
    for kind in ("data", "quarantine"):
        if storage.exists(storage.join(out, kind)):
            rows += tables.read_rows(storage.join(out, kind))
    return rows


@pytest.mark.slow
def test_generate_in_batch_mode_killed_while_batches_are_in_flight_resumes_exactly_once(
        ray_session, prepared_samples, server, tmp_path):
    out = str(tmp_path / "gen")
    address = ray_session.get_runtime_context().gcs_address
    common = [f"input.path={prepared_samples}", f"output.dir={out}", "input.limit=12", "output.shard_size=8",
              "sampling.n=2", _teacher(server)]
    server.batch_hold = True  # batches stay in_progress until released
    proc = subprocess.Popen([sys.executable, "-m", "ray_jobs.generate", "--config", CONFIG, f"ray.address={address}",
                             "pool.max_actors=2", "pool.min_actors=2", *common],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    try:
        deadline = time.time() + 180
        while time.time() < deadline and len(storage.list_files(os.path.join(out, "_batches"), ".json")) < 2:
            assert proc.poll() is None, "the job ended before its batches were in flight"
            time.sleep(0.2)
        assert len(storage.list_files(os.path.join(out, "_batches"), ".json")) >= 2
    finally:
        proc.kill()
        proc.wait()
    in_flight = {b["id"] for b in server.batches.values() if b["status"] in ("validating", "in_progress")}
    assert len(in_flight) >= 2 and not storage.list_files(os.path.join(out, "_done"), ".json")
    server.batch_hold = False
    assert generate.main(["--config", CONFIG, f"ray.address={address}", *common]) == 0
    rows = _rows(out)
    keys = [(r["id"], r["sample_index"]) for r in rows]
    assert len(keys) == 24 and len(set(keys)) == 24  # every (question, sample) exactly once
    assert len(server.batches) == 3  # one batch per shard: the killed run's batches were polled, not re-created
    assert in_flight <= set(server.batches)
    assert server.batch_requests == 24 and server.request_count == 0
    m = read_manifest(out)
    (entry,) = m["usage"]["cost"]["by_stage_model"]
    assert (entry["stage"], entry["model"], entry["mode"], entry["requests"]) == ("decomposer", "gpt-4o-mini", "batch", 24)
    online = entry["prompt_tokens"] / 1e6 * 0.15 + entry["completion_tokens"] / 1e6 * 0.60
    assert entry["cost"] == pytest.approx(online * 0.5, abs=1e-8) and m["usage"]["estimated_cost"] == entry["cost"]
