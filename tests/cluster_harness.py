"""Harness for the cluster tests (test_cluster.py, test_faults.py, test_security.py): clusters that
live outside the pytest process, jobs run as their own driver processes, and exactly-once checks.

Every cluster here lives outside the pytest process, so the session's in-process Ray
(conftest.py ``ray_session``) is never touched: a `ray start --head` with its own temp dir, or a
``ray.cluster_utils.Cluster`` served by a child process (``python -m tests.cluster_harness serve
SPEC``, driven over stdin/stdout by :class:`SimCluster`). Each cluster gets a private ``RAY_TMPDIR``
(its address file and logs never meet other Ray instances on the machine) and its own auth token.
Teardown stops exactly those processes, by pid: `ray stop` has no per-cluster scope and would stop
every Ray on the machine.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)
RAY_CLI = os.path.join(VENV_BIN, "ray")
CLUSTER_YAML = os.path.join(REPO, "cluster.yaml")
RUNTIME_ENV_YAML = os.path.join(REPO, "configs", "runtime_env.yaml")
CLUSTER_DOC = os.path.join(REPO, "docs", "cluster.md")
GENERATE_YAML = os.path.join(REPO, "configs", "generate.yaml")


# ====================================================================== process hygiene
def _pids_of(tmp_root: str) -> list[int]:
    """Processes of one of our clusters: their command line or environment names its temp dir."""
    me = os.getpid()
    marker_env = f"RAY_TMPDIR={tmp_root}".encode()
    found = []
    for proc in glob.glob("/proc/[0-9]*"):
        pid = int(proc.rsplit("/", 1)[1])
        if pid == me:
            continue
        try:
            with open(f"{proc}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"{proc}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if tmp_root.encode() in cmd or marker_env in env:
            found.append(pid)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_cluster_processes(tmp_root: str, grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL, every process of the cluster rooted at ``tmp_root`` (never any other)."""
    pids = _pids_of(tmp_root)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline:
            pids = [p for p in pids if _alive(p)]
            if not pids:
                return
            time.sleep(0.1)


def cluster_env(tmp_root: str, **extra: str) -> dict[str, str]:
    """Environment for a cluster's processes and for the drivers/CLIs that talk to it.

    This venv first on PATH (so a job's ``python`` is ours), a private RAY_TMPDIR, Ray's token
    auth on with a token of the cluster's own (``<tmp_root>/auth_token``), no RAY_ADDRESS.
    """
    token_path = os.path.join(tmp_root, "auth_token")
    if not os.path.exists(token_path):
        with open(token_path, "w") as f:
            f.write(uuid.uuid4().hex + uuid.uuid4().hex)
    env = dict(os.environ)
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "PYTEST_CURRENT_TEST"):
        env.pop(k, None)
    env.update(
        PATH=VENV_BIN + os.pathsep + env.get("PATH", ""),
        RAY_TMPDIR=tmp_root,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=token_path,
        PYTHONPATH=REPO,
        RAY_USAGE_STATS_ENABLED="0",
        # This machine reaches only loopback: keep drivers on 127.0.0.1 (on Linux, Ray otherwise
        # swaps 127.0.0.1 for the primary interface's address when a driver connects).
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_DEDUP_LOGS="0",
        DS_ACCELERATOR="cpu",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    env.update(extra)
    return env


def auth_headers(env: dict[str, str]) -> dict[str, str]:
    with open(env["RAY_AUTH_TOKEN_PATH"]) as f:
        return {"Authorization": f"Bearer {f.read().strip()}"}


# ====================================================================== simulated multi-node cluster
class SimCluster:
    """A ``ray.cluster_utils.Cluster`` (several raylets on 127.0.0.1) living in a child process.

    ``spec = {"head": {"num_cpus": 1}, "nodes": {"A": {"num_cpus": 2, "resources": {"teacher": 1}}}}``.
    The child samples the GCS actor table every 0.2 s, so :meth:`actors` tells where every actor
    was alive (and its pid, restarts), and removes (abruptly) or adds nodes on request.
    """

    def __init__(self, spec: dict[str, Any], env_extra: Optional[dict[str, str]] = None, start_timeout: float = 180):
        self.tmp_root = tempfile.mkdtemp(prefix="dcq-sim-", dir="/tmp")  # short: Unix socket paths
        spec_path = os.path.join(self.tmp_root, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        self.env = cluster_env(self.tmp_root, **(env_extra or {}))
        self.log_path = os.path.join(self.tmp_root, "cluster.log")
        self._log = open(self.log_path, "w")
        self._lock = threading.Lock()
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.cluster_harness", "serve", spec_path], cwd=REPO,
                                     env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, bufsize=1)
        try:
            info = self._read(start_timeout)
        except BaseException:
            self.shutdown()
            raise
        self.address: str = info["address"]
        self.head_node_id: str = info["head"]
        self.nodes: dict[str, str] = info["nodes"]  # name -> node id

    def _read(self, timeout: float) -> dict[str, Any]:
        result: dict[str, Any] = {}

        def reader() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                if line.startswith("@@"):
                    result.update(json.loads(line[2:]))
                    return

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        t.join(timeout)
        if "ok" not in result:
            raise RuntimeError(f"cluster helper gave no answer in {timeout}s; its log:\n{self.log_tail()}")
        if not result["ok"]:
            raise RuntimeError(f"cluster helper: {result.get('error')}")
        return result

    def call(self, cmd: str, timeout: float = 90, **args: Any) -> dict[str, Any]:
        with self._lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
            self.proc.stdin.flush()
            return self._read(timeout)

    def actors(self, class_contains: str = "") -> list[dict[str, Any]]:
        """Every actor seen so far: id, class, state, pid, restarts, job, nodes (where it was alive)."""
        return [a for a in self.call("actors")["actors"] if class_contains in a["class"]]

    def remove(self, name: str) -> None:
        """Kill every process of node ``name`` at once (no draining): a lost machine."""
        self.call("remove", node=name)
        self.nodes.pop(name)

    def add(self, name: str, **node_args: Any) -> str:
        node_id = self.call("add", node=name, args=node_args)["node_id"]
        self.nodes[name] = node_id
        return node_id

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def shutdown(self) -> None:
        try:
            if self.proc.poll() is None:
                self.call("quit", timeout=60)
                self.proc.wait(30)
        except Exception:
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            kill_cluster_processes(self.tmp_root)
            self._log.close()
            shutil.rmtree(self.tmp_root, ignore_errors=True)


def _serve(spec_path: str) -> None:
    """Child process of SimCluster: build the cluster, answer commands from stdin with ``@@{json}``."""
    from ray.cluster_utils import Cluster

    def reply(**obj: Any) -> None:
        sys.stdout.write("@@" + json.dumps({"ok": True, **obj}) + "\n")
        sys.stdout.flush()

    with open(spec_path) as f:
        spec = json.load(f)
    common = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args={**common, "include_dashboard": False, **spec.get("head", {})})
    nodes = {}
    for name, args in spec.get("nodes", {}).items():
        nodes[name] = cluster.add_node(**common, **args)
    cluster.wait_for_nodes()

    seen: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def sample() -> None:
        with lock:
            try:
                table = cluster.global_state.actor_table(None)
            except Exception:  # GCS busy or gone: next tick
                return
            for aid, a in table.items():
                node = a["Address"]["NodeID"]
                old = seen.get(aid, {})
                # the table keeps the node of a DEAD or RESTARTING actor too: record it whatever the state,
                # so an actor that lived between two samples (a busy machine) still says where it ran
                # ... but not while it waits to be placed: a pending actor's address names the raylet that
                # holds its lease request (then spills it back) or the nil id (f...f), not where it runs
                placed = a["State"] not in ("DEPENDENCIES_UNREADY", "PENDING_CREATION")
                alive_on = {node} if placed and node and node.strip("0") and node.strip("f") else set()
                seen[aid] = {"id": aid, "class": a["ActorClassName"], "state": a["State"], "pid": a["Pid"],
                             "restarts": a["NumRestarts"], "job": a["JobID"],
                             "nodes": sorted(set(old.get("nodes", [])) | alive_on)}

    def watch() -> None:
        while not stop.wait(0.2):
            sample()

    threading.Thread(target=watch, daemon=True).start()
    reply(address=cluster.address, head=cluster.head_node.node_id, nodes={k: n.node_id for k, n in nodes.items()})
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            req = json.loads(line)
            try:
                if req["cmd"] == "quit":
                    break
                if req["cmd"] == "actors":
                    sample()
                    with lock:
                        reply(actors=list(seen.values()))
                elif req["cmd"] == "remove":
                    cluster.remove_node(nodes.pop(req["node"]), allow_graceful=False)
                    reply()
                elif req["cmd"] == "add":
                    node = cluster.add_node(**common, **req["args"])
                    nodes[req["node"]] = node
                    reply(node_id=node.node_id)
                else:
                    raise ValueError(f"unknown command {req['cmd']!r}")
            except Exception as e:  # answer and keep serving
                sys.stdout.write("@@" + json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}) + "\n")
                sys.stdout.flush()
    finally:
        stop.set()
        cluster.shutdown()
        try:
            reply(bye=True)
        except BrokenPipeError:
            pass


# ====================================================================== jobs as driver processes
def run_job(env: dict[str, str], job: str, *args: str, log_path: Optional[str] = None, timeout: float = 300,
            wait: bool = True):
    """``python -m ray_jobs.<job> ARGS`` as its own driver process; stdout+stderr go to ``log_path``.

    Returns the finished CompletedProcess-like Popen (``wait``) or the running Popen.
    """
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix=f"dcq-{job}-", suffix=".log")
        os.close(fd)
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", f"ray_jobs.{job}", *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    proc.log_path = log_path  # type: ignore[attr-defined]
    proc._log_file = log  # type: ignore[attr-defined]
    if wait:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{job} did not finish in {timeout}s; log tail:\n{job_log(proc)[-4000:]}")
        finally:
            log.close()
    return proc


def job_log(proc) -> str:
    with open(proc.log_path, errors="replace") as f:
        return f.read()


def rows_of(out: str) -> tuple[list[dict], list[dict]]:
    from pipeline import storage, tables

    good = tables.read_rows(storage.join(out, "data")) if storage.exists(storage.join(out, "data")) else []
    bad = tables.read_rows(storage.join(out, "quarantine")) if storage.exists(storage.join(out, "quarantine")) else []
    return good, bad


def assert_exactly_once(out: str, expected: set[tuple[str, int]]) -> list[dict]:
    """Every (question id, sample index) of ``expected`` once in data + quarantine, nothing else."""
    good, bad = rows_of(out)
    keys = [(r["id"], int(r["sample_index"])) for r in good + bad]
    dupes = {k for k in keys if keys.count(k) > 1}
    assert not dupes, f"duplicated (id, sample) pairs: {sorted(dupes)[:5]}"
    assert set(keys) == expected, f"missing {sorted(expected - set(keys))[:5]}, unexpected {sorted(set(keys) - expected)[:5]}"
    return good


def expected_pairs(prepared: str, limit: int, n: int, datasets=("gsm8k",), splits=("train",)) -> set[tuple[str, int]]:
    from pipeline import tables

    ids = [r["id"] for r in tables.iter_rows(prepared, columns=["id", "dataset", "split"])
           if r["dataset"] in datasets and r["split"] in splits][:limit]
    assert len(ids) == limit
    return {(i, k) for i in ids for k in range(n)}


def committed(out: str) -> dict[str, bytes]:
    """Commit markers of a sharded job output: ``{shard file name: content}``."""
    from pipeline import storage

    return {p.rsplit("/", 1)[-1]: storage.read_bytes(p) for p in storage.list_files(storage.join(out, "_done"), ".json")}


def wait_for(cond, timeout: float, what: str, poll: float = 0.1) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def decomposition_responder(messages, body) -> str:
    return "1. What is the first quantity?\n2. What is the second quantity?\n3. What is the result?"


def openai_teacher(base_url: str, **extra: Any) -> str:
    """A ``teacher=...`` override for an OpenAI-compatible endpoint (no key unless api_key_env given)."""
    fields = {"type": "openai", "model": "stub-model", "base_url": base_url, "api_key_env": None, **extra}
    return "teacher=" + json.dumps(fields)


if __name__ == "__main__" and len(sys.argv) >= 3:
    if sys.argv[1] == "serve":
        _serve(sys.argv[2])


def kill_after_shards(args: list[str], out: str, srv: Any, shards: int) -> None:
    """Run the job ``args`` (a ``python -m ray_jobs.<job>`` command line) and kill it at a known point: when
    ``shards`` shards of ``out`` are committed and the next shard's requests are held by ``srv`` (an OpenAI stub
    server whose ``hold_after_requests`` the caller set to that many shards' requests). Then wait until the
    killed job's actor has gone (its held requests end when its connections close). Nothing is timed."""
    n_done = lambda: len(committed(out))  # noqa: E731
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (n_done() >= shards and srv.counters()["held"] > 0) or proc.poll() is not None, 180,
                 f"{shards} committed shards and the next shard's requests held")
        assert proc.poll() is None, f"the job ended (rc {proc.returncode}) before the kill"
    finally:
        proc.kill()
        proc.wait()
    wait_for(lambda: srv.counters()["held"] == 0, 120, "the killed job's actor to go away")
