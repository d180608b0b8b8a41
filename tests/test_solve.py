"""solve on real local Ray: the reference oracle solver on a real generate output, an OpenAI-compatible
solver server over all datasets, and a solve killed midway then resumed (exactly once)."""

from __future__ import annotations

import hashlib
import os
import re
import sys

import pytest

from pipeline import storage, tables
from pipeline.manifest import read_manifest
from pipeline.metrics import score
from pipeline.prompts import solver_messages
from pipeline.solving import SOLVE_FIELDS, SOLVE_SCHEMA
from ray_jobs import generate, solve
from tests.cluster_harness import kill_after_shards
from tests.conftest import REPO
from tests.servers.openai_stub import OpenAIStubServer, StubHTTPError

GEN_CONFIG = os.path.join(REPO, "configs", "generate.yaml")
CONFIG = os.path.join(REPO, "configs", "solve.yaml")


def run_solve(*overrides: str) -> int:
    return solve.main(["--config", CONFIG, *overrides])


def read_out(out: str) -> tuple[list[dict], list[dict]]:
    good = tables.read_rows(storage.join(out, "data")) if storage.exists(storage.join(out, "data")) else []
    bad = tables.read_rows(storage.join(out, "quarantine")) if storage.exists(storage.join(out, "quarantine")) else []
    return good, bad


def assert_exactly_once(out: str, expected_ids: set[str]) -> list[dict]:
    good, bad = read_out(out)
    ids = [r["request_id"] for r in good + bad]
    assert len(ids) == len(set(ids)), "a request appears twice"
    assert set(ids) == expected_ids
    return good


@pytest.fixture(scope="module")
def generated(ray_session, prepared_samples, tmp_path_factory):
    """A real generate output: 30 GSM8K train questions x 3 reference-teacher samples."""
    out = str(tmp_path_factory.mktemp("gen") / "generate")
    assert generate.main(["--config", GEN_CONFIG, f"input.path={prepared_samples}", f"output.dir={out}", "ray.num_cpus=4",
                          "input.limit=30", "sampling.n=3", "output.shard_size=30"]) == 0
    return out


def test_reference_solver_on_generate_output(generated, tmp_path):
    out = str(tmp_path / "solve")
    assert run_solve(f"input.path={generated}", f"output.dir={out}", "output.shard_size=16") == 0
    inputs = tables.read_rows(generated)
    good = assert_exactly_once(out, {r["request_id"] for r in inputs})
    assert len(good) == 90
    # every input column is carried through unchanged, the solve columns are added
    assert tables.read_rows(storage.join(out, "data"))[0].keys() == {f.name for f in SOLVE_SCHEMA}
    by_req = {r["request_id"]: r for r in inputs}
    for r in good:
        src = by_req[r["request_id"]]
        assert all(r[k] == v for k, v in src.items()), r["request_id"]
        assert r["solver"] == "reference-gold" and r["solver_prompt_version"] == "v1"
        assert r["solver_prompt_tokens"] > 0 and r["solver_completion_tokens"] > 0 and r["solver_cached"] is False
        assert len(r["subanswers"]) == len(r["subquestions"]) and r["parse_warning"] is None
        assert r["solver_raw_text"].endswith(f"The answer is: {r['prediction']}")
        assert {k: r[k] for k in ("em", "f1", "correct")} == score("gsm8k", r["prediction"], r["answers"])
    # the oracle grades the decomposition: the gold one (sample 0) always works, perturbed ones sometimes fail
    s0 = [r for r in good if r["sample_index"] == 0]
    perturbed = [r for r in good if r["sample_index"] > 0]
    assert len(s0) == 30 and all(r["correct"] for r in s0)
    assert any(not r["correct"] for r in perturbed) and any(r["correct"] for r in perturbed)
    # manifest: counts, usage, accuracy per dataset (from the shard markers) agree with the rows
    m = read_manifest(out)
    assert m["job"] == "solve" and m["inputs"] == {"decompositions": generated}
    assert m["counts"]["rows_in"] == 90 and m["counts"]["rows_out"] == 90 and m["counts"]["quarantined"] == 0
    assert m["usage"]["prompt_tokens"] == sum(r["solver_prompt_tokens"] for r in good)
    acc = m["accuracy"]["gsm8k"]
    assert acc["n"] == 90 and acc["correct"] == sum(r["correct"] for r in good)
    assert acc["accuracy"] == pytest.approx(acc["correct"] / 90, abs=1e-6) and m["accuracy"]["all"]["n"] == 90
    # a finished job reruns as a no-op
    before = {f: storage.read_bytes(f) for f in storage.list_files(storage.join(out, "data"))}
    assert run_solve(f"input.path={generated}", f"output.dir={out}", "output.shard_size=16") == 0
    assert {f: storage.read_bytes(f) for f in storage.list_files(storage.join(out, "data"))} == before


def test_resume_after_lost_shards(generated, tmp_path):
    out = str(tmp_path / "solve")
    args = [f"input.path={generated}", f"output.dir={out}", "output.shard_size=10"]
    assert run_solve(*args) == 0
    first = {r["request_id"]: r for r in read_out(out)[0]}
    m1 = read_manifest(out)
    # simulate a crash: three shards lost their marker (two also their data), one left a stray half-written data file
    for shard in ("shard-00001", "shard-00004", "shard-00008"):
        os.remove(os.path.join(out, "_done", f"{shard}.json"))
    os.remove(os.path.join(out, "data", "shard-00001.parquet"))
    os.remove(os.path.join(out, "data", "shard-00004.parquet"))
    os.remove(os.path.join(out, "manifest.json"))
    untouched = os.path.getmtime(os.path.join(out, "data", "shard-00000.parquet"))
    assert run_solve(*args) == 0
    second = assert_exactly_once(out, set(first))
    assert {r["request_id"]: r["prediction"] for r in second} == {k: r["prediction"] for k, r in first.items()}
    assert os.path.getmtime(os.path.join(out, "data", "shard-00000.parquet")) == untouched  # committed: not redone
    m2 = read_manifest(out)
    assert m2["counts"] == m1["counts"] and m2["accuracy"] == m1["accuracy"]
    # different settings never mix into the same output
    assert run_solve(*args, "drop_f1_threshold=0.9") == 1


def _gold_by_question(prepared: str) -> dict[str, list[str]]:
    return {r["question"]: r["answers"] for r in tables.read_rows(prepared)}


def _bucket(question: str) -> int:
    return int(hashlib.sha256(question.encode()).hexdigest(), 16) % 4


def test_openai_solver_all_datasets(ray_session, prepared_samples, tmp_path):
    """A hand-built decomposition set (any row set with the generate columns) over GSM8K, DROP and Bamboogle,
    solved by an OpenAI-compatible server: right, wrong, unmarked and refused answers."""
    rows = []
    for r in tables.read_rows(prepared_samples):
        if sum(1 for x in rows if x["dataset"] == r["dataset"]) >= 8:
            continue
        subqs = list(dict.fromkeys(r["gold_subquestions"] or []))
        rows.append({**r, "request_id": f"{r['id']}#0", "sample_index": 0, "subquestions": subqs})
    inp = str(tmp_path / "decomp" / "part-0.parquet")
    tables.write_rows(inp, rows)
    gold = _gold_by_question(prepared_samples)
    refused = rows[3]["question"]

    def responder(messages, body):
        user = messages[-1]["content"]
        q = re.search(r"^Question: (.*)$", user, re.M).group(1)
        if q == refused:
            raise StubHTTPError(400, "content policy: refused")
        n_subq = len(re.findall(r"^Q\d+: ", user, re.M))
        lines = [f"A{i}: step {i}" for i in range(1, n_subq + 1)]
        b = _bucket(q)
        if b == 0:
            lines.append("I am not sure.")  # no final answer at all
        elif b == 1:
            lines.append("The answer is: zebra 12345")  # wrong
        else:
            lines.append(f"The answer is: {gold[q][0]}")  # right
        return "\n".join(lines)

    with OpenAIStubServer(responder=responder, fail_rate_429=0.1, retry_after=0.01, seed=3) as srv:
        out = str(tmp_path / "solve")
        assert run_solve(f"input.path={inp}", f"output.dir={out}", "output.shard_size=6", "few_shot=false",
                         "solver={type: openai, model: stub-solver, base_url: '" + srv.base_url + "', "
                         "api_key_env: null, concurrency: 4, max_retries: 8, backoff_base_s: 0.01, backoff_max_s: 0.05}") == 0
        bodies = list(srv.requests)
    good, bad = read_out(out)
    assert {r["request_id"] for r in good + bad} == {r["request_id"] for r in rows} and len(good) + len(bad) == len(rows)
    # a backend error is the only thing quarantined, and its error names the request
    assert [r["question"] for r in bad] == [refused]
    assert rows[3]["request_id"] in bad[0]["error"] and "refused" in bad[0]["error"]
    # the solver saw the documented prompt: the subquestions, in order, with no demo
    by_q = {r["question"]: r for r in rows}
    for body in bodies:
        q = re.search(r"^Question: (.*)$", body["messages"][-1]["content"], re.M).group(1)
        assert body["messages"] == solver_messages(by_q[q], by_q[q]["subquestions"], few_shot=False)
    assert {r["dataset"] for r in good} == {"gsm8k", "drop", "bamboogle"}
    for r in good:
        b = _bucket(r["question"])
        assert r["solver"] == "stub-solver" and r["solver_prompt_tokens"] > 0
        assert r["subanswers"] == [f"step {i}" for i in range(1, len(r["subquestions"]) + 1)]
        assert {k: r[k] for k in ("em", "f1", "correct")} == score(r["dataset"], r["prediction"], r["answers"], 0.5)
        if b == 0 and r["dataset"] == "gsm8k":  # no marker: GSM8K falls back to the last number, with a warning
            assert r["prediction"] == str(len(r["subquestions"])) and "marker" in r["parse_warning"]
        elif b == 0:  # no final answer: kept as a wrong prediction (not a pipeline failure), with a warning
            assert r["prediction"] is None and r["correct"] is False and "no final answer" in r["parse_warning"]
        elif b == 1:
            assert r["prediction"] == "zebra 12345" and r["correct"] is False and r["parse_warning"] is None
        else:
            assert r["prediction"] is not None and r["correct"] is True
    acc = read_manifest(out)["accuracy"]
    for ds in ("gsm8k", "drop", "bamboogle"):
        mine = [r for r in good if r["dataset"] == ds]
        assert acc[ds]["answered"] == len(mine) and acc[ds]["correct"] == sum(r["correct"] for r in mine)
        assert acc[ds]["no_answer"] == sum(r["prediction"] is None for r in mine)
    assert acc["drop"]["no_answer"] + acc["bamboogle"]["no_answer"] > 0  # the bucket-0 case really happened
    assert acc["all"]["quarantined"] == 1
    # the headline divides by all questions: the quarantined one counts as wrong; coverage beside it
    qds = bad[0]["dataset"]
    n_all = len([r for r in good + bad if r["dataset"] == qds])
    assert acc[qds]["n"] == n_all and acc[qds]["answered"] == n_all - 1 and acc[qds]["quarantined"] == 1
    assert acc[qds]["accuracy"] == pytest.approx(acc[qds]["correct"] / n_all, abs=1e-6)
    assert acc[qds]["coverage"] == pytest.approx((n_all - 1) / n_all, abs=1e-6)
    assert acc["all"]["n"] == len(rows) and acc["all"]["coverage"] < 1


def test_config_and_input_errors(prepared_samples, generated, tmp_path, capsys):
    for bad, key in (("sampling.n=2", "sampling.n must be 1"), ("solver.type=nope", "solver"), ("drop_f1_threshold=2", "drop_f1_threshold")):
        with pytest.raises(SystemExit) as e:
            run_solve(f"input.path={generated}", f"output.dir={tmp_path / 'a'}", bad)
        assert e.value.code == 2 and key in capsys.readouterr().err
    # a prepare output has no decompositions: one clear error, exit 1, nothing staged
    assert run_solve(f"input.path={prepared_samples}", f"output.dir={tmp_path / 'b'}") == 1
    assert not os.path.exists(tmp_path / "b")


def test_killed_solve_resumes_without_loss_or_duplicates(ray_session, generated, tmp_path):
    """The solver answers the first 12 requests (3 shards of 4, one actor) and holds every later one, so the
    job is killed at a known point: exactly 3 shards committed, the 4th in flight. Nothing is timed."""
    out = str(tmp_path / "solve")
    address = ray_session.get_runtime_context().gcs_address
    solver = "solver={type: openai, model: stub, base_url: 'URL', api_key_env: null, concurrency: 2, timeout_s: 600}"
    expected = {r["request_id"] for r in tables.read_rows(generated)}
    done_markers = lambda: {f: storage.read_bytes(f) for f in storage.list_files(os.path.join(out, "_done"), ".json")}  # noqa: E731
    with OpenAIStubServer(latency_s=0.05, seed=4) as srv:
        srv.hold_after_requests, srv.hold_timeout_s = 12, 600
        common = [f"ray.address={address}", f"input.path={generated}", f"output.dir={out}", "output.shard_size=4",
                  solver.replace("URL", srv.base_url)]
        kill_after_shards([sys.executable, "-m", "ray_jobs.solve", "--config", CONFIG, *common, "pool.max_actors=1"], out, srv,
                          shards=3)
        markers = done_markers()
        assert len(markers) == 3
        srv.hold_after_requests = None
        srv.reset_counters()
        assert run_solve(*common, "pool.max_actors=2") == 0
        second = srv.counters()["requests"]
    good = assert_exactly_once(out, expected)
    # shards committed before the kill were not redone; every other request was sent once
    assert all(storage.read_bytes(f) == b for f, b in markers.items())
    assert len(good) == 90 and second == 90 - 3 * 4
    assert read_manifest(out)["counts"]["shards_committed"] == 23


def test_s3_input_and_output(generated, s3_bucket):
    src = f"{s3_bucket}/generate"
    storage.copy_dir(generated, src)
    out = f"{s3_bucket}/solve"
    assert run_solve(f"input.path={src}", f"output.dir={out}", "input.limit=12", "output.shard_size=4",
                     f"cache_dir={s3_bucket}/cache") == 0
    good, bad = read_out(out)
    assert len(good) == 12 and not bad and read_manifest(out)["counts"]["shards_committed"] == 3
    assert storage.list_files(f"{s3_bucket}/cache", ".json")


def test_solve_fields_are_documented():
    names = [f.name for f in SOLVE_FIELDS]
    assert names[:3] == ["subanswers", "prediction", "solver_raw_text"]
    assert SOLVE_SCHEMA.names[-1] == "error" and SOLVE_SCHEMA.names.count("error") == 1
