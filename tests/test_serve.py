"""The Ray Serve app end to end: a real Serve HTTP proxy on 127.0.0.1 over the session's
local Ray, tiny random HF models as both decomposer and solver (their text is junk, so
these tests check shapes, types, token counts, batching, errors and auth, not answers)."""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import pytest

from tests.servers import free_port

SERVED = "tiny-decomposer"
SOLVER = "divconq-solver"  # the solver's default served name
TOKEN_ENV = "DIVCONQ_TEST_SERVE_TOKEN"
TOKEN = "tok-3f9c1e7a5b2d4c68"  # a test value; the point is that it never shows up anywhere


def _config(model_dir: str, port: int, decomposer: dict | None = None, **top):
    from pipeline.serving.app import load_serve_config

    deploy = dict(max_batch_size=8, batch_wait_timeout_s=0.25, max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.5},
                  **({} if top.get("colocate") else {"num_replicas": 1}))
    sections = {
        "http": {"host": "127.0.0.1", "port": port},
        "app_name": "divconq-test",
        "route_prefix": "/",
        "blocking": False,
        "decomposer": {"model": model_dir, "served_name": SERVED, "device": "cpu", "dtype": "float32",
                       "sampling": {"max_tokens": 12}, **deploy, **(decomposer or {})},
        "solver": {"backend": {"type": "hf", "model": model_dir, "device": "cpu", "dtype": "float32"},
                   "sampling": {"max_tokens": 12}, **deploy},
        "limits": {"max_question_chars": 500, "max_context_chars": 2000, "max_tokens": 64, "max_messages": 8,
                   "max_message_chars": 4000, "max_body_bytes": 16384},
        **top,
    }
    return load_serve_config(sections=sections)


@pytest.fixture(scope="module")
def served(ray_session, tiny_model_dir):
    from pipeline.serving import shutdown, start

    cfg = _config(tiny_model_dir, free_port())
    base = start(cfg)
    yield {"base": base, "cfg": cfg, "model_dir": tiny_model_dir}
    shutdown()


def _assert_error(r: httpx.Response, status: int, param: str | None = None, *, contains: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert {"message", "type", "param"} <= set(err)
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if contains is not None:
        assert contains in err["message"], err
    return err


# ---------------------------------------------------------------- config
def test_config_validation(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.serving.app import load_serve_config
    from pipeline.serving.config import ServeConfig

    cfg = load_serve_config("configs/serve.yaml")
    assert cfg.decomposer.model == "runs/train/export" and cfg.solver.backend.type == "hf"
    assert cfg.decomposer.deployment_options()["ray_actor_options"]["num_cpus"] == 0.5
    assert cfg.base_url() == "http://127.0.0.1:8000"
    auto = load_serve_config("configs/serve.yaml", {"decomposer.num_replicas": None,
                                                    "decomposer.autoscaling": {"min_replicas": 1, "max_replicas": 3}})
    opts = auto.decomposer.deployment_options()
    assert "num_replicas" not in opts and opts["autoscaling_config"]["max_replicas"] == 3
    base = {"decomposer": {"model": "m"}, "solver": {"backend": {"type": "hf", "model": "s"}}}
    assert ServeConfig.model_validate(base).decomposer.deployment_options()["max_ongoing_requests"] == 16
    for bad, key in [
        ({"solver": {"backend": {"type": "reference"}}}, "solver.backend"),
        ({"decomposer": {"model": "m", "num_replicas": 2, "autoscaling": {}}}, "decomposer"),
        ({"decomposer": {"model": "m", "max_batch_size": 8, "max_ongoing_requests": 4}}, "decomposer"),
        ({"decomposer": {"model": "m", "bogus": 1}}, "decomposer.bogus"),
        ({"colocate": True, "decomposer": {"model": "m", "num_replicas": 2}}, "ingress.num_replicas"),
        ({"colocate": True, "decomposer": {"model": "m", "engine": "vllm"}}, "colocate: false"),
        ({"colocate": True, "solver": {"backend": {"type": "hf", "model": "s"}, "ray_actor_options": {"num_gpus": 1}}},
         "ingress.ray_actor_options"),
        ({"colocate": True, "ingress": {"max_ongoing_requests": 4}}, "ingress.max_ongoing_requests"),
    ]:
        with pytest.raises(ConfigError) as ei:
            load_serve_config(sections={**base, **bad})
        assert key in str(ei.value)
    # the Serve-config-file builder: config path + list or mapping overrides + merged sections
    from pipeline.serving.app import app_builder

    app = app_builder({"config": "configs/serve.yaml", "overrides": ["decomposer.max_batch_size=4"],
                       "limits": {"max_tokens": 512}})
    assert type(app).__name__ == "Application"


def test_solver_proxies_an_openai_endpoint(served):
    """A Solver deployment with the openai backend, pointed at the OpenAI stub server:
    concurrent calls are batched, and an upstream failure becomes an error result (503 at
    the ingress) while the replica keeps serving."""
    from ray import serve

    from pipeline.backends import OpenAIBackendConfig
    from pipeline.serving.deployments import Solver
    from tests.servers.openai_stub import SOLUTION_REPLY, OpenAIStubServer

    with OpenAIStubServer(latency_s=0.05) as srv:
        backend = OpenAIBackendConfig(base_url=srv.base_url, model="stub-model", api_key_env=None, max_retries=0,
                                      concurrency=8)
        app = Solver.options(max_ongoing_requests=16, ray_actor_options={"num_cpus": 0.1}).bind(backend, 4, 0.2)
        handle = serve.run(app, name="solver-proxy", route_prefix=None)
        try:
            msgs = [{"role": "user", "content": "Q1: what?"}]
            params = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 8, "seed": 0, "stop": []}
            outs = [r.result() for r in [handle.generate.remote(msgs, params) for _ in range(8)]]
            assert [o["text"] for o in outs] == [SOLUTION_REPLY] * 8 and all(o["error"] is None for o in outs)
            assert all(o["prompt_tokens"] > 0 for o in outs)
            stats = handle.stats.remote().result()
            assert stats["backend"] == "openai" and stats["requests"] == 8
            assert max(int(k) for k in stats["batch_sizes"]) > 1, stats
            srv.fail_rate_500 = 1.0
            outs = [r.result() for r in [handle.generate.remote(msgs, params) for _ in range(2)]]
            assert all(o["error"] and o["unavailable"] for o in outs), outs
            srv.fail_rate_500 = 0.0
            assert handle.generate.remote(msgs, params).result()["text"] == SOLUTION_REPLY
            assert handle.stats.remote().result()["pid"] == stats["pid"]
        finally:
            serve.delete("solver-proxy")


# ---------------------------------------------------------------- happy paths
def test_healthz_and_models(served):
    base = served["base"]
    r = httpx.get(base + "/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = httpx.get(base + "/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [SERVED, SOLVER]  # both stages are served


def test_chat_with_openai_client(served):
    import openai

    client = openai.OpenAI(base_url=served["base"] + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == [SERVED, SOLVER]
    resp = client.chat.completions.create(model=SERVED, messages=[{"role": "system", "content": "Decompose."},
                                                                  {"role": "user", "content": "What is 2 + 3 * 4?"}],
                                          max_tokens=8, temperature=0.0)
    assert resp.model == SERVED and resp.object == "chat.completion"
    assert isinstance(resp.choices[0].message.content, str)
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    # content parts and sampling with a seed are accepted
    resp = client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                                          max_tokens=4, temperature=0.7, top_p=0.9, seed=3, stop=["\n\n"])
    assert resp.usage.completion_tokens > 0
    # streaming (SSE) gives the same kind of text, plus a usage chunk when asked
    stream = client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(text, str)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "Hi"}])
    assert "gpt-nope" in str(ei.value)


def test_chat_with_httpx(served):
    r = httpx.post(served["base"] + "/v1/chat/completions", timeout=60,
                   json={"model": SERVED, "messages": [{"role": "user", "content": "Question: how many?"}],
                         "max_tokens": 6, "user": "someone"})  # unknown OpenAI fields are ignored
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == SERVED
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert body["usage"]["prompt_tokens"] > 0 and 0 < body["usage"]["completion_tokens"] <= 6


def test_chat_routes_by_model_to_the_decomposer_or_the_solver(served):
    """The model a chat request names picks the deployment (the decomposer's or the solver's served name),
    each with its own sampling defaults; an unknown model is a 404 naming the served ones, as OpenAI's."""
    base = served["base"]
    before = httpx.get(base + "/v1/stats").json()
    for model in (SERVED, SOLVER, SOLVER):
        r = httpx.post(base + "/v1/chat/completions", timeout=60,
                       json={"model": model, "messages": [{"role": "user", "content": "Q1: how many?"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == model, r.text
    after = httpx.get(base + "/v1/stats").json()
    assert after["decomposer"]["requests"] - before["decomposer"]["requests"] == 1
    assert after["solver"]["requests"] - before["solver"]["requests"] == 2
    err = _assert_error(httpx.post(base + "/v1/chat/completions", timeout=60, json={
        "model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}), 404, "model", contains="gpt-4o")
    assert err["code"] == "model_not_found" and SERVED in err["message"] and SOLVER in err["message"]


def test_our_openai_backend_uses_it_as_teacher(served):
    """pipeline.backends.openai_http.OpenAIBackend (the teacher client of our jobs) against the app."""
    from pipeline.backends.base import Request, SamplingParams
    from pipeline.backends.openai_http import OpenAIBackend
    from pipeline.backends import OpenAIBackendConfig
    from pipeline.prompts import decomposer_messages

    backend = OpenAIBackend(OpenAIBackendConfig(base_url=served["base"] + "/v1", model=SERVED, api_key_env=None,
                                                concurrency=4, max_retries=0, timeout_s=60))
    try:
        rows = [{"question": f"Tom has {i} apples and buys 3 more. How many now?", "dataset": "gsm8k"} for i in range(3)]
        reqs = [Request(messages=decomposer_messages(r, few_shot=False), sample_index=i) for i, r in enumerate(rows)]
        out = backend.generate(reqs, SamplingParams(temperature=0.7, max_tokens=8, seed=1, stop=("\n\n",)))
        assert len(out) == 3
        for c in out:
            assert c.error is None, c.error
            assert isinstance(c.text, str) and c.prompt_tokens > 0 and c.completion_tokens > 0
        assert backend.stats()["by_status"] == {"200": 3}
    finally:
        backend.close()


def test_solve(served):
    r = httpx.post(served["base"] + "/v1/solve", timeout=60,
                   json={"question": "The Bears kicked field goals of 45 and 28 yards. How much longer was the longest?",
                         "context": "The Bears kicked field goals of 45 and 28 yards.", "dataset": "drop"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["subquestions"], list) and all(isinstance(q, str) for q in body["subquestions"])
    assert isinstance(body["subanswers"], list) and all(isinstance(a, str) for a in body["subanswers"])
    assert body["answer"] is None or isinstance(body["answer"], str)
    assert isinstance(body["decomposition_parsed"], bool)
    if not body["decomposition_parsed"]:  # junk from a random model: treated as "No decomposition"
        assert body["subquestions"] == []
    assert isinstance(body["decomposer_text"], str) and isinstance(body["solver_text"], str)
    for stage in ("decomposer", "solver"):
        assert body["usage"][stage]["prompt_tokens"] > 0 and body["usage"][stage]["completion_tokens"] > 0
    assert body["models"]["decomposer"] == SERVED
    # context and dataset are optional
    r = httpx.post(served["base"] + "/v1/solve", json={"question": "What is 6 times 7?"}, timeout=60)
    assert r.status_code == 200, r.text


def test_burst_is_batched(served):
    base = served["base"]

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(i):
                return await client.post(base + "/v1/chat/completions", json={
                    "model": SERVED, "max_tokens": 4, "messages": [{"role": "user", "content": f"Question {i}: why?"}]})
            return await asyncio.gather(*(one(i) for i in range(16)))

    before = httpx.get(base + "/v1/stats").json()["decomposer"]
    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    after = httpx.get(base + "/v1/stats").json()["decomposer"]
    assert after["requests"] - before["requests"] == 16
    sizes = {int(k): v for k, v in after["batch_sizes"].items()}
    assert max(sizes) > 1, sizes
    assert max(sizes) <= after["max_batch_size"] == 8
    new_batches = after["batches"] - before["batches"]
    assert new_batches < 16, f"16 concurrent requests ran in {new_batches} batches"


def test_colocated_app_runs_both_models_in_the_ingress_replica(served):
    """``colocate: true``: one deployment; the models batch as they do in their own deployments."""
    from pipeline.serving import shutdown, start, start_http

    http = {"host": "127.0.0.1", "port": served["cfg"].http.port, "access_log": False}
    cfg = _config(served["model_dir"], served["cfg"].http.port, app_name="divconq-colocated", route_prefix="/colocated",
                  colocate=True, http=http)
    start_http(cfg)  # Serve's controller and proxy ahead of the app (here: joins the running ones)
    base = start(cfg)
    try:
        assert base.endswith("/colocated")

        async def burst():
            async with httpx.AsyncClient(timeout=120) as client:
                async def one(i, model):
                    return await client.post(base + "/v1/chat/completions", json={
                        "model": model, "max_tokens": 4, "messages": [{"role": "user", "content": f"Question {i}: why?"}]})
                return await asyncio.gather(*(one(i, (SERVED, SOLVER)[i % 2]) for i in range(32)))

        responses = asyncio.run(burst())
        assert [r.status_code for r in responses] == [200] * 32, [r.text for r in responses if r.status_code != 200]
        r = httpx.post(base + "/v1/solve", json={"question": "What is 6 times 7?"}, timeout=60)
        assert r.status_code == 200, r.text
        stats = httpx.get(base + "/v1/stats").json()
        assert stats["decomposer"]["pid"] == stats["solver"]["pid"] == stats["ingress"]["pid"], stats
        for stage in ("decomposer", "solver"):
            assert stats[stage]["requests"] >= 17, stats[stage]
            assert max(int(k) for k in stats[stage]["batch_sizes"]) > 1, stats[stage]
        # the split app of the module's fixture still runs beside it, in its own replicas
        split = httpx.get(served["base"] + "/v1/stats").json()
        assert split["decomposer"]["pid"] != split["ingress"]["pid"]
        # http.access_log: false: its replica logs no line per request; the fixture's app (default: on) does
        assert _access_log_lines("divconq-colocated") == 0 and _access_log_lines(served["cfg"].app_name) > 0
    finally:
        shutdown(cfg.app_name)


def _access_log_lines(app: str) -> int:
    """Serve's access log lines (``-- GET /path 200 5.1ms``) in the replica logs of ``app`` on this node."""
    import glob
    import re

    import ray

    line = re.compile(r" -- (GET|POST) \S+ \d{3} ")
    logs = glob.glob(os.path.join(ray._private.worker._global_node.get_logs_dir_path(), "serve", f"replica_{app}_*.log"))
    assert logs, f"no replica log of {app}"
    return sum(1 for path in logs for text in open(path, errors="replace") if line.search(text))


# ---------------------------------------------------------------- bad requests
def test_bad_requests_get_4xx_and_replicas_survive(served):
    from ray import serve

    base = served["base"]
    stats0 = httpx.get(base + "/v1/stats").json()
    post = lambda path, **kw: httpx.post(base + path, timeout=60, **kw)  # noqa: E731
    chat = lambda **body: post("/v1/chat/completions", json={"model": SERVED, "messages": [{"role": "user", "content": "hi"}], **body})  # noqa: E731

    # /v1/solve
    _assert_error(post("/v1/solve", json={}), 400, "question", contains="missing")
    _assert_error(post("/v1/solve", json={"question": 123}), 400, "question")
    _assert_error(post("/v1/solve", json={"question": "q", "context": ["a"]}), 400, "context")
    _assert_error(post("/v1/solve", json={"question": "q", "dataset": "mmlu"}), 400, "dataset")
    _assert_error(post("/v1/solve", json={"question": "q", "questoin": "typo"}), 400, "questoin", contains="unknown")
    _assert_error(post("/v1/solve", json={"question": "   "}), 400, "question")
    _assert_error(post("/v1/solve", json={"question": "x" * 501}), 400, "question", contains="500")
    _assert_error(post("/v1/solve", json={"question": "q", "context": "c" * 2001}), 400, "context", contains="2000")
    _assert_error(post("/v1/solve", json={"question": "q", "context": "c" * 20000}), 413)
    _assert_error(post("/v1/solve", content=b'{"question": "unterminated', headers={"content-type": "application/json"}),
                  400, contains="malformed JSON")
    _assert_error(post("/v1/solve", content=b"", headers={"content-type": "application/json"}), 400)
    _assert_error(post("/v1/solve", json=["question"]), 400, contains="JSON object")
    # /v1/chat/completions
    _assert_error(chat(model="no-such-model"), 404, "model", contains="no-such-model")
    _assert_error(chat(max_tokens=65), 400, "max_tokens", contains="64")
    _assert_error(chat(max_completion_tokens=1000), 400, "max_completion_tokens")
    _assert_error(chat(max_tokens="16"), 400, "max_tokens")
    _assert_error(chat(max_tokens=0), 400, "max_tokens")
    _assert_error(chat(temperature=5), 400, "temperature")
    _assert_error(chat(n=2), 400, "n")
    _assert_error(chat(stop=[1, 2]), 400, "stop")
    _assert_error(chat(messages=[]), 400, "messages")
    _assert_error(chat(messages=[{"role": "user", "content": "hi"}] * 9), 400, "messages", contains="8")
    _assert_error(chat(messages=[{"role": "user", "content": "x" * 4001}]), 400, "messages")
    long_prompt = " ".join(str(i) for i in range(900))[:3990]  # under the char limit, over the model's 1024 positions
    err = _assert_error(chat(messages=[{"role": "user", "content": long_prompt}]), 400, "messages", contains="tokens")
    assert err["code"] == "context_length_exceeded"
    _assert_error(chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role")
    _assert_error(chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content")
    _assert_error(chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), 400,
                  "messages[0].content")
    _assert_error(post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}), 400, "model")
    _assert_error(post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400,
                  contains="malformed JSON")
    # routing
    _assert_error(httpx.get(base + "/v1/nope"), 404)
    _assert_error(httpx.get(base + "/v1/solve"), 405)

    # the same replicas still serve good requests
    assert chat(max_tokens=4).status_code == 200
    assert post("/v1/solve", json={"question": "What is 1 + 1?"}).status_code == 200
    stats1 = httpx.get(base + "/v1/stats").json()
    for part in ("decomposer", "solver", "ingress"):
        assert stats1[part]["pid"] == stats0[part]["pid"], part
        assert stats1[part]["replica_id"] == stats0[part]["replica_id"], part
    assert stats1["ingress"]["responses_by_status"].get("400", 0) >= 20
    app = serve.status().applications[served["cfg"].app_name]
    assert str(app.status).endswith("RUNNING")
    assert all(str(d.status).endswith("HEALTHY") for d in app.deployments.values())


# ---------------------------------------------------------------- auth
def test_bearer_token_auth(served, monkeypatch):
    """A second app on the same Serve proxy (route prefix /secure) with auth_token_env set.

    The ingress reads the token from its *own* process environment. The session's Ray was
    started before this test set the variable, so its workers cannot inherit it; here (and
    only in tests) it reaches the ingress replica through ``build_app(ingress_env=...)``,
    i.e. the replica's runtime_env. In production the variable is set in the nodes'
    environment and nothing carries the value.
    """
    import openai
    import ray

    from pipeline.serving import shutdown, start

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    cfg = _config(served["model_dir"], served["cfg"].http.port, app_name="divconq-auth", route_prefix="/secure",
                  auth_token_env=TOKEN_ENV)
    base = start(cfg, ingress_env={TOKEN_ENV: TOKEN})
    try:
        assert base.endswith("/secure")
        good = {"Authorization": f"Bearer {TOKEN}"}
        seen: list[str] = []

        r = httpx.get(base + "/healthz")
        assert r.status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": TOKEN}, {"Authorization": f"Bearer {TOKEN}x"}):
            for method, path in (("GET", "/v1/models"), ("GET", "/v1/stats"), ("POST", "/v1/solve"),
                                 ("POST", "/v1/chat/completions"), ("GET", "/v1/nope")):
                r = httpx.request(method, base + path, headers=headers, json={"question": "q"})
                _assert_error(r, 401)
                assert r.headers.get("www-authenticate") == "Bearer"
                seen.append(r.text + json.dumps(dict(r.headers)))
        r = httpx.get(base + "/v1/models", headers=good)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == SERVED
        r = httpx.post(base + "/v1/solve", headers=good, json={"question": "What is 2 + 2?"}, timeout=60)
        assert r.status_code == 200, r.text
        seen.append(r.text)
        stats = httpx.get(base + "/v1/stats", headers=good).json()
        assert stats["ingress"]["auth"] is True
        seen.append(json.dumps(stats))

        client = openai.OpenAI(base_url=base + "/v1", api_key=TOKEN, max_retries=0, timeout=60)
        resp = client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert resp.usage.completion_tokens > 0
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0).models.list()
        # the main app (no auth_token_env) stays open
        assert httpx.get(served["base"] + "/v1/models").status_code == 200

        assert not any(TOKEN in text for text in seen)
        logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
        leaked = []
        for root, _, files in os.walk(os.path.join(logs, "serve")):
            for name in files:
                with open(os.path.join(root, name), errors="replace") as f:
                    if TOKEN in f.read():
                        leaked.append(name)
        assert not leaked, f"token found in Serve logs: {leaked}"
    finally:
        shutdown(cfg.app_name)


# ---------------------------------------------------------------- autoscaling at runtime
def _replicas(app_name: str, deployment: str) -> dict[str, int]:
    """Replica counts by state (RUNNING, STARTING, STOPPING, ...) from Serve's status API."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or deployment not in app.deployments:
        return {}
    return {str(k).rsplit(".", 1)[-1]: v for k, v in app.deployments[deployment].replica_states.items() if v}


def _wait_for(cond, timeout: float, what: str, on_timeout=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; {on_timeout()}")
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`look_back_period_s`:FutureWarning")  # vs the deprecated metrics_interval_s
def test_decomposer_autoscales_up_under_load_and_back_down(served):
    """A second app (route /auto) whose decomposer autoscales between 1 and 2 replicas with a target of
    one ongoing request and short delays. Bounded load from this test (8 concurrent clients on 127.0.0.1)
    takes it to 2 RUNNING replicas; once the load stops it goes back to 1. Both are waited for on Serve's
    status API with deadlines. The ingress reports its handle's queue every 0.5 s (Serve's default is
    10 s), handed to it through ``ingress_env``, as in test_bearer_token_auth."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.serving import shutdown, start

    autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0,
                   "downscale_delay_s": 2, "look_back_period_s": 2}
    cfg = _config(served["model_dir"], served["cfg"].http.port, app_name="divconq-autoscale", route_prefix="/auto",
                  decomposer={"num_replicas": None, "autoscaling": autoscaling, "ray_actor_options": {"num_cpus": 0.25}})
    assert cfg.decomposer.deployment_options()["autoscaling_config"] == autoscaling
    base = start(cfg, ingress_env={"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"})
    replicas = lambda: _replicas(cfg.app_name, "Decomposer")  # noqa: E731
    stop, sent = threading.Event(), []

    def client(i: int) -> None:
        with httpx.Client(timeout=120) as c:
            while not stop.is_set() and len(sent) < 2000:  # bounded even if the condition never comes
                r = c.post(base + "/v1/chat/completions", json={
                    "model": SERVED, "max_tokens": 8, "messages": [{"role": "user", "content": f"Question {i}: why?"}]})
                sent.append(r.status_code)

    try:
        assert replicas() == {"RUNNING": 1}
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client, i) for i in range(8)]
            try:
                _wait_for(lambda: replicas().get("RUNNING", 0) == 2, 180, "a second decomposer replica under load",
                          lambda: f"replicas {replicas()}, {len(sent)} requests sent")
            finally:
                stop.set()
            for f in futures:
                f.result()
        assert sent and set(sent) == {200}, sorted(set(sent))
        _wait_for(lambda: replicas() == {"RUNNING": 1}, 180, "the decomposer back at one replica without load",
                  lambda: f"replicas {replicas()}")
        assert httpx.post(base + "/v1/chat/completions", timeout=60, json={
            "model": SERVED, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    finally:
        stop.set()
        shutdown(cfg.app_name)


# ---------------------------------------------------------------- CLI
def test_cli_serves_in_foreground_until_sigterm(served):
    """``divconq serve`` (ray_jobs.serve) joins the running cluster, prints the URL, serves,
    and on SIGTERM deletes its app and exits 0."""
    import queue
    import signal
    import subprocess
    import sys
    import threading

    import ray
    from ray import serve

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model_dir = served["model_dir"]
    cmd = [sys.executable, "-m", "ray_jobs.serve", "--config", "configs/serve.yaml",
           f"ray.address={ray.get_runtime_context().gcs_address}", f"http.port={served['cfg'].http.port}",
           "app_name=divconq-cli", "route_prefix=/cli", f"decomposer.model={model_dir}", f"solver.backend.model={model_dir}",
           "decomposer.device=cpu", "solver.backend.device=cpu", "decomposer.ray_actor_options.num_cpus=0.25",
           "solver.ray_actor_options.num_cpus=0.25"]
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    output: list[str] = []
    try:
        url = None
        deadline = time.monotonic() + 150
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            output.append(line)
            if line.startswith("divconq serve:"):
                url = line.split(" at ", 1)[1].split()[0]
        assert url is not None, "".join(output[-40:])
        assert url.endswith("/cli")
        r = httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={"model": "divconq-decomposer", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, "".join(output[-40:])
        assert "divconq-cli" not in serve.status().applications
        assert httpx.get(served["base"] + "/healthz").status_code == 200  # the other app is untouched
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            serve.delete("divconq-cli")


# ---------------------------------------------------------------- a model that is still being trained
def test_a_model_waits_for_its_marker_and_fails_naming_it(tiny_model_dir, tmp_path):
    """``wait_for``: the backend loads nothing before the marker exists, and says which marker it waited for."""
    from pipeline.backends import HFBackendConfig, make_backend

    marker = str(tmp_path / "teacher" / "ready")
    with pytest.raises(TimeoutError, match=f"wait_for: {marker} did not appear within 0.5 s"):
        make_backend(HFBackendConfig(model=tiny_model_dir, device="cpu", wait_for=marker, wait_timeout_s=0.5))
    with pytest.raises(Exception, match="decomposer.wait_for: only the hf engine"):  # vLLM would not wait: refused
        _config(tiny_model_dir, 8000, decomposer={"engine": "vllm", "wait_for": marker})
    os.makedirs(os.path.dirname(marker))
    open(marker, "w").close()
    assert make_backend(HFBackendConfig(model=tiny_model_dir, device="cpu", wait_for=marker)).name == tiny_model_dir


def test_an_app_deployed_before_its_model_exists_serves_it_once_marked(served, tmp_path):
    """The quickstart deploys the teacher's app while the teacher trains: the replicas start (no model to check yet)
    and load the model when its marker appears; one replica, never restarted."""
    import glob
    import shutil

    import ray

    from pipeline.serving import shutdown
    from pipeline.serving.app import deploy, wait_ready

    model, marker = str(tmp_path / "model"), str(tmp_path / "ready")
    http = {"host": "127.0.0.1", "port": served["cfg"].http.port, "access_log": False}
    waits = {"wait_for": marker}
    cfg = _config(model, served["cfg"].http.port, decomposer=waits, app_name="divconq-waiting", route_prefix="/waiting",
                  colocate=True, http=http, ingress={"num_replicas": 1},
                  solver={"backend": {"type": "hf", "model": model, "device": "cpu", "dtype": "float32", **waits},
                          "sampling": {"max_tokens": 12}})
    base = deploy(cfg)  # returns at once: the model does not exist yet
    try:
        shutil.copytree(served["model_dir"], model)  # "training" ends: the model, then its marker
        open(marker, "w").close()
        wait_ready(cfg)
        r = httpx.post(base + "/v1/chat/completions", timeout=60,
                       json={"model": SERVED, "max_tokens": 4, "messages": [{"role": "user", "content": "Why?"}]})
        assert r.status_code == 200, r.text
        logs = glob.glob(os.path.join(ray._private.worker._global_node.get_logs_dir_path(), "serve", "replica_divconq-waiting_*.log"))
        assert len(logs) == 1, logs
    finally:
        shutdown(cfg.app_name)
