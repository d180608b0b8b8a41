"""The cost ledger (price table, overrides, per-stage/model/mode costs in manifests and the evaluation
report), `divconq estimate`, and structured output with its free-text fallback."""

from __future__ import annotations

import json
import os

import pytest

from pipeline import storage, tables
from pipeline.config import PricingConfig
from pipeline.cost import cost_summary, ledger_usage, merge, price_of
from pipeline.backends.base import Completion
from pipeline.estimate import TokenCounter
from pipeline.manifest import read_manifest
from pipeline.method import StageUsage
from pipeline.parsing import ParseError
from pipeline.structured import RESPONSE_FORMAT, parse_decomposition
from ray_jobs import cli, evaluate, generate, infer
from tests.conftest import REPO
from tests.servers.openai_stub import OpenAIStubServer


class _Named:
    def __init__(self, name: str, mode: str = "online") -> None:
        self.name, self.mode = name, mode


def test_price_table_lookup_and_overrides(tmp_path):
    table, source = price_of("gpt-4o-mini", PricingConfig())
    assert (table.prompt_per_1m, table.completion_per_1m, table.batch_discount, source) == (0.15, 0.60, 0.5, "shipped table")
    assert price_of("openai/gpt-4o-mini-2024-07-18", PricingConfig())[0] == table  # provider prefix + dated snapshot
    assert price_of("gpt-4o-2024-08-06", PricingConfig())[0].prompt_per_1m == 2.50  # longest prefix wins over gpt-4
    assert price_of("my-local-model", PricingConfig()) == (None, "unpriced")
    own = tmp_path / "prices.yaml"
    own.write_text("models:\n  my-local-model: {prompt_per_1m: 1.0, completion_per_1m: 2.0}\n")
    assert price_of("my-local-model", PricingConfig(table=str(own)))[0].completion_per_1m == 2.0
    cfg = PricingConfig(models={"gpt-4o-mini": {"prompt_per_1m": 1.0, "completion_per_1m": 1.0, "batch_discount": 0.4}})
    assert price_of("gpt-4o-mini", cfg)[1] == "config (models)"
    flat = PricingConfig(prompt_per_1k=0.001)  # a flat price set in the config prices every model
    assert price_of("gpt-4o-mini", flat)[0].prompt_per_1m == 1.0


def test_ledger_prices_online_batch_and_cache_apart():
    done = [Completion(text="x", prompt_tokens=1_000_000, completion_tokens=500_000)]
    cached = [Completion(text="x", prompt_tokens=10**9, completion_tokens=10**9, cached=True)]
    done, cached = StageUsage.of(done), StageUsage.of(cached)
    totals = merge(ledger_usage("decomposer", _Named("gpt-4o-mini"), StageUsage().merge(done).merge(cached)),
                   ledger_usage("decomposer", _Named("gpt-4o-mini", "batch"), done),
                   ledger_usage("solver", _Named("gpt-4o"), done), ledger_usage("solver", _Named("my-model"), done),
                   {"rows_in": 3.0})
    s = cost_summary(totals, PricingConfig())
    by = {(e["stage"], e["model"], e["mode"]): e for e in s["by_stage_model"]}
    online = by[("decomposer", "gpt-4o-mini", "online")]
    assert (online["requests"], online["cached"], online["prompt_tokens"]) == (1, 1, 1_000_000)  # cached tokens not billed
    assert online["cost"] == pytest.approx(0.15 + 0.30)
    assert by[("decomposer", "gpt-4o-mini", "batch")]["cost"] == pytest.approx((0.15 + 0.30) / 2)
    assert by[("solver", "gpt-4o", "online")]["cost"] == pytest.approx(2.5 + 5.0)
    assert by[("solver", "my-model", "online")]["cost"] == 0 and s["unpriced"] == ["my-model"]
    assert s["total_cost"] == pytest.approx(0.45 + 0.225 + 7.5) and s["currency"] == "USD"
    # bill_cached: the cached reply's tokens at its entry's price (here online), as if computed
    billed = {(e["stage"], e["model"], e["mode"]): e for e in cost_summary(totals, PricingConfig(bill_cached=True))["by_stage_model"]}
    assert billed[("decomposer", "gpt-4o-mini", "online")]["cost"] == pytest.approx(0.45 + 10**3 * (0.15 + 0.60))
    assert billed[("solver", "gpt-4o", "online")]["cost"] == by[("solver", "gpt-4o", "online")]["cost"]


def test_structured_output_parse_and_fallback():
    assert parse_decomposition('{"subquestions": ["How many?", "How  many more?", "How many?"]}') == ["How many?", "How many more?"]
    assert parse_decomposition('```json\n{"subquestions": ["A?"]}\n```') == ["A?"]
    assert parse_decomposition('{"subquestions": []}') == []  # "no decomposition"
    assert parse_decomposition("1. First?\n2. Second?") == ["First?", "Second?"]  # free-text teachers
    assert parse_decomposition('{"subquestions": ["a?", "b?", "c?"]}', max_subquestions=2) == ["a?", "b?"]
    with pytest.raises(ParseError):
        parse_decomposition('{"answer": 3}')  # JSON without the list: the free-text parser finds nothing either


def test_token_counter_uses_the_teachers_tokenizer(tiny_model_dir):
    from pipeline.backends import HFBackendConfig, OpenAIBackendConfig

    messages = [{"role": "user", "content": "How many apples does Natalia have left?"}]
    hf = TokenCounter(HFBackendConfig(model=tiny_model_dir))
    assert hf.method.startswith("tokenizer") and hf.text("apples apples") > 0
    approx = TokenCounter(OpenAIBackendConfig(model="teacher-without-known-tokenizer"))
    assert approx.method.startswith("approximation")
    assert approx.messages(messages) == -(-len(messages[0]["content"]) // 4) + 3 + 3
    assert TokenCounter(OpenAIBackendConfig(model="x", tokenizer=tiny_model_dir)).method == hf.method


def _openai_teacher(srv, **extra) -> str:
    fields = ", ".join(f"{k}: {v}" for k, v in extra.items())
    return "teacher={type: openai, model: gpt-4o-mini, base_url: '" + srv.base_url + "', api_key_env: null" + (
        f", {fields}" if fields else "") + "}"


def test_estimate_then_generate_with_structured_output_and_cost_ledger(ray_session, prepared_samples, tmp_path, capsys):
    def responder(messages, body):
        if body.get("response_format"):
            assert body["response_format"] == RESPONSE_FORMAT
            return json.dumps({"subquestions": ["What is the first amount?", "What is the total?"]})
        return "1. What is the first amount?"

    out = str(tmp_path / "gen")
    with OpenAIStubServer(responder=responder) as srv:
        common = ["--config", os.path.join(REPO, "configs", "generate.yaml"), f"input.path={prepared_samples}",
                  f"output.dir={out}", "input.limit=6", "sampling.n=2", "output.shard_size=4",
                  _openai_teacher(srv, structured_output="true")]
        capsys.readouterr()
        assert cli.main(["estimate", *common, "--json"]) == 0
        est = json.loads(capsys.readouterr().out)
        assert srv.request_count == 0  # nothing was sent
        assert generate.main(common) == 0
        sent = list(srv.requests)
    (stage,) = est["stages"]
    assert (stage["stage"], stage["model"], stage["requests"]) == ("decomposer", "gpt-4o-mini", 12)
    assert stage["batch_cost"] == pytest.approx(stage["online_cost"] / 2) and stage["online_cost"] > 0
    assert stage["max_completion_tokens"] == 12 * 256 and 0 < stage["expected_completion_tokens"] <= 12 * 256
    words = sum(len(m["content"].split()) for m in sent[0]["messages"])  # the stub counts words
    assert stage["prompt_tokens"] / 12 > words  # 4 chars/token is more tokens than words for English
    assert all(b["response_format"] == RESPONSE_FORMAT for b in sent)
    rows = tables.read_rows(storage.join(out, "data"))
    assert len(rows) == 12 and all(r["subquestions"] == ["What is the first amount?", "What is the total?"] for r in rows)
    m = read_manifest(out)
    (entry,) = m["usage"]["cost"]["by_stage_model"]
    assert (entry["stage"], entry["mode"], entry["requests"]) == ("decomposer", "online", 12)
    assert entry["prompt_tokens"] == sum(r["prompt_tokens"] for r in rows) == m["usage"]["prompt_tokens"]
    expected = entry["prompt_tokens"] / 1e6 * 0.15 + entry["completion_tokens"] / 1e6 * 0.60
    assert m["usage"]["estimated_cost"] == pytest.approx(expected, abs=1e-8)


def test_infer_manifest_and_evaluation_report_carry_cost_per_stage_and_model(ray_session, prepared_samples, tmp_path):
    preds = str(tmp_path / "infer")
    with OpenAIStubServer() as srv:
        solver = ("solver={type: openai, model: gpt-4o, base_url: '" + srv.base_url + "', api_key_env: null, mode: batch, "
                  "batch: {poll_interval_s: 0.05}}")  # the solver through the Batch API
        assert infer.main(["--config", os.path.join(REPO, "configs", "infer.yaml"), f"input.path={prepared_samples}",
                           f"output.dir={preds}", "input.limit=5", solver]) == 0
    ledger = read_manifest(preds)["usage"]["cost"]["by_stage_model"]
    by = {(e["stage"], e["model"]): e for e in ledger}
    assert set(by) == {("decomposer", "reference-gold"), ("solver", "gpt-4o")}
    sol = by[("solver", "gpt-4o")]
    assert (sol["requests"], sol["mode"]) == (5, "batch") and len(srv.batches) == 1 and srv.request_count == 0
    assert sol["cost"] == pytest.approx((sol["prompt_tokens"] * 2.5 + sol["completion_tokens"] * 10.0) / 1e6 * 0.5, abs=1e-8)
    assert by[("decomposer", "reference-gold")]["cost"] == 0
    report_dir = str(tmp_path / "eval")
    assert evaluate.main(["--config", os.path.join(REPO, "configs", "evaluate.yaml"), "settings=[{name: s1, predictions: '"
                          + preds + "'}]", f"output.dir={report_dir}"]) == 0
    report = storage.read_text(storage.join(report_dir, "report.md"))
    assert "## Cost (actual, from each run's manifest)" in report
    line = next(ln for ln in report.splitlines() if ln.startswith("| s1 | solver | gpt-4o | batch |"))
    assert f"| {by[('solver', 'gpt-4o')]['prompt_tokens']} |" in line and f"{by[('solver', 'gpt-4o')]['cost']:.6f} USD" in line


def test_a_setting_rerun_from_the_cache_costs_what_it_cost_with_bill_cached(ray_session, prepared_samples, tmp_path):
    """The quickstart's settings share one response cache; with ``pricing.bill_cached`` a setting's cost does not
    depend on what an earlier setting left there (without it, cached replies are free)."""
    cache = str(tmp_path / "cache")

    def run(out: str, bill_cached: bool, srv: OpenAIStubServer) -> dict:
        solver = "solver={type: openai, model: gpt-4o, base_url: '" + srv.base_url + "', api_key_env: null}"
        assert infer.main(["--config", os.path.join(REPO, "configs", "infer.yaml"), f"input.path={prepared_samples}",
                           f"output.dir={tmp_path / out}", "input.limit=5", solver, f"cache_dir={cache}",
                           f"pricing.bill_cached={str(bill_cached).lower()}"]) == 0
        return {e["model"]: e for e in read_manifest(str(tmp_path / out))["usage"]["cost"]["by_stage_model"]}["gpt-4o"]

    with OpenAIStubServer() as srv:
        cold = run("cold", True, srv)
        sent = srv.request_count
        warm, free = run("warm", True, srv), run("free", False, srv)
        assert srv.request_count == sent  # both reruns came from the cache
    assert (cold["requests"], cold["cached"]) == (5, 0) and cold["cost"] > 0
    assert (warm["requests"], warm["cached"]) == (0, 5)
    assert (warm["cached_prompt_tokens"], warm["cached_completion_tokens"]) == (cold["prompt_tokens"], cold["completion_tokens"])
    assert warm["cost"] == pytest.approx(cold["cost"]) and free["cost"] == 0
