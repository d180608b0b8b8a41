"""generate on real local Ray: reference teacher, a flaky OpenAI-compatible server, a tiny HF model,
S3 in and out, and a job killed midway then resumed (nothing lost, nothing duplicated)."""

from __future__ import annotations

import os
import sys

from pipeline import storage, tables
from pipeline.manifest import read_manifest
from ray_jobs import generate, prepare
from tests.cluster_harness import kill_after_shards
from tests.conftest import REPO
from tests.servers.openai_stub import OpenAIStubServer

CONFIG = os.path.join(REPO, "configs", "generate.yaml")


def run_generate(*overrides: str) -> int:
    return generate.main(["--config", CONFIG, *overrides])


def assert_exactly_once(out: str, n_questions: int, n: int) -> list[dict]:
    good = tables.read_rows(storage.join(out, "data")) if storage.exists(storage.join(out, "data")) else []
    bad = tables.read_rows(storage.join(out, "quarantine")) if storage.exists(storage.join(out, "quarantine")) else []
    ids = [r["request_id"] for r in good + bad]
    assert len(ids) == len(set(ids)), "a request appears twice"
    assert len(ids) == n_questions * n, f"expected {n_questions * n} rows, got {len(ids)}"
    return good


def test_reference_teacher_n_samples(ray_session, prepared_samples, tmp_path):
    out = str(tmp_path / "gen")
    assert run_generate(f"input.path={prepared_samples}", f"output.dir={out}", "input.limit=30", "output.shard_size=8", "sampling.n=3") == 0
    good = assert_exactly_once(out, 30, 3)
    by_q: dict[str, list] = {}
    for r in good:
        by_q.setdefault(r["id"], []).append(r)
        assert r["teacher"] == "reference-gold" and r["prompt_version"] == "v1"
        assert r["subquestions"], r
    # sample 0 replays the gold decomposition; later samples are perturbed variants
    some = next(iter(by_q.values()))
    s0 = next(r for r in some if r["sample_index"] == 0)
    assert s0["subquestions"] == [q for i, q in enumerate(s0["gold_subquestions"]) if q not in s0["gold_subquestions"][:i]]
    assert any(r["subquestions"] != s0["subquestions"] for r in some if r["sample_index"] > 0)
    m = read_manifest(out)
    assert m["counts"]["rows_in"] == 90 and m["counts"]["rows_out"] + m["counts"]["quarantined"] == 90
    assert m["usage"]["total_tokens"] > 0 and "ray" in m["versions"]
    # a second run of a finished job does no work and changes nothing
    before = sorted(storage.list_files(storage.join(out, "data")))
    assert run_generate(f"input.path={prepared_samples}", f"output.dir={out}", "input.limit=30", "output.shard_size=8", "sampling.n=3") == 0
    assert sorted(storage.list_files(storage.join(out, "data"))) == before
    assert_exactly_once(out, 30, 3)


def test_changed_settings_refuse_to_mix_into_existing_output(ray_session, prepared_samples, tmp_path):
    out = str(tmp_path / "gen")
    assert run_generate(f"input.path={prepared_samples}", f"output.dir={out}", "input.limit=4", "sampling.n=1") == 0
    assert run_generate(f"input.path={prepared_samples}", f"output.dir={out}", "input.limit=4", "sampling.n=2") == 1
    assert run_generate(f"input.path={prepared_samples}", f"output.dir={out}", "input.limit=4", "sampling.n=2", "output.overwrite=true") == 0
    assert_exactly_once(out, 4, 2)


def _flaky_responder(messages, body):
    text = messages[-1]["content"]
    if "Natalia" in text:  # one question gets an answer with no subquestions at all
        return "I cannot help with that."
    return "Sure! Here they are:\n1) What is the first quantity?\n2) What is the second quantity?\n2) What is the second quantity?"


def test_openai_teacher_survives_429_500_garbage_and_slow_responses(ray_session, prepared_samples, tmp_path, monkeypatch):
    monkeypatch.setenv("DIVCONQ_TEST_TEACHER_KEY", "sk-test-SECRET-123")
    with OpenAIStubServer(fail_rate_429=0.15, fail_rate_500=0.15, garbage_rate=0.1, slow_rate=0.05, slow_s=0.3,
                          retry_after=0.05, seed=1, responder=_flaky_responder, required_api_key="sk-test-SECRET-123") as srv:
        out = str(tmp_path / "gen")
        rc = run_generate(f"input.path={prepared_samples}", f"output.dir={out}", "input.limit=24", "output.shard_size=6",
                          "teacher={type: openai, model: stub-model, base_url: '" + srv.base_url + "', "
                          "api_key_env: DIVCONQ_TEST_TEACHER_KEY, concurrency: 4, max_retries: 12, backoff_base_s: 0.01, backoff_max_s: 0.1}",
                          "sampling.n=1")
        assert rc == 0
        counts = srv.counters()
    good = assert_exactly_once(out, 24, 1)
    bad = tables.read_rows(storage.join(out, "quarantine"))
    assert [r["id"] for r in bad] == ["gsm8k:train:0"] and "no subquestions" in bad[0]["error"]
    assert all(r["subquestions"] == ["What is the first quantity?", "What is the second quantity?"] for r in good)
    assert all(r["teacher"] == "stub-model" and r["prompt_tokens"] > 0 for r in good)
    assert sum(v for k, v in counts["by_status"].items() if str(k) != "200") > 0, counts  # faults really happened
    # the key is only ever read from the environment: it is in no output, manifest or request shard
    for f in storage.list_files(out):
        assert b"sk-test-SECRET-123" not in storage.read_bytes(f), f


def test_local_hf_teacher(ray_session, prepared_samples, tiny_model_dir, tmp_path):
    out = str(tmp_path / "gen")
    rc = run_generate(f"input.path={prepared_samples}", f"output.dir={out}", "input.limit=4", "sampling.n=1",
                      "sampling.max_tokens=16", f"teacher={{type: hf, model: '{tiny_model_dir}', batch_size: 4}}", "few_shot=false")
    assert rc == 0
    good = tables.read_rows(storage.join(out, "data")) if storage.exists(storage.join(out, "data")) else []
    bad = tables.read_rows(storage.join(out, "quarantine")) if storage.exists(storage.join(out, "quarantine")) else []
    assert len(good) + len(bad) == 4
    rows = good + bad
    assert all(r["teacher"] == tiny_model_dir and 0 < r["completion_tokens"] <= 16 and r["prompt_tokens"] > 20 for r in rows)
    assert all(r["error"].startswith("parse error") for r in bad)  # an untrained model writes junk: quarantined, not a crash


def test_s3_input_and_output(ray_session, s3_bucket, tmp_path):
    prep = f"{s3_bucket}/prepared"
    assert prepare.main(["--config", os.path.join(REPO, "configs", "prepare.yaml"), f"output.dir={prep}"]) == 0
    out = f"{s3_bucket}/generate"
    assert run_generate(f"input.path={prep}", f"output.dir={out}", "input.limit=10", "output.shard_size=4", "sampling.n=2",
                        f"cache_dir={s3_bucket}/cache") == 0
    assert_exactly_once(out, 10, 2)
    assert read_manifest(out)["counts"]["shards"] == 5
    assert storage.list_files(f"{s3_bucket}/cache", ".json")  # responses cached on S3


def test_killed_job_resumes_without_loss_or_duplicates(ray_session, prepared_samples, tmp_path):
    """The teacher answers the first 12 requests (3 shards of 4, one actor) and holds every later one, so
    the job is killed at a known point: exactly 3 shards committed, the 4th in flight. Nothing is timed."""
    out = str(tmp_path / "gen")
    address = ray_session.get_runtime_context().gcs_address
    n_done = lambda: len(storage.list_files(os.path.join(out, "_done"), ".json"))  # noqa: E731
    with OpenAIStubServer(latency_s=0.05, seed=2) as srv:
        srv.hold_after_requests, srv.hold_timeout_s = 12, 600
        teacher = "teacher={type: openai, model: stub, base_url: '" + srv.base_url + "', api_key_env: null, concurrency: 2, timeout_s: 600}"
        kill_after_shards([sys.executable, "-m", "ray_jobs.generate", "--config", CONFIG, f"ray.address={address}",
                           f"input.path={prepared_samples}", f"output.dir={out}", "input.limit=48", "output.shard_size=4",
                           "sampling.n=1", "pool.max_actors=1", teacher], out, srv, shards=3)
        assert n_done() == 3
        first_run_requests = srv.counters()["requests"]
        srv.hold_after_requests = None
        srv.reset_counters()
        # Rerun the same command in-process: only the uncommitted shards are redone.
        assert run_generate(f"ray.address={address}", f"input.path={prepared_samples}", f"output.dir={out}", "input.limit=48",
                            "output.shard_size=4", "sampling.n=1", teacher) == 0
        second_run_requests = srv.counters()["requests"]
    assert_exactly_once(out, 48, 1)
    assert second_run_requests == 48 - 3 * 4, "the rerun redid committed work (or sent a request twice)"
    assert first_run_requests > 12
