"""Security properties: API keys come only from the environment and are never written anywhere; no
unsafe deserialization (pickle / torch.load without weights_only / unsafe YAML) in the code;
exported weights are safetensors.

Serve's bearer-token enforcement and request bounds are tested in tests/test_serve.py.
"""

from __future__ import annotations

import ast
import os
import uuid

import pytest

from tests.servers.openai_stub import OpenAIStubServer
from tests.cluster_harness import (
    GENERATE_YAML,
    REPO,
    SimCluster,
    assert_exactly_once,
    decomposition_responder,
    expected_pairs,
    job_log,
    openai_teacher,
    rows_of,
    run_job,
)

KEY_VAR = "DIVCONQ_TEST_SECRET_KEY"
CODE_DIRS = ("pipeline", "training", "ray_jobs")


# ====================================================================== API keys
@pytest.fixture(scope="module")
def sec_cluster():
    """A one-node cluster of its own, so every Ray log of these jobs is under its temp dir."""
    cluster = SimCluster({"head": {"num_cpus": 2}})
    yield cluster
    cluster.shutdown()


def _files(root: str):
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                yield path


def _responder(messages, body) -> str:
    """Decompositions for the decomposer prompt, answers for the solver prompt."""
    if "subquestions:" in str(messages[-1].get("content", "")).lower():
        return "A1: 3\nA2: 4\nA3: 7\nThe answer is: 7"
    return decomposition_responder(messages, body)


@pytest.mark.slow
def test_api_key_only_from_the_environment_and_never_written(sec_cluster, prepared_samples, tmp_path):
    """generate then solve against an endpoint that requires a key, the key set only in the job driver's
    environment under the name the config gives (api_key_env). Every output, request shard, commit
    marker, manifest, response-cache entry, the jobs' stdout/stderr and every file of the Ray session
    (driver, worker, raylet, GCS, runtime-env agent logs) is free of the key.

    Product gap: ``run_shards(secret_env=...)`` puts the key into the actors' ``runtime_env``
    (``{"env_vars": {NAME: key}}``); Ray's runtime-env agent logs every runtime env it creates
    ("Creating runtime env: {...}") and the dashboard shows it with the actor/task. Fix,
    pipeline/sharded.py: hand the values to the actors as a constructor argument instead (Ray keeps
    those in the object store and never logs them), and set them in the actor's own environment
    before the worker builds its backend; drop ``_secret_runtime_env``.
    """
    key = f"sk-divconq-{uuid.uuid4().hex}"
    gen, sol, cache = str(tmp_path / "generate"), str(tmp_path / "solve"), str(tmp_path / "cache")
    env = dict(sec_cluster.env, **{KEY_VAR: key})
    with OpenAIStubServer(required_api_key=key, responder=_responder) as srv:
        common = [f"ray.address={sec_cluster.address}", "pool={min_actors: 1, max_actors: 2, num_cpus: 0.5}",
                  f"cache_dir={cache}"]
        g = run_job(env, "generate", "--config", GENERATE_YAML, *common, f"input.path={prepared_samples}",
                    f"output.dir={gen}", "input.limit=8", "sampling.n=2", "output.shard_size=4",
                    openai_teacher(srv.base_url, api_key_env=KEY_VAR, concurrency=2), log_path=str(tmp_path / "generate.log"))
        assert g.returncode == 0, job_log(g)[-3000:]
        s = run_job(env, "solve", "--config", os.path.join(REPO, "configs", "solve.yaml"), *common, f"input.path={gen}",
                    f"output.dir={sol}", "output.shard_size=4",
                    "solver=" + openai_teacher(srv.base_url, api_key_env=KEY_VAR, concurrency=2).split("=", 1)[1],
                    log_path=str(tmp_path / "solve.log"))
        assert s.returncode == 0, job_log(s)[-3000:]
        counts = srv.counters()
        auth = set(srv.auth_headers)
        bodies = repr(srv.requests)
    # the key was really used, and only as the bearer token
    assert counts["by_status"].get(200, 0) >= 32 and set(counts["by_status"]) == {200}, counts
    assert auth == {f"Bearer {key}"}
    assert key not in bodies
    good = assert_exactly_once(gen, expected_pairs(prepared_samples, 8, 2))
    solved, _ = rows_of(sol)
    assert len(solved) == len(good) == 16

    from pipeline.manifest import read_manifest

    for out in (gen, sol):
        assert KEY_VAR in str(read_manifest(out)["config"]), "the manifest records the variable's name"
    needle = key.encode()
    scanned, leaks = [], []
    token_file = os.path.join(sec_cluster.tmp_root, "auth_token")
    for root in (str(tmp_path), sec_cluster.tmp_root):
        for path in _files(root):
            if path == token_file:
                continue
            with open(path, "rb") as f:
                data = f.read()
            at = data.find(needle)
            if at >= 0:  # name the file and show where (the key itself redacted)
                context = data[max(0, at - 200): at + len(needle) + 40].replace(needle, b"<KEY>")
                leaks.append(f"{os.path.relpath(path, root)}: ...{context.decode(errors='replace')}...")
            scanned.append(path)
    names = " ".join(os.path.basename(p) for p in scanned)
    # the scan saw what it must: outputs, cache, job logs, and the Ray session's logs of every kind
    for must in ("manifest.json", "generate.log", "solve.log", "gcs_server", "raylet", "runtime_env_agent",
                 "python-core-driver", "python-core-worker", "worker-"):
        assert must in names, f"nothing like {must!r} was scanned"
    assert any(os.sep + "cache" + os.sep in p for p in scanned), "no response cache entry was scanned"
    assert not leaks, "the API key was written to:\n" + "\n".join(leaks)


# ====================================================================== unsafe deserialization
UNSAFE_YAML_LOADERS = {"Loader", "FullLoader", "UnsafeLoader", "CLoader", "CFullLoader", "CUnsafeLoader"}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Deserialization that can run code: pickle/cloudpickle/dill/marshal loads, torch.load without
    weights_only=True, yaml.load/load_all without a safe loader, yaml.unsafe_load/full_load, unsafe
    loader classes, eval/exec, and subprocess with shell=True."""
    found = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in UNSAFE_YAML_LOADERS and _dotted(node.value) == "yaml":
            found.append(f"{filename}:{node.lineno}: yaml.{node.attr}")
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "cloudpickle", "dill", "marshal", "yaml"):
            for alias in node.names:
                if alias.name in ("load", "loads", "unsafe_load", "full_load", "unsafe_load_all", "full_load_all",
                                  *UNSAFE_YAML_LOADERS):
                    found.append(f"{filename}:{node.lineno}: from {node.module} import {alias.name}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        where = f"{filename}:{node.lineno}: {name}"
        if name in ("eval", "exec"):
            found.append(where)
        elif name.split(".")[0] in ("pickle", "cloudpickle", "dill", "marshal", "_pickle") and name.split(".")[-1] in ("load", "loads"):
            found.append(where)
        elif name.split(".")[-1] == "Unpickler":
            found.append(where)
        elif name in ("torch.load",):
            wo = kw.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append(where + " without weights_only=True")
        elif name in ("yaml.load", "yaml.load_all"):
            loader = kw.get("Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader) not in ("yaml.SafeLoader", "yaml.CSafeLoader", "SafeLoader", "CSafeLoader"):
                found.append(where + " without SafeLoader")
        elif name in ("yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"):
            found.append(where)
        elif name.startswith("subprocess.") and isinstance(kw.get("shell"), ast.Constant) and kw["shell"].value is True:
            found.append(where + " with shell=True")
    return found


def test_the_checker_catches_unsafe_calls():
    bad = """
import pickle, torch, yaml, subprocess
from pickle import loads
pickle.load(open('x', 'rb'))
torch.load('m.pt')
torch.load('m.pt', weights_only=False)
yaml.load(text)
yaml.load(text, Loader=yaml.FullLoader)
yaml.unsafe_load(text)
yaml.full_load(text)
subprocess.run(cmd, shell=True)
eval('1')
"""
    flagged = {int(f.split(":")[1]) for f in unsafe_calls(bad)}
    assert flagged == set(range(3, 13)), unsafe_calls(bad)  # every line after the imports
    good = """
import torch, yaml, json
torch.load('m.pt', weights_only=True)
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
json.loads('{}')
model.eval()
"""
    assert unsafe_calls(good) == []


def test_no_unsafe_deserialization_in_the_code():
    found = []
    for d in CODE_DIRS:
        for path in _files(os.path.join(REPO, d)):
            if path.endswith(".py"):
                with open(path) as f:
                    found += unsafe_calls(f.read(), os.path.relpath(path, REPO))
    assert not found, "unsafe deserialization / code execution:\n" + "\n".join(found)


def test_configs_do_not_trust_remote_code():
    import yaml

    from pipeline.backends import HFBackendConfig
    from training.config import TrainModelConfig

    assert HFBackendConfig(model="m").trust_remote_code is False
    assert TrainModelConfig(build_tiny=True).trust_remote_code is False
    for path in _files(os.path.join(REPO, "configs")):
        if path.endswith((".yaml", ".yml")):
            with open(path) as f:
                assert "trust_remote_code: true" not in f.read().lower(), path
                f.seek(0)
                yaml.safe_load(f)  # every shipped config is plain, safe-loadable YAML


def test_exported_weights_are_safetensors(tiny_model_dir, tmp_path):
    """The export path of training (training.export.save_hf_model) and the tiny-model builder write
    safetensors only: loading them never unpickles."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.export import save_hf_model

    pickles = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
    assert any(n.endswith(".safetensors") for n in os.listdir(tiny_model_dir))
    assert not [n for n in os.listdir(tiny_model_dir) if n.endswith(pickles)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    out = str(tmp_path / "export")
    save_hf_model(model, model.state_dict(), AutoTokenizer.from_pretrained(tiny_model_dir), out)
    names = os.listdir(out)
    assert "model.safetensors" in names and not [n for n in names if n.endswith(pickles)], names
    weights = load_file(os.path.join(out, "model.safetensors"))
    assert set(weights) <= set(model.state_dict()) and weights
