"""One two-stage system (issue 12): the same questions through ``infer`` in process (local HF decomposer and
solver), through ``infer`` against the served app (``openai`` backends on the app's decomposer and solver
models; the app built both ways: models in their own deployments, and colocated in the ingress replica)
and through ``POST /v1/solve`` give identical subquestions, subanswers, predictions, scores and
token counts, with greedy decoding. Every path runs :mod:`pipeline.method`; the model is a tiny Llama
trained in process on the two reply formats, so its replies parse and the comparison is not of empties."""

from __future__ import annotations

import httpx
import pytest

from pipeline import inference, method, tables
from pipeline.backends import BackendConfig, HFBackendConfig, OpenAIBackendConfig
from pipeline.config import load_config, updated
from pipeline.inference import InferConfig
from pipeline.serving import shutdown, start
from pipeline.serving.app import load_serve_config
from tests.conftest import REPO
from tests.servers import free_port

QUESTIONS = 6
MAX_TOKENS = {"decomposer": 48, "solver": 64}
METHOD = {"max_subquestions": 10, "decomposer_few_shot": False, "solver_few_shot": False}
COMPARED = ("subquestions", "decomposition_parsed", "subanswers", "prediction", "em", "f1", "correct", "decomposer_text",
            "solver_text", "decomposer_prompt_tokens", "decomposer_completion_tokens", "solver_prompt_tokens",
            "solver_completion_tokens")


def _infer(prepared: str, out: str, decomposer: BackendConfig, solver: BackendConfig) -> dict[str, dict]:
    cfg = load_config(InferConfig, f"{REPO}/configs/infer.yaml")
    # One question per generate call, one actor: a batch pads its prompts to one length, and padded rows may
    # sum their floats in another order than a lone row; greedy decoding then can pick another token on a
    # near tie. Batches of one on every path (here, in the served app and from its client) rule that out.
    cfg = updated(cfg, {"input": {"path": prepared, "limit": QUESTIONS}, "output": {"dir": out, "shard_size": QUESTIONS},
                        "setting": "agreement", "mode": "static", "decomposer": decomposer, "solver": solver,
                        "decomposer_sampling": {"max_tokens": MAX_TOKENS["decomposer"], "temperature": 0.0},
                        "solver_sampling": {"max_tokens": MAX_TOKENS["solver"], "temperature": 0.0}, "method": METHOD,
                        "pool": {"min_actors": 1, "max_actors": 1, "batch_size": 1, "num_cpus": 0.5}})
    manifest = inference.run(cfg)
    assert manifest.counts["quarantined"] == 0, manifest.counts
    return {r["id"]: r for r in tables.read_rows(out)}


def _serve_config(model: str, port: int, colocate: bool):
    one_at_a_time = {"max_batch_size": 1, "batch_wait_timeout_s": 0.0, "ray_actor_options": {"num_cpus": 0.5},
                     **({} if colocate else {"num_replicas": 1})}
    return load_serve_config(sections={
        "http": {"host": "127.0.0.1", "port": port}, "app_name": "divconq-agreement", "blocking": False, "method": METHOD,
        "colocate": colocate,
        "decomposer": {"model": model, "device": "cpu", "dtype": "float32", "sampling": {"max_tokens": MAX_TOKENS["decomposer"]},
                       **one_at_a_time},
        "solver": {"backend": {"type": "hf", "model": model, "device": "cpu", "dtype": "float32"},
                   "sampling": {"max_tokens": MAX_TOKENS["solver"]}, **one_at_a_time}})


@pytest.mark.slow
def test_infer_in_process_infer_through_serve_and_v1_solve_agree(ray_session, prepared_samples, trained_tiny_model_dir,
                                                                   tmp_path):
    model = trained_tiny_model_dir
    hf = HFBackendConfig(model=model, device="cpu", dtype="float32", batch_size=1)
    local = _infer(prepared_samples, str(tmp_path / "local"), hf, hf)
    port = free_port()
    try:
        for colocate in (False, True):  # the models in their own deployments, then inside the ingress replica
            cfg = _serve_config(model, port, colocate)
            remote, online = _served(cfg, prepared_samples, local, str(tmp_path / f"served-colocate={colocate}"))
            shutdown(cfg.app_name)
            _assert_agree(local, remote, online)
    finally:
        shutdown()
    # not a comparison of empties: the trained model's replies parse
    rows = list(local.values())
    assert sum(bool(r["decomposition_parsed"] and r["subquestions"]) for r in rows) >= QUESTIONS // 2, rows
    assert sum(r["prediction"] is not None for r in rows) >= QUESTIONS // 2, rows


def _served(cfg, prepared: str, local: dict[str, dict], out: str) -> tuple[dict[str, dict], dict[str, dict]]:
    """Infer ``prepared`` through the app ``cfg`` (started here) and POST /v1/solve each of ``local``'s questions."""
    base = start(cfg)

    def served(name: str) -> OpenAIBackendConfig:  # one request in flight: the app batches one question at a time
        return OpenAIBackendConfig(base_url=base + "/v1", model=name, api_key_env=None, concurrency=1, max_retries=0,
                                   timeout_s=300)

    remote = _infer(prepared, out, served(cfg.decomposer.served_name), served(cfg.solver.served_name))
    online = {}
    for qid, row in local.items():
        r = httpx.post(base + "/v1/solve", json={"question": row["question"], "context": row["context"],
                                                 "dataset": row["dataset"]}, timeout=300)
        assert r.status_code == 200, r.text
        online[qid] = r.json()
    return remote, online


def _assert_agree(local: dict[str, dict], remote: dict[str, dict], online: dict[str, dict]) -> None:
    assert len(local) == QUESTIONS and set(remote) == set(local)
    for qid, row in local.items():
        assert {k: remote[qid][k] for k in COMPARED} == {k: row[k] for k in COMPARED}, qid
        body = online[qid]
        scores = method.score(row, body["answer"])
        assert (body["subquestions"], body["decomposition_parsed"], body["subanswers"], body["answer"]) == (
            row["subquestions"], row["decomposition_parsed"], row["subanswers"], row["prediction"]), qid
        assert (body["decomposer_text"], body["solver_text"]) == (row["decomposer_text"], row["solver_text"]), qid
        assert {k: scores[k] for k in ("em", "f1", "correct")} == {k: row[k] for k in ("em", "f1", "correct")}, qid
        assert body["usage"] == {stage: {"prompt_tokens": row[f"{stage}_prompt_tokens"],
                                         "completion_tokens": row[f"{stage}_completion_tokens"]}
                                 for stage in ("decomposer", "solver")}, qid
