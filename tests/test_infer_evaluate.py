"""infer (static, dynamic, single-stage, resumed) and evaluate on fixed predictions."""

from __future__ import annotations

import json
import os
import tempfile

import pytest

from pipeline import storage, tables
from pipeline.evaluation import EvaluateConfig, EvaluateOutput, SettingRef, evaluate
from pipeline.inference import INFER_SCHEMA
from ray_jobs import infer
from tests.conftest import REPO

CONFIG = os.path.join(REPO, "configs", "infer.yaml")


def run_infer(prepared, out, *overrides):
    return infer.main(["--config", CONFIG, f"input.path={prepared}", f"output.dir={out}", "input.limit=12",
                       "output.shard_size=4", *overrides])


@pytest.fixture(scope="module")
def static_and_dynamic(ray_session, prepared_samples, tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    outs = {}
    for mode in ("static", "dynamic"):
        outs[mode] = str(root / mode)
        assert run_infer(prepared_samples, outs[mode], f"mode={mode}", f"setting=ref {mode}") == 0
    return outs


def test_static_and_dynamic_rows_are_scored_and_costed(static_and_dynamic):
    static = tables.read_rows(static_and_dynamic["static"])
    dynamic = tables.read_rows(static_and_dynamic["dynamic"])
    assert len(static) == len(dynamic) == 12
    assert all(r["decomposer_calls"] == 1 and r["solver_calls"] == 1 for r in static)
    assert all(r["correct"] and r["em"] == 1.0 and r["rouge_l"] == 1.0 for r in static)  # gold decomposition + oracle
    assert all(r["decomposer_calls"] >= 2 for r in dynamic)
    tok = lambda rows: sum(r["decomposer_prompt_tokens"] + r["solver_prompt_tokens"] for r in rows)
    assert tok(dynamic) > 2 * tok(static)  # self-ask re-sends its growing transcript every step


def test_single_stage_direct_mode(ray_session, prepared_samples, tmp_path):
    out = str(tmp_path / "direct")
    assert run_infer(prepared_samples, out, "mode=direct", "setting=direct", "decomposer=null") == 0
    rows = tables.read_rows(out)
    assert len(rows) == 12 and all(r["decomposer_calls"] == 0 and r["solver_calls"] == 1 for r in rows)


def test_static_mode_without_decomposer_is_a_clear_error(ray_session, prepared_samples, tmp_path, caplog):
    assert run_infer(prepared_samples, str(tmp_path / "x"), "decomposer=null") == 1
    assert "needs a `decomposer`" in caplog.text


def test_infer_resumes_after_partial_run(ray_session, prepared_samples, static_and_dynamic, tmp_path):
    import shutil

    out = str(tmp_path / "static")
    shutil.copytree(static_and_dynamic["static"], out)
    # Simulate a crash after two shards committed: remove the rest's markers and half their output.
    done = sorted(os.listdir(os.path.join(out, "_done")))
    for name in done[2:]:
        os.remove(os.path.join(out, "_done", name))
    os.remove(os.path.join(out, "data", done[-1].replace(".json", ".parquet")))
    os.remove(os.path.join(out, "manifest.json"))
    assert run_infer(prepared_samples, out, "mode=static", "setting=ref static") == 0
    rows = tables.read_rows(out)
    assert sorted(r["request_id"] for r in rows) == sorted(r["request_id"] for r in tables.read_rows(static_and_dynamic["static"]))


def _fixed_row(i, dataset, correct, f1, dec=(10, 5), sol=(30, 15)):
    return {"id": f"{dataset}:t:{i}", "dataset": dataset, "split": "t", "question": "q", "context": "", "answers": ["1"],
            "gold_subquestions": None, "gold_subanswers": None, "request_id": f"{dataset}:t:{i}", "setting": "s",
            "mode": "static", "decomposer": "d", "solver": "s", "prompt_version": "v1", "subquestions": ["a?"],
            "decomposition_parsed": True, "subanswers": ["1"], "decomposer_text": "1. a?", "solver_text": "x",
            "prediction": "1", "em": float(correct), "f1": f1, "correct": correct, "rouge_l": None, "count_match": None,
            "decomposer_calls": 1, "solver_calls": 1, "decomposer_prompt_tokens": dec[0], "decomposer_completion_tokens": dec[1],
            "solver_prompt_tokens": sol[0], "solver_completion_tokens": sol[1], "latency_s": 0.1, "error": None}


def test_evaluate_on_fixed_predictions_gives_expected_table(tmp_path):
    pred = str(tmp_path / "pred")
    rows = [_fixed_row(i, "gsm8k", i < 3, float(i < 3)) for i in range(4)] + [_fixed_row(i, "drop", True, f) for i, f in enumerate([1.0, 0.5])]
    tables.write_rows(os.path.join(pred, "data", "shard-00000.parquet"), rows, INFER_SCHEMA)
    out = str(tmp_path / "eval")
    cfg = EvaluateConfig(settings=[SettingRef(name="fixed", predictions=pred)], output=EvaluateOutput(dir=out),
                         pricing={"decomposer": {"prompt_per_1k": 1.0, "completion_per_1k": 2.0},
                                  "solver": {"prompt_per_1k": 1.0, "completion_per_1k": 2.0}})
    results = evaluate(cfg)
    table = {s["dataset"]: s for s in results["table"]}
    assert table["gsm8k"]["score"] == pytest.approx(0.75) and table["gsm8k"]["metric"] == "exact_match"
    assert table["drop"]["score"] == pytest.approx(0.75) and table["drop"]["metric"] == "f1"
    assert table["gsm8k"]["decomposer_tokens_per_q"] == 15 and table["gsm8k"]["solver_tokens_per_q"] == 45
    assert table["gsm8k"]["decomposer_token_share"] == pytest.approx(0.25)
    assert table["gsm8k"]["cost_per_q"] == pytest.approx((10 + 10 + 30 + 30) / 1000)
    assert table["gsm8k"]["decomposer_cost_share"] == pytest.approx(0.25)
    report = open(os.path.join(out, "report.md")).read()
    assert "| gsm8k | fixed | exact_match | 75.0 | 100.0 | 4 | – | – | 100.0 |" in report
    assert "| drop | fixed | f1 | 75.0 | 100.0 | 2 |" in report
    assert os.path.getsize(os.path.join(out, "metric.png")) > 1000 and os.path.getsize(os.path.join(out, "tokens.png")) > 1000
    assert json.load(open(os.path.join(out, "results.json")))["settings"][0]["lineage"]["rows"] == 6


def test_quarantined_questions_count_as_wrong_with_coverage_beside(tmp_path):
    """The paper divides by all questions: 3 right of 4 answered + 1 quarantined is 60 %, coverage 80 %."""
    pred = str(tmp_path / "pred")
    tables.write_rows(os.path.join(pred, "data", "shard-00000.parquet"),
                      [_fixed_row(i, "gsm8k", i < 3, float(i < 3)) for i in range(4)], INFER_SCHEMA)
    failed = {**_fixed_row(4, "gsm8k", False, 0.0), "prediction": None, "em": None, "f1": None, "correct": None,
              "error": "request gsm8k:t:4, stage input: input row has no 'question'"}
    tables.write_rows(os.path.join(pred, "quarantine", "shard-00000.parquet"), [failed], INFER_SCHEMA)
    results = evaluate(EvaluateConfig(settings=[SettingRef(name="q", predictions=pred)],
                                      output=EvaluateOutput(dir=str(tmp_path / "eval"))))
    (row,) = results["table"]
    assert row["n"] == 5 and row["answered"] == 4 and row["quarantined"] == 1
    assert row["score"] == pytest.approx(0.6) and row["accuracy"] == pytest.approx(0.6) and row["coverage"] == pytest.approx(0.8)
    assert "| gsm8k | q | exact_match | 60.0 | 80.0 | 5 |" in open(tmp_path / "eval" / "report.md").read()
    assert results["settings"][0]["lineage"]["quarantined"] == 1


def test_evaluate_writes_to_s3(s3_bucket, tmp_path):
    pred = f"{s3_bucket}/pred"
    tables.write_rows(storage.join(pred, "data", "shard-00000.parquet"), [_fixed_row(0, "bamboogle", True, 1.0)], INFER_SCHEMA)
    pngs_here = lambda: {f for f in os.listdir(tempfile.gettempdir()) if f.endswith(".png")}  # noqa: E731
    before = pngs_here()
    evaluate(EvaluateConfig(settings=[SettingRef(name="s3", predictions=pred)], output=EvaluateOutput(dir=f"{s3_bucket}/eval")))
    assert "| bamboogle | s3 | accuracy | 100.0 | 100.0 | 1 |" in storage.read_text(f"{s3_bucket}/eval/report.md")
    assert storage.exists(f"{s3_bucket}/eval/metric.png")
    assert pngs_here() == before  # the plots went to S3 only: no copy left in the machine's temp folder
