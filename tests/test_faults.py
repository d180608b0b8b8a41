"""Faults during real jobs, each ending with nothing lost and nothing duplicated.

On a simulated two-teacher-node cluster (tests/cluster_harness.py's SimCluster: head {CPU: 1}, two
nodes {CPU: 2, teacher: 1}, its own S3 server), `generate` runs as its own driver process against a
slow OpenAI-compatible stub while we: remove a node; SIGKILL a generation actor; take the teacher
endpoint down (until the job has hit it), then for good; crash and restart the S3 server. Then corrupt inputs: a garbage
Parquet file among prepared questions (generate) and broken raw corpus files (prepare).

A training worker killed mid-epoch is covered by
tests/test_training.py::test_worker_crash_resumes_from_s3_checkpoint (restart from the latest
S3 checkpoint at the saved step), and not repeated here.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import socket
import threading
import uuid

import pytest

from tests.servers import free_port
from tests.servers.openai_stub import OpenAIStubServer
from tests.cluster_harness import (
    GENERATE_YAML,
    REPO,
    SimCluster,
    assert_exactly_once,
    committed,
    decomposition_responder,
    expected_pairs,
    job_log,
    openai_teacher,
    rows_of,
    run_job,
    wait_for,
)

N_Q, N_SAMPLES, SHARD = 24, 2, 3  # 48 requests in 16 shards
TOTAL_SHARDS = N_Q * N_SAMPLES // SHARD
TEACHER_NODE = {"num_cpus": 2, "resources": {"teacher": 1}}
POOL = "pool={min_actors: 2, max_actors: 2, num_cpus: 0.5, resources: {teacher: 1}}"


def clear_error_line(log: str, *needles: str) -> bool:
    """A one-line ``ERROR divconq...: <Type>: <message>`` from ``run_main`` containing every needle."""
    return any(all(n in line for n in needles) for line in re.findall(r"^.* ERROR divconq[\w.]*: .*$", log, re.M))


# ====================================================================== fixtures
class TcpFront:
    """A TCP forwarder on 127.0.0.1:``port`` to ``target_port``. ``stop()`` closes the listening socket
    *and* every open connection (clients see resets, then connection refused); ``start()`` listens on
    the same port again. In front of a server that keeps HTTP keep-alive connections served by their
    own threads (werkzeug's), this is what makes a stop a real outage.

    With the server behind it down, the front (like a load balancer with no live backend) accepts each
    connection and closes it at once, counting it in ``upstream_refused``: how many times clients tried
    the dead endpoint, so a test can end an outage once the job has hit it, not after a guessed time."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.upstream_refused = 0
        self._conns: set = set()
        self._lock = threading.Lock()
        self._listener = None
        self._thread = None
        self._stopping = threading.Event()

    def start(self) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        ls.settimeout(0.1)
        self._listener = ls
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept, args=(ls,), daemon=True)
        self._thread.start()

    def _accept(self, ls) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = ls.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                with self._lock:
                    self.upstream_refused += 1
                client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a, b) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (a, b):
                self._drop(sock)

    def _drop(self, sock) -> None:
        with self._lock:
            self._conns.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def cut(self) -> None:
        """Close every open connection, keep listening."""
        with self._lock:
            conns = list(self._conns)
        for sock in conns:
            self._drop(sock)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for sock in conns:
            self._drop(sock)


class MotoS3:
    """A dedicated S3 endpoint: moto (real HTTP) behind a :class:`TcpFront`. ``stop()`` takes the whole
    endpoint down (server stopped, every connection cut, connection refused); ``start()`` brings it
    back on the same port with its data, as an S3-compatible store with persistent storage restarts."""

    def __init__(self) -> None:
        self.moto_port = free_port()
        self.server = None
        self._start_moto()
        self.front = TcpFront(self.moto_port)
        self.front.start()
        self.port = self.front.port
        self.env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}

    def _start_moto(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.moto_port, verbose=False)
        self.server.start()

    def start(self) -> None:
        self._start_moto()  # moto keeps its state in this process: buckets and objects survive
        self.front.start()

    def stop(self) -> None:
        self.front.stop()
        self._stop_moto()

    def _stop_moto(self) -> None:
        self.server.stop()
        self.server._server.server_close()  # ThreadedMotoServer.stop() leaves its socket open

    def crash(self) -> None:
        """The S3 server goes away (its open connections with it); its address stays, now dead: every
        new connection is closed unanswered and counted in ``front.upstream_refused``. ``start_server()``
        brings it back with its data."""
        self._stop_moto()
        self.front.cut()

    def start_server(self) -> None:
        self._start_moto()

    def bucket(self) -> str:
        import boto3

        name = f"f-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="module")
def s3_dedicated():
    s3 = MotoS3()
    yield s3
    s3.stop()


@pytest.fixture(scope="module")
def cluster(s3_dedicated):
    c = SimCluster({"head": {"num_cpus": 1}, "nodes": {"A": TEACHER_NODE, "B": TEACHER_NODE}}, env_extra=s3_dedicated.env)
    yield c
    c.shutdown()


@pytest.fixture
def teachers(cluster):
    """The cluster with two teacher nodes (a test that removed one gets a replacement, as the autoscaler would)."""
    while len(cluster.nodes) < 2:
        cluster.add(f"T{uuid.uuid4().hex[:4]}", **TEACHER_NODE)
    return cluster


@pytest.fixture
def stub():
    with OpenAIStubServer(latency_s=0.3, responder=decomposition_responder) as srv:
        yield srv


def start_generate(cluster, prepared, out, srv, log_path, *extra: str, teacher: dict | None = None,
                   base_url: str | None = None):
    teacher = {"concurrency": 1, **(teacher or {})}
    return run_job(cluster.env, "generate", "--config", GENERATE_YAML, f"ray.address={cluster.address}",
                   f"input.path={prepared}", f"output.dir={out}", f"input.limit={N_Q}", f"output.shard_size={SHARD}",
                   f"sampling.n={N_SAMPLES}", POOL, openai_teacher(base_url or srv.base_url, **teacher), *extra,
                   log_path=log_path, wait=False)


def finish(proc, timeout: float = 240) -> int:
    try:
        return proc.wait(timeout)
    except Exception:
        proc.kill()
        proc.wait()
        raise AssertionError(f"job did not finish in {timeout}s; log tail:\n{job_log(proc)[-4000:]}")
    finally:
        proc._log_file.close()


def n_committed(out: str) -> int:
    return len(committed(out))


# ====================================================================== lost node, killed actor
@pytest.mark.slow
def test_node_removed_mid_generate(teachers, prepared_samples, stub, tmp_path):
    cluster, out = teachers, str(tmp_path / "gen")
    proc = start_generate(cluster, prepared_samples, out, stub, str(tmp_path / "gen.log"))
    wait_for(lambda: n_committed(out) >= 3 or proc.poll() is not None, 180, "three committed shards")
    victim = next(name for name in cluster.nodes)
    victim_id = cluster.nodes[victim]
    on_victim = [a for a in cluster.actors("DecomposeWorker") if a["state"] == "ALIVE" and victim_id in a["nodes"]]
    assert on_victim, "no generation actor on the node to remove"
    cluster.remove(victim)
    assert n_committed(out) < TOTAL_SHARDS, "the node went away after the job had finished"
    rc = finish(proc)
    log = job_log(proc)
    assert rc == 0, log[-4000:]
    assert_exactly_once(out, expected_pairs(prepared_samples, N_Q, N_SAMPLES))
    moved = {a["id"]: a for a in cluster.actors("DecomposeWorker")}[on_victim[0]["id"]]
    assert moved["restarts"] >= 1, f"the lost actor was never restarted: {moved}"
    assert any(n != victim_id for n in moved["nodes"]), f"the lost actor did not move to a live node: {moved}"


@pytest.mark.slow
def test_generation_actor_killed_mid_batch(teachers, prepared_samples, stub, tmp_path):
    cluster, out = teachers, str(tmp_path / "gen")
    proc = start_generate(cluster, prepared_samples, out, stub, str(tmp_path / "gen.log"))
    wait_for(lambda: n_committed(out) >= 3 or proc.poll() is not None, 180, "three committed shards")
    alive = [a for a in cluster.actors("DecomposeWorker") if a["state"] == "ALIVE" and a["pid"]]
    assert alive and proc.poll() is None, "no live generation actor to kill"
    victim = alive[0]
    os.kill(victim["pid"], signal.SIGKILL)
    assert n_committed(out) < TOTAL_SHARDS
    rc = finish(proc)
    assert rc == 0, job_log(proc)[-4000:]
    assert_exactly_once(out, expected_pairs(prepared_samples, N_Q, N_SAMPLES))
    after = {a["id"]: a for a in cluster.actors("DecomposeWorker")}[victim["id"]]
    assert after["restarts"] >= 1, after


# ====================================================================== teacher endpoint outages
@pytest.mark.slow
def test_teacher_endpoint_down_for_seconds_is_ridden_out(teachers, prepared_samples, stub, tmp_path):
    """The teacher server goes down mid-run and stays down until the job has tried it 8 times (through a
    front on its address that answers nothing meanwhile), then comes back: the job rides it out."""
    cluster, out = teachers, str(tmp_path / "gen")
    front = TcpFront(stub.port)
    front.start()
    try:
        url = f"http://127.0.0.1:{front.port}/v1"
        proc = start_generate(cluster, prepared_samples, out, stub, str(tmp_path / "gen.log"), base_url=url,
                              teacher={"max_retries": 200, "backoff_base_s": 0.2, "backoff_max_s": 1.0, "timeout_s": 10})
        wait_for(lambda: n_committed(out) >= 3 or proc.poll() is not None, 180, "three committed shards")
        stub.stop()  # the server is gone; its address (the front) now closes every connection unanswered
        front.cut()
        down_at = n_committed(out)
        try:
            wait_for(lambda: front.upstream_refused >= 8 or proc.poll() is not None, 120, "8 attempts on the dead teacher")
            assert proc.poll() is None, f"the job gave up during the outage:\n{job_log(proc)[-3000:]}"
        finally:
            stub.reset_counters()
            stub.start()  # the same port
        rc = finish(proc)
    finally:
        front.stop()
    assert rc == 0, job_log(proc)[-4000:]
    assert down_at < TOTAL_SHARDS and stub.counters()["requests"] > 0, "the outage did not hit the job"
    assert_exactly_once(out, expected_pairs(prepared_samples, N_Q, N_SAMPLES))


@pytest.mark.slow
def test_teacher_endpoint_down_for_good_fails_clearly_and_rerun_completes(teachers, prepared_samples, stub, tmp_path):
    """Fails with exit code 1 after retries, keeps committed shards; with the endpoint back, the same
    command completes the rest exactly once.
    """
    cluster, out = teachers, str(tmp_path / "gen")
    teacher = {"max_retries": 2, "backoff_base_s": 0.05, "backoff_max_s": 0.2, "timeout_s": 5}
    proc = start_generate(cluster, prepared_samples, out, stub, str(tmp_path / "gen1.log"), teacher=teacher)
    wait_for(lambda: n_committed(out) >= 3 or proc.poll() is not None, 180, "three committed shards")
    stub.stop()
    rc = finish(proc)
    log = job_log(proc)
    kept = committed(out)
    assert rc == 1, f"expected exit code 1, got {rc}:\n{log[-3000:]}"
    assert stub.base_url in log and "unreachable" in log, log[-3000:]
    assert 3 <= len(kept) < TOTAL_SHARDS, len(kept)
    assert not os.path.exists(os.path.join(out, "manifest.json"))

    stub.start()
    stub.reset_counters()
    rerun = start_generate(cluster, prepared_samples, out, stub, str(tmp_path / "gen2.log"), teacher=teacher)
    assert finish(rerun) == 0, job_log(rerun)[-4000:]
    assert_exactly_once(out, expected_pairs(prepared_samples, N_Q, N_SAMPLES))
    after = committed(out)
    assert all(after[k] == v for k, v in kept.items()), "a committed shard was redone"
    assert stub.counters()["requests"] <= N_Q * N_SAMPLES - SHARD * len(kept)
    assert clear_error_line(log, "BackendUnavailable", stub.base_url, "unreachable"), \
        "an unreachable teacher must be reported as run_main's one-line error:\n" + log[-3000:]


# ====================================================================== S3 restarted
def test_s3_requests_ride_out_a_short_outage(s3_dedicated, monkeypatch):
    """pipeline.storage's own S3 retries (AWS standard mode, DIVCONQ_S3_MAX_ATTEMPTS): with S3 down until
    it has been tried 3 times, a write and a read succeed with the default attempts and fail with one."""
    from pipeline import storage

    for k, v in s3_dedicated.env.items():
        monkeypatch.setenv(k, v)
    uri = f"{s3_dedicated.bucket()}/outage/object.bin"

    def during_outage(action, hits: int):
        """Run ``action`` with S3 down; bring it back once it has been tried ``hits`` times (0: afterwards)."""
        start = s3_dedicated.front.upstream_refused
        s3_dedicated.crash()

        def restart_when_hit() -> None:
            wait_for(lambda: s3_dedicated.front.upstream_refused - start >= hits, 60, f"{hits} attempts on S3")
            s3_dedicated.start_server()

        restarter = threading.Thread(target=restart_when_hit, daemon=True)
        if hits:
            restarter.start()
        try:
            return action()
        finally:
            if hits:
                restarter.join(70)
            else:
                s3_dedicated.start_server()

    monkeypatch.delenv("DIVCONQ_S3_MAX_ATTEMPTS", raising=False)  # the default
    during_outage(lambda: storage.write_bytes(uri, b"payload"), hits=3)
    assert during_outage(lambda: storage.read_bytes(uri), hits=3) == b"payload"
    monkeypatch.setenv("DIVCONQ_S3_MAX_ATTEMPTS", "1")
    with pytest.raises(OSError):
        during_outage(lambda: storage.read_bytes(uri), hits=0)
    assert storage.read_bytes(uri) == b"payload"


S3_HITS_DURING_OUTAGE = 6  # S3 stays down until the job has tried it this many times


@pytest.mark.slow
def test_s3_restarted_mid_run_is_ridden_out(teachers, prepared_samples, stub, s3_dedicated, tmp_path, monkeypatch):
    """Output on S3; the S3 server crashes mid-run and stays down until the job has tried it 6 times (its
    address answers nothing), then restarts with its data. S3 requests are retried (AWS standard mode,
    DIVCONQ_S3_MAX_ATTEMPTS, pipeline/storage.py), so the job rides it out: exit code 0, every
    (question, sample) exactly once, no shard redone, and the outage did hit the job."""
    for k, v in s3_dedicated.env.items():
        monkeypatch.setenv(k, v)
    out = f"{s3_dedicated.bucket()}/gen"
    proc = start_generate(teachers, prepared_samples, out, stub, str(tmp_path / "gen.log"))
    try:
        wait_for(lambda: n_committed(out) >= 3 or proc.poll() is not None, 180, "three committed shards")
        before = committed(out)
        assert proc.poll() is None and len(before) < TOTAL_SHARDS, "the job ended before the outage"
        hits_before = s3_dedicated.front.upstream_refused
        s3_dedicated.crash()  # from here on this test reads nothing from S3 until it is back
        wait_for(lambda: s3_dedicated.front.upstream_refused - hits_before >= S3_HITS_DURING_OUTAGE
                 or proc.poll() is not None, 120, f"{S3_HITS_DURING_OUTAGE} attempts on the dead S3 endpoint")
        assert proc.poll() is None, f"the job gave up during the S3 outage:\n{job_log(proc)[-3000:]}"
    finally:
        s3_dedicated.start_server()
    rc = finish(proc)
    assert rc == 0, job_log(proc)[-4000:]
    assert_exactly_once(out, expected_pairs(prepared_samples, N_Q, N_SAMPLES))
    after = committed(out)
    assert len(after) == TOTAL_SHARDS and all(after[k] == v for k, v in before.items()), "a committed shard was redone"


# ====================================================================== corrupt inputs
@pytest.mark.slow
def test_corrupt_input_parquet_fails_clearly_before_any_work(teachers, prepared_samples, tmp_path):
    """A garbage file among generate's input Parquet files stops the job before any shard is committed,
    with one error line naming the file and why (the input is a previous job's output: silently
    dropping a file would lose its questions). Replacing the file and rerunning completes exactly once."""
    from pipeline import tables

    rows = [r for r in tables.read_rows(prepared_samples) if r["dataset"] == "gsm8k" and r["split"] == "train"][:12]
    src = tmp_path / "questions"
    src.mkdir()
    tables.write_rows(str(src / "part-000.parquet"), rows[:4])
    bad = src / "part-001.parquet"
    bad.write_bytes(b"PAR1" + os.urandom(512))  # right magic up front, garbage after
    tables.write_rows(str(src / "part-002.parquet"), rows[8:])
    out = str(tmp_path / "gen")
    args = ["--config", GENERATE_YAML, f"ray.address={teachers.address}", f"input.path={src}", f"output.dir={out}",
            "output.shard_size=2", "sampling.n=1", "teacher={type: reference}"]
    proc = run_job(teachers.env, "generate", *args, log_path=str(tmp_path / "gen1.log"), timeout=180)
    log = job_log(proc)
    assert proc.returncode == 1, log[-3000:]
    assert clear_error_line(log, str(bad), "Parquet"), log[-3000:]
    assert not committed(out) and not rows_of(out)[0] and not os.path.exists(os.path.join(out, "manifest.json"))

    tables.write_rows(str(bad), rows[4:8])  # the file repaired (rewritten by the job that made it)
    proc = run_job(teachers.env, "generate", *args, log_path=str(tmp_path / "gen2.log"), timeout=180)
    assert proc.returncode == 0, job_log(proc)[-3000:]
    assert_exactly_once(out, {(r["id"], 0) for r in rows})


def test_corrupt_raw_corpus_files_are_quarantined(tmp_path):
    """prepare over good and broken raw files: a truncated JSONL line is quarantined with its file and
    line; a file that is not gzip and a truncated .gz are quarantined with the file and the reason,
    keeping the rows read before the damage; every other row is processed, and the job succeeds.
    """
    from pipeline import storage, tables
    from pipeline.manifest import read_manifest
    from ray_jobs import prepare

    lines = open(os.path.join(REPO, "data", "samples", "gsm8k", "train_socratic.jsonl")).read().splitlines()[:40]
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "good.jsonl").write_text("\n".join(lines[:10]) + "\n")
    (raw / "cut.jsonl").write_text("\n".join(lines[10:15]) + "\n" + lines[15][:40])  # last line cut mid-JSON
    (raw / "not-gzip.jsonl.gz").write_bytes(b"this was never gzip\n" + "\n".join(lines[16:20]).encode())
    packed = gzip.compress(("\n".join(lines[20:40]) + "\n").encode())
    (raw / "truncated.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    out = str(tmp_path / "prepared")
    sources = [{"dataset": "gsm8k", "path": str(raw / name), "split": split}
               for name, split in (("good.jsonl", "a"), ("cut.jsonl", "b"), ("not-gzip.jsonl.gz", "c"),
                                   ("truncated.jsonl.gz", "d"))]
    rc = prepare.main(["--config", os.path.join(REPO, "configs", "prepare.yaml"), f"sources={json.dumps(sources)}",
                       f"output.dir={out}"])
    assert rc == 0
    good = tables.read_rows(storage.join(out, "data"))
    bad = tables.read_rows(storage.join(out, "quarantine"))
    by_split: dict[str, list] = {}
    for r in good:
        by_split.setdefault(r["split"], []).append(r)
    assert len(by_split["a"]) == 10 and len(by_split["b"]) == 5 and "c" not in by_split
    d_pos = sorted(int(r["id"].rsplit(":", 1)[1]) for r in by_split.get("d", []))
    assert d_pos == list(range(len(d_pos))) and len(d_pos) < 20, "rows before the truncation, in order"
    why = {(os.path.basename(r["source"]), r["location"]): r["error"] for r in bad}
    assert "invalid JSON" in why[("cut.jsonl", "line 6")]
    not_gz = [e for (f, _), e in why.items() if f == "not-gzip.jsonl.gz"]
    trunc = [e for (f, _), e in why.items() if f == "truncated.jsonl.gz"]
    assert len(not_gz) == 1 and re.search(r"gzip|inflate|header", not_gz[0], re.I), why
    assert len(trunc) == 1 and re.search(r"truncat|end of|EOF", trunc[0], re.I), why
    m = read_manifest(out)
    assert m["counts"]["rows_out"] == len(good) and m["counts"]["quarantined"] == len(bad)
    shutil.rmtree(out)
