"""Running on a cluster: cluster.yaml passes Ray's own autoscaler validation and carries the custom
resources the documented job commands ask for; jobs go through the real `ray job submit` onto a
`ray start --head` (dashboard job server) and survive `ray job stop` + resubmit exactly once; on a
simulated multi-node cluster generation actors land on the `teacher` nodes and Ray Train workers
on the `trainer` node. The clusters and helpers are in tests/cluster_harness.py.
"""
from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from typing import Any

import pytest
import yaml

from ray_jobs.cli import JOBS, config_model
from tests.servers import free_port
from tests.cluster_harness import (
    CLUSTER_DOC,
    CLUSTER_YAML,
    GENERATE_YAML,
    RAY_CLI,
    REPO,
    RUNTIME_ENV_YAML,
    SimCluster,
    assert_exactly_once,
    auth_headers,
    cluster_env,
    committed,
    decomposition_responder,
    expected_pairs,
    job_log,
    kill_cluster_processes,
    openai_teacher,
    run_job,
    wait_for,
)

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
    """``(job, argv)`` of every `python -m ray_jobs.<job> ...` command in the bash blocks of docs/cluster.md
    and of README.md's "Running on a cluster" section."""
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme.split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]
    text = open(CLUSTER_DOC).read() + "\n" + section
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
    """Each `ray job submit ... -- python -m ray_jobs.<job> --config ... overrides` in the cluster docs is a
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
        cfg = load_config(config_model(job), path, overrides)  # raises ConfigError naming the key
        if job in ("generate", "solve", "infer", "select", "evaluate", "prepare", "train"):
            outs = [v for k, v in (o.split("=", 1) for o in overrides) if k in ("output.dir", "output.checkpoint_dir")]
            assert outs and all(v.startswith("s3://") for v in outs), f"{job}: outputs on a cluster go to s3://, got {outs}"
        requests += _custom_resource_requests(job, cfg)
    for job in JOBS:
        shipped = os.path.join(REPO, "configs", f"{job}.yaml")
        if os.path.exists(shipped):
            requests += _custom_resource_requests(job, load_config(config_model(job), shipped))
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


def actors_of_job(head: dict, submission_id: str) -> list[dict]:
    """Every actor of a submitted job (any state), from the dashboard's state API (GET /api/v0/actors)."""
    import httpx

    job_id = head["client"].get_job_info(submission_id).job_id
    r = httpx.get(f"{head['address']}/api/v0/actors", params={"limit": 10000, "detail": "false"},
                  headers=auth_headers(head["env"]), timeout=60)
    r.raise_for_status()
    actors = r.json()["data"]["result"]["result"]
    return [a for a in actors if a.get("job_id") == job_id]


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
    """The teacher answers the first 8 requests (2 shards of 4, one actor, one request at a time) and holds
    every later one, so `ray job stop` lands at a known point: exactly 2 shards committed. Nothing is timed."""
    from tests.servers.openai_stub import OpenAIStubServer

    out = str(tmp_path / "gen")
    n_q = 80
    with OpenAIStubServer(latency_s=0.05, responder=decomposition_responder) as srv:
        srv.hold_after_requests, srv.hold_timeout_s = 8, 600
        args = ["--config", "configs/generate.yaml", f"input.path={prepared_samples}", f"output.dir={out}",
                f"input.limit={n_q}", "output.shard_size=4", "sampling.n=1",
                "pool={min_actors: 1, max_actors: 1, num_cpus: 0.5}", openai_teacher(srv.base_url, concurrency=1, timeout_s=600)]
        submit(ray_head, "slow-1", "generate", *args)
        wait_for(lambda: len(committed(out)) >= 2 and srv.counters()["held"] > 0, 180, "two committed shards, the third held")
        r = subprocess.run([RAY_CLI, "job", "stop", "--address", ray_head["address"], "slow-1"], env=ray_head["env"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert wait_job(ray_head, "slow-1", 60) == "STOPPED"
        # the stopped job's generation actors are torn down with it: until they are, one could still commit
        # a shard (Ray Data's own detached helper actors of the job live on; they write nothing of ours)
        workers = lambda: [a for a in actors_of_job(ray_head, "slow-1") if "DecomposeWorker" in a.get("class_name", "")]  # noqa: E731
        assert workers(), actors_of_job(ray_head, "slow-1")
        wait_for(lambda: all(a["state"] == "DEAD" for a in workers()), 90, "the stopped job's generation actors to exit")
        wait_for(lambda: srv.counters()["held"] == 0, 60, "the held requests' connections to close")
        before = committed(out)
        assert len(before) == 2, sorted(before)
        srv.hold_after_requests = None
        srv.reset_counters()
        submit(ray_head, "slow-2", "generate", *args)
        assert wait_job(ray_head, "slow-2") == "SUCCEEDED", ray_head["client"].get_job_logs("slow-2")[-3000:]
        resumed_requests = srv.counters()["requests"]
    assert_exactly_once(out, expected_pairs(prepared_samples, n_q, 1))
    after = committed(out)
    assert len(after) == n_q // 4
    assert all(after[k] == v for k, v in before.items()), "a shard committed before the stop was redone"
    assert resumed_requests == n_q - 4 * len(before), "the resubmitted job redid committed work (or sent a request twice)"
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


def _sft_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = 2 + i % 7, 3 + i % 5
        q = f"Ann has {a} pens and buys {b} more. How many pens does she have?"
        rows.append({"id": f"gsm8k:train:{i}", "question_id": f"q{i}", "dataset": "gsm8k", "variant": "decomposer_correct",
                     "messages": [{"role": "user", "content": q},
                                  {"role": "assistant", "content": f"1. How many pens did Ann buy?\n2. What is {a} plus {b}?"}]})
    return rows


@pytest.mark.slow
def test_training_workers_run_on_the_trainer_node(sim_cluster, tmp_path):
    """The real `train` job (Ray Train + DeepSpeed ZeRO-2, 2 gloo workers) asking for
    `resources_per_worker={trainer: 1}`: both workers run on the trainer node, and it exports."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "sft"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(_sft_rows(32)), str(data / "part-00000.parquet"))
    out = tmp_path / "train"
    proc = run_job(sim_cluster.env, "train", "--config", os.path.join(REPO, "configs", "train.yaml"),
                   f"ray.address={sim_cluster.address}", f"data.train_path={data}", "data.validation_path=null",
                   "data.max_length=96", "model.tiny={vocab_size: 300, hidden_size: 32, num_layers: 1, num_heads: 2, max_positions: 128}",
                   "deepspeed.micro_batch_size=4", "schedule.max_steps=4", "schedule.checkpoint_every_steps=2",
                   "scaling={num_workers: 2, cpus_per_worker: 1, resources_per_worker: {trainer: 1}}",
                   f"output.dir={out}/model", f"output.checkpoint_dir={out}/checkpoints", "output.run_name=placement",
                   log_path=str(tmp_path / "train.log"), timeout=300)
    assert proc.returncode == 0, job_log(proc)[-4000:]
    assert os.path.exists(out / "model" / "config.json"), "no exported model"
    workers = sim_cluster.actors("RayTrainWorker")
    assert len(workers) >= 2, workers
    where = [set(a["nodes"]) for a in workers]
    assert all(w and w <= {sim_cluster.nodes["C"]} for w in where), f"a training worker ran off the trainer node: {where}"
