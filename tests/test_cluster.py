"""Running on a cluster: cluster.yaml passes Ray's own autoscaler validation and carries the custom
resources the documented job commands ask for; jobs go through the real `ray job submit` onto a
`ray start --head` (dashboard job server) and survive `ray job stop` + resubmit exactly once; on a
simulated multi-node cluster generation actors land on the `teacher` nodes and Ray Train workers
on the `trainer` node.

Every cluster here lives outside this pytest process, so the session's in-process Ray
(conftest.py ``ray_session``) is never touched: a `ray start --head` with its own temp dir, or a
``ray.cluster_utils.Cluster`` served by a child process (``python -m tests.test_cluster serve
SPEC``, driven over stdin/stdout by :class:`SimCluster`). Jobs run as their own driver processes.
Each cluster gets a private ``RAY_TMPDIR`` (its address file and logs never meet other Ray
instances on the machine) and its own auth token. Teardown stops exactly those processes, by
pid: `ray stop` has no per-cluster scope and would stop every Ray on the machine.

The helpers (SimCluster, run_job, exactly-once checks) are shared with test_faults.py and
test_security.py.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Optional

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)
RAY_CLI = os.path.join(VENV_BIN, "ray")
CLUSTER_YAML = os.path.join(REPO, "cluster.yaml")
RUNTIME_ENV_YAML = os.path.join(REPO, "configs", "runtime_env.yaml")
CLUSTER_DOC = os.path.join(REPO, "docs", "cluster.md")
GENERATE_YAML = os.path.join(REPO, "configs", "generate.yaml")
JOBS = ("prepare", "generate", "solve", "select", "train", "serve", "infer", "evaluate")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.test_cluster", "serve", spec_path], cwd=REPO,
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
                alive_on = {node} if a["State"] == "ALIVE" and node.strip("0") else set()
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


# ====================================================================== cluster.yaml
def _load_cluster_yaml() -> dict[str, Any]:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def _validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does to a config before it touches the cloud: defaults merged, setup commands
    merged, per-type min/max filled in, then the autoscaler's JSON-schema and consistency checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_autoscaler_validation():
    prepared = _validate(_load_cluster_yaml())
    types = prepared["available_node_types"]
    assert prepared["provider"]["type"] == "aws"
    assert set(types) >= {"head", "gpu_generation", "gpu_training", "gpu_serving"}
    head = types[prepared["head_node_type"]]
    assert head["max_workers"] == 0 and head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    assert prepared["idle_timeout_minutes"] > 0
    for name, t in types.items():
        if name == prepared["head_node_type"]:
            continue
        assert 0 <= t["min_workers"] <= t["max_workers"] <= prepared["max_workers"], name
        assert t["min_workers"] == 0, f"{name}: GPU/CPU workers scale from zero"
    gen, train, serving = types["gpu_generation"]["resources"], types["gpu_training"]["resources"], types["gpu_serving"]["resources"]
    assert gen["GPU"] >= 1 and gen["teacher"] == gen["GPU"], "one teacher slot per generation GPU"
    assert train["GPU"] > 1 and train["trainer"] == train["GPU"], "a multi-GPU trainer: one trainer slot per GPU"
    assert serving["GPU"] >= 1 and serving["serving"] >= 1
    # S3 through an instance profile on every node; IMDSv2 only; no credentials in the file.
    for name, t in types.items():
        assert t["node_config"].get("IamInstanceProfile"), f"{name}: no instance profile for S3"
        assert t["node_config"].get("MetadataOptions", {}).get("HttpTokens") == "required", name
    text = open(CLUSTER_YAML).read() + open(RUNTIME_ENV_YAML).read()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|sk-[A-Za-z0-9]{20,}", text), "credentials in a config file"


def test_cluster_yaml_installs_the_project_from_the_working_dir():
    cfg = _load_cluster_yaml()
    prepared = _validate(cfg)
    mounts = prepared["file_mounts"]
    assert any(os.path.normpath(os.path.join(REPO, src)) == REPO for src in mounts.values()), "the repo is not mounted"
    assert {".venv", ".git", "runs"} <= set(prepared["rsync_exclude"])
    head_cmds = " && ".join(prepared["head_setup_commands"])
    assert "scripts/setup.sh" in head_cmds, "the CPU head installs with the project's CPU lock"
    for name in ("gpu_generation", "gpu_training", "gpu_serving"):
        cmds = " && ".join(prepared["available_node_types"][name]["worker_setup_commands"])
        assert "pip install" in cmds and "-e '.[gpu]'" in cmds, f"{name} does not install the project"
        assert "-c constraints/cpu.txt" not in cmds and "setup.sh" not in cmds, f"{name} must not use the CPU lock"
        assert "ray==" in cmds, f"{name}: Ray must be pinned to the head's version"
    for cmds in (prepared["head_start_ray_commands"], prepared["worker_start_ray_commands"]):
        start = [c for c in cmds if "ray start" in c]
        assert start, cmds
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "--dashboard-host=0.0.0.0" not in head_start, "the job server (remote code execution) stays on the head's loopback"
    # ray's own start-up pins match the version the lock installs
    import ray

    assert f"ray=={ray.__version__}" in open(os.path.join(REPO, "constraints", "cpu.txt")).read().split()


@pytest.mark.parametrize("breakage", ["unknown_key", "fractional_resource", "missing_node_config", "bad_head_type",
                                      "min_over_max"])
def test_cluster_yaml_validation_catches_breakage(breakage):
    """The validation above is real: the same functions reject broken variants of cluster.yaml."""
    cfg = _load_cluster_yaml()
    types = cfg["available_node_types"]
    if breakage == "unknown_key":
        types["gpu_generation"]["resourcez"] = {"teacher": 1}
    elif breakage == "fractional_resource":
        types["gpu_generation"]["resources"]["teacher"] = 0.5
    elif breakage == "missing_node_config":
        del types["gpu_training"]["node_config"]
    elif breakage == "bad_head_type":
        cfg["head_node_type"] = "no_such_type"
    elif breakage == "min_over_max":
        types["gpu_generation"]["min_workers"] = cfg["max_workers"] + 1
    with pytest.raises(Exception):
        _validate(cfg)


def test_node_configs_are_ec2_run_instances_parameters():
    """``node_config`` goes to EC2 RunInstances as is: every key (nested too) must be one of its parameters."""
    import botocore.session

    op = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances")

    def check(value: Any, shape, where: str) -> None:
        if shape.type_name == "structure":
            assert isinstance(value, dict), where
            for k, v in value.items():
                assert k in shape.members, f"{where}.{k} is not a RunInstances parameter"
                check(v, shape.members[k], f"{where}.{k}")
        elif shape.type_name == "list":
            assert isinstance(value, list), where
            for i, v in enumerate(value):
                check(v, shape.member, f"{where}[{i}]")
        elif shape.type_name == "integer":
            assert isinstance(value, int), where
        elif shape.type_name == "string":
            assert isinstance(value, str), where
            if shape.enum:
                assert value in shape.enum, f"{where}={value!r} not in {shape.enum[:8]}..."

    for name, t in _load_cluster_yaml()["available_node_types"].items():
        check(t["node_config"], op.input_shape, name)


def documented_job_commands() -> list[tuple[str, list[str]]]:
    """``(job, argv)`` of every `python -m ray_jobs.<job> ...` command in docs/cluster.md's bash blocks."""
    text = open(CLUSTER_DOC).read()
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        for cmd in re.sub(r"\\\n\s*", " ", block).splitlines():
            cmd = cmd.split(" #", 1)[0].strip()
            if "ray_jobs." not in cmd or cmd.startswith("#"):
                continue
            argv = shlex.split(cmd)
            i = argv.index("-m")
            job = argv[i + 1].split(".", 1)[1]
            commands.append((job, argv[i + 2:]))
    return commands


def _config_model(job: str):
    import importlib

    return getattr(importlib.import_module(f"ray_jobs.{job}"), f"{job.capitalize()}Config")


def _custom_resource_requests(job: str, cfg) -> list[tuple[dict[str, float], float, str]]:
    """``(custom resources, GPUs, where)`` each actor / worker / replica of a job config asks for."""
    out = []
    if hasattr(cfg, "pool"):
        out.append((dict(cfg.pool.resources), cfg.pool.num_gpus, f"{job}.pool"))
    if job == "train":
        out.append((dict(cfg.scaling.resources_per_worker), 1.0 if cfg.scaling.use_gpu else 0.0, "train.scaling"))
    if job == "serve":
        for part in ("decomposer", "solver", "ingress"):
            opts = getattr(cfg, part).ray_actor_options
            out.append((dict(opts.resources), opts.num_gpus, f"serve.{part}"))
    return out


def test_documented_job_commands_are_valid_and_fit_the_node_types():
    """Each `ray job submit ... -- python -m ray_jobs.<job> --config ... overrides` in docs/cluster.md is a
    valid config of that job, and every custom resource it (or a shipped config) asks for exists on a
    node type of cluster.yaml that also has the GPUs it asks for along with it."""
    from pipeline.config import load_config

    types = _load_cluster_yaml()["available_node_types"]
    commands = documented_job_commands()
    assert {job for job, _ in commands} >= {"prepare", "generate", "solve", "select", "train", "infer", "evaluate"}
    requests = []
    for job, argv in commands:
        assert argv[0] == "--config", (job, argv)
        path, overrides = os.path.join(REPO, argv[1]), argv[2:]
        cfg = load_config(_config_model(job), path, overrides)  # raises ConfigError naming the key
        if job in ("generate", "solve", "infer", "select", "evaluate", "prepare", "train"):
            outs = [v for k, v in (o.split("=", 1) for o in overrides) if k in ("output.dir", "output.checkpoint_dir")]
            assert outs and all(v.startswith("s3://") for v in outs), f"{job}: outputs on a cluster go to s3://, got {outs}"
        requests += _custom_resource_requests(job, cfg)
    for job in JOBS:
        shipped = os.path.join(REPO, "configs", f"{job}.yaml")
        if os.path.exists(shipped):
            requests += _custom_resource_requests(job, load_config(_config_model(job), shipped))
    asked = {name for res, _, _ in requests for name in res}
    assert {"teacher", "trainer", "serving"} <= asked, f"the docs never use the node types' resources: {asked}"
    for res, gpus, where in requests:
        for name, amount in res.items():
            carriers = {t: v["resources"] for t, v in types.items() if v["resources"].get(name, 0) >= amount}
            assert carriers, f"{where} asks for {{{name}: {amount}}}, which no node type of cluster.yaml has"
            assert any(r.get("GPU", 0) >= gpus * (r[name] // amount) for r in carriers.values()), \
                f"{where}: {gpus} GPU per {{{name}: {amount}}} does not fit {carriers}"


# ====================================================================== ray job submit onto a real head
@pytest.fixture(scope="module")
def ray_head(s3_server):
    """`ray start --head` on 127.0.0.1 with the dashboard (its job server), 2 CPUs, a private temp dir;
    its processes get the S3 settings in their environment, as nodes get an instance profile."""
    root = tempfile.mkdtemp(prefix="dcq-head-", dir="/tmp")
    env = cluster_env(root)
    dash = free_port()
    cmd = [RAY_CLI, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--include-dashboard=true",
           f"--temp-dir={root}/ray", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", "--disable-usage-stats"]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            if "dashboard" in (r.stdout + r.stderr).lower() and "module" in (r.stdout + r.stderr).lower():
                pytest.skip(f"the Ray dashboard (job server) cannot start here: {r.stderr[-500:]}")
            raise AssertionError(f"ray start failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        from ray.job_submission import JobSubmissionClient

        address = f"http://127.0.0.1:{dash}"
        client = JobSubmissionClient(address, headers=auth_headers(env))
        yield {"address": address, "env": env, "root": root, "client": client}
    finally:
        kill_cluster_processes(root)
        shutil.rmtree(root, ignore_errors=True)


def submit(head: dict, submission_id: str, job: str, *args: str) -> None:
    """The documented command: ray job submit --working-dir . --runtime-env configs/runtime_env.yaml -- python -m ..."""
    cmd = [RAY_CLI, "job", "submit", "--address", head["address"], "--submission-id", submission_id, "--no-wait",
           "--working-dir", ".", "--runtime-env", os.path.relpath(RUNTIME_ENV_YAML, REPO), "--",
           "python", "-m", f"ray_jobs.{job}", *args]
    r = subprocess.run(cmd, cwd=REPO, env=head["env"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"ray job submit failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"


def wait_job(head: dict, submission_id: str, timeout: float = 240) -> str:
    client = head["client"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(submission_id)
        if status.is_terminal():
            return str(status.value if hasattr(status, "value") else status)
        time.sleep(0.5)
    raise AssertionError(f"job {submission_id} not finished in {timeout}s; logs:\n{client.get_job_logs(submission_id)[-3000:]}")


@pytest.mark.slow
def test_prepare_then_generate_via_ray_job_submit(ray_head, s3_bucket):
    from pipeline.manifest import read_manifest

    prep, gen = f"{s3_bucket}/prepare", f"{s3_bucket}/generate"
    submit(ray_head, "prepare-1", "prepare", "--config", "configs/prepare.yaml", f"output.dir={prep}")
    assert wait_job(ray_head, "prepare-1") == "SUCCEEDED", ray_head["client"].get_job_logs("prepare-1")[-3000:]
    submit(ray_head, "generate-1", "generate", "--config", "configs/generate.yaml", f"input.path={prep}",
           f"output.dir={gen}", "input.limit=20", "output.shard_size=8", "sampling.n=2")
    status = wait_job(ray_head, "generate-1")
    logs = ray_head["client"].get_job_logs("generate-1")
    assert status == "SUCCEEDED", logs[-3000:]
    assert "generate done" in logs
    assert_exactly_once(gen, expected_pairs(prep, 20, 2))
    m = read_manifest(gen)
    assert m["counts"]["rows_in"] == 40 and m["counts"]["shards_committed"] == 5
    assert read_manifest(prep)["counts"]["rows_out"] > 0
    info = ray_head["client"].get_job_info("generate-1")
    assert info.runtime_env["working_dir"].startswith("gcs://"), "the job ran from the uploaded working dir"


@pytest.mark.slow
def test_ray_job_stop_midway_then_resubmit_is_exactly_once(ray_head, prepared_samples, tmp_path):
    from tests.servers.openai_stub import OpenAIStubServer

    out = str(tmp_path / "gen")
    n_q = 80
    with OpenAIStubServer(latency_s=0.3, responder=decomposition_responder) as srv:
        args = ["--config", "configs/generate.yaml", f"input.path={prepared_samples}", f"output.dir={out}",
                f"input.limit={n_q}", "output.shard_size=4", "sampling.n=1",
                "pool={min_actors: 1, max_actors: 2, num_cpus: 0.5}", openai_teacher(srv.base_url, concurrency=1)]
        submit(ray_head, "slow-1", "generate", *args)
        wait_for(lambda: len(committed(out)) >= 2, 180, "two committed shards")
        r = subprocess.run([RAY_CLI, "job", "stop", "--address", ray_head["address"], "slow-1"], env=ray_head["env"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert wait_job(ray_head, "slow-1", 60) == "STOPPED"
        time.sleep(1.0)  # the stopped job's actors are torn down with it
        before = committed(out)
        assert 2 <= len(before) < n_q // 4, f"the stop came too late to test a resume ({len(before)} shards)"
        srv.reset_counters()
        submit(ray_head, "slow-2", "generate", *args)
        assert wait_job(ray_head, "slow-2") == "SUCCEEDED", ray_head["client"].get_job_logs("slow-2")[-3000:]
        resumed_requests = srv.counters()["requests"]
    assert_exactly_once(out, expected_pairs(prepared_samples, n_q, 1))
    after = committed(out)
    assert len(after) == n_q // 4
    assert all(after[k] == v for k, v in before.items()), "a shard committed before the stop was redone"
    assert resumed_requests <= n_q - 4 * len(before), "the resubmitted job redid committed work"
    assert "resuming" in ray_head["client"].get_job_logs("slow-2")


# ====================================================================== placement on a simulated multi-node cluster
PLACEMENT_SPEC = {
    "head": {"num_cpus": 1},
    "nodes": {
        "A": {"num_cpus": 2, "resources": {"teacher": 1}},
        "B": {"num_cpus": 2, "resources": {"teacher": 1}},
        "C": {"num_cpus": 2, "resources": {"trainer": 2}},
    },
}


@pytest.fixture(scope="module")
def sim_cluster():
    cluster = SimCluster(PLACEMENT_SPEC)
    yield cluster
    cluster.shutdown()


@pytest.mark.slow
def test_generation_actors_run_on_the_teacher_nodes(sim_cluster, prepared_samples, tmp_path):
    from tests.servers.openai_stub import OpenAIStubServer

    out = str(tmp_path / "gen")
    with OpenAIStubServer(latency_s=0.1, responder=decomposition_responder) as srv:
        proc = run_job(sim_cluster.env, "generate", "--config", GENERATE_YAML, f"ray.address={sim_cluster.address}",
                       f"input.path={prepared_samples}", f"output.dir={out}", "input.limit=24", "output.shard_size=3",
                       "sampling.n=1", "pool={min_actors: 2, max_actors: 2, num_cpus: 0.5, resources: {teacher: 1}}",
                       openai_teacher(srv.base_url, concurrency=2), log_path=str(tmp_path / "generate.log"), timeout=240)
        assert proc.returncode == 0, job_log(proc)[-4000:]
    assert_exactly_once(out, expected_pairs(prepared_samples, 24, 1))
    workers = sim_cluster.actors("DecomposeWorker")
    assert len(workers) == 2, workers
    teacher_nodes = {sim_cluster.nodes["A"], sim_cluster.nodes["B"]}
    where = [set(a["nodes"]) for a in workers]
    assert all(w and w <= teacher_nodes for w in where), f"a generation actor ran off the teacher nodes: {where}"
    assert set().union(*where) == teacher_nodes, "the two actors did not spread over both teacher nodes"


def _train_probe(out_dir: str) -> None:
    """Child process: a Ray Train TorchTrainer scaled exactly as ray_jobs/train.py scales it (from
    configs/train.yaml + overrides); every worker joins a gloo all-reduce and records its node."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.config import load_config
    from training.config import TrainConfig

    cfg = load_config(TrainConfig, os.path.join(REPO, "configs", "train.yaml"),
                      ["scaling.num_workers=2", "scaling.resources_per_worker={trainer: 1}"])
    ray.init(address=os.environ["RAY_ADDRESS"])

    def loop(config: dict) -> None:
        import torch
        import torch.distributed as dist

        ctx = ray.train.get_context()
        t = torch.ones(1)
        dist.all_reduce(t)
        with open(os.path.join(config["out"], f"rank{ctx.get_world_rank()}.json"), "w") as f:
            json.dump({"node": ray.get_runtime_context().get_node_id(), "world": ctx.get_world_size(), "sum": t.item()}, f)

    TorchTrainer(
        loop,
        train_loop_config={"out": out_dir},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name="placement-probe", storage_path=out_dir),
    ).fit()


@pytest.mark.slow
def test_training_workers_run_on_the_trainer_node(sim_cluster, tmp_path):
    out = str(tmp_path)
    env = dict(sim_cluster.env, RAY_ADDRESS=sim_cluster.address)
    r = subprocess.run([sys.executable, "-m", "tests.test_cluster", "train-probe", out], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    ranks = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "rank*.json")))]
    assert len(ranks) == 2 and all(x["world"] == 2 and x["sum"] == 2.0 for x in ranks), ranks
    assert {x["node"] for x in ranks} == {sim_cluster.nodes["C"]}, "a training worker ran off the trainer node"
    workers = sim_cluster.actors("RayTrainWorker")
    assert workers and all(set(a["nodes"]) <= {sim_cluster.nodes["C"]} for a in workers), workers


if __name__ == "__main__" and len(sys.argv) >= 3:
    if sys.argv[1] == "serve":
        _serve(sys.argv[2])
    elif sys.argv[1] == "train-probe":
        _train_probe(sys.argv[2])
