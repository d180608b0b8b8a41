"""Exactly-once at every crash point of a shard, locally and on S3.

A shard writes, in order, its data file, its quarantine file (or deletes an earlier attempt's), and its
``_done`` marker. A storage wrapper (test-side: it wraps the real ``pipeline.storage`` writes) kills the
shard just before each of those writes, as a SIGKILL would (a BaseException nothing in the job catches);
then the shard is redone with a different outcome (the teacher that answered one question badly now
answers it well, or the other way round). After the redo the shard's files are exactly what a clean run
writes (no stale quarantine or data file, no temp file) and every request is in ``data/`` or
``quarantine/`` exactly once.
"""

from __future__ import annotations

import os

import pytest

from pipeline import storage, tables
from pipeline.generation import DecomposeWorker, GenerateConfig, expand_samples
from pipeline.sharded import Layout, pending_shards, stage_requests
from tests.servers.openai_stub import DECOMPOSITION_REPLY, OpenAIStubServer

N_ROWS = 5
SHARD = "shard-00000"


def worker_config(root: str, teacher) -> GenerateConfig:
    return GenerateConfig.model_validate({
        "input": {"path": "unused"}, "output": {"dir": root}, "few_shot": False, "max_subquestions": 10,
        "teacher": {"type": "openai", "model": "stub", "base_url": teacher.base_url, "api_key_env": None, "max_retries": 0}})


class Killed(BaseException):
    """What the wrapper raises in place of a write: like a SIGKILL, no ``except Exception`` stops it."""


def crash_before(monkeypatch, folder: str) -> None:
    """Kill the process at its first write to (or delete in) ``<out>/<folder>/``."""
    real_write, real_delete = storage.write_bytes, storage.delete

    def hits(uri: str) -> bool:
        return f"/{folder}/" in str(uri)

    def write_bytes(uri, data):
        if hits(uri):
            raise Killed(uri)
        real_write(uri, data)

    def delete(uri):
        if hits(uri):
            raise Killed(uri)
        real_delete(uri)

    monkeypatch.setattr(storage, "write_bytes", write_bytes)
    monkeypatch.setattr(storage, "delete", delete)


@pytest.fixture(scope="module")
def teacher():
    """A stub teacher that, while ``srv.bad`` is set, answers the first question with no subquestions."""
    state = {"bad": None}

    def responder(messages, body):
        if state["bad"] and state["bad"] in messages[-1]["content"]:
            return "I cannot help with that."
        return DECOMPOSITION_REPLY

    with OpenAIStubServer(responder=responder) as srv:
        srv.state = state
        yield srv


def files_under(root: str) -> set[str]:
    fs, base = storage.arrow_filesystem(root)
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return {i.path[len(base) + 1:] for i in infos if i.type == pafs.FileType.File}


def ids(path: str) -> list[str]:
    return [r["request_id"] for r in tables.read_rows(path)] if storage.exists(path) else []


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("first_bad, redo_bad", [(True, False), (False, True)], ids=["bad-then-clean", "clean-then-bad"])
@pytest.mark.parametrize("crash", ["data", "quarantine", "_done"])
def test_redo_after_a_crash_before_each_write(where, first_bad, redo_bad, crash, teacher, prepared_samples, tmp_path,
                                              monkeypatch, request):
    root = request.getfixturevalue("s3_bucket") + "/gen" if where == "s3" else str(tmp_path / "gen")
    questions = [r for r in tables.read_rows(prepared_samples) if r["dataset"] == "gsm8k"][:N_ROWS]
    layout = Layout(root)
    assert stage_requests(layout, expand_samples(questions, 1), N_ROWS, {"t": 1}) == [SHARD]
    worker = DecomposeWorker(root, worker_config(root, teacher))
    bad_q = questions[0]["question"]
    all_ids = sorted(f"{q['id']}#0" for q in questions)

    teacher.state["bad"] = bad_q if first_bad else None
    with monkeypatch.context() as m:
        crash_before(m, crash)
        with pytest.raises(Killed):
            worker.run_shard(SHARD)
    assert pending_shards(layout, [SHARD]) == [SHARD], "a crashed shard must not count as committed"

    teacher.state["bad"] = bad_q if redo_bad else None
    stats = worker.run_shard(SHARD)  # the redo (what a rerun of the job does for an uncommitted shard)

    expected = {"_requests/_plan.json", f"_requests/{SHARD}.parquet", f"data/{SHARD}.parquet", f"_done/{SHARD}.json"}
    if redo_bad:
        expected.add(f"quarantine/{SHARD}.parquet")
    assert files_under(root) == expected  # nothing stale of any kind
    data, quarantine = ids(layout.shard_file("data", SHARD)), ids(layout.shard_file("quarantine", SHARD))
    assert sorted(data + quarantine) == all_ids  # every request exactly once
    assert quarantine == ([f"{questions[0]['id']}#0"] if redo_bad else [])
    assert stats["rows_out"] == len(data) and stats["quarantined"] == len(quarantine)
    assert pending_shards(layout, [SHARD]) == []


def test_a_killed_local_write_leaves_no_temp_file_after_the_redo(teacher, prepared_samples, tmp_path, monkeypatch):
    """A kill in the middle of a local write (after the temp file, before its rename) leaves a temp file;
    the shard's redo removes it."""
    root = str(tmp_path / "gen")
    questions = [r for r in tables.read_rows(prepared_samples) if r["dataset"] == "gsm8k"][:N_ROWS]
    layout = Layout(root)
    stage_requests(layout, expand_samples(questions, 1), N_ROWS, {"t": 1})
    worker = DecomposeWorker(root, worker_config(root, teacher))
    teacher.state["bad"] = None
    real_replace = os.replace

    def killed_rename(src, dst):
        if "/data/" in str(dst):
            raise Killed(dst)
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed_rename)
        with pytest.raises(Killed):
            worker.run_shard(SHARD)
    (left,) = [f for f in files_under(root) if ".tmp-" in f]
    # the redo runs in a new process (another pid) in real life: the temp file is a dead process's
    os.rename(os.path.join(root, left), os.path.join(root, left.rsplit("-", 1)[0] + "-999999999"))
    worker.run_shard(SHARD)
    assert files_under(root) == {"_requests/_plan.json", f"_requests/{SHARD}.parquet", f"data/{SHARD}.parquet",
                                 f"_done/{SHARD}.json"}
