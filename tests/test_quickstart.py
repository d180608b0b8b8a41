"""The quickstart in its small mode: the whole pipeline end to end on real local Ray.

Beyond "every stage ran", each check compares two things that are computed independently, so each can
fail: the report's figures against the per-question rows recomputed with pipeline.metrics, training
against the model it started from, the served student against the untrained one.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import free_port


def _rows(folder: str) -> list[dict]:
    from pipeline import storage, tables

    return [r for sub in ("data", "quarantine") if storage.exists(storage.join(folder, sub))
            for r in tables.read_rows(storage.join(folder, sub))]


def _weights(model_dir: str) -> dict:
    from safetensors.numpy import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


@pytest.mark.slow
def test_quickstart_small_runs_every_stage(ray_session, tmp_path):
    from pipeline.metrics import score
    from ray_jobs import quickstart

    out = str(tmp_path / "qs")
    assert quickstart.main(["--out", out, "--small", "--port", str(free_port())]) == 0
    results = json.load(open(os.path.join(out, "report", "results.json")))
    table = {row["setting"]: row for row in results["table"]}
    folders = {s["name"]: s["lineage"]["predictions"] for s in results["settings"]}
    assert set(table) == set(folders) == {"student S_D-R (served) + oracle", "teacher QD + oracle (static)",
                                          "teacher QD + oracle (dynamic)", "untrained tiny QD + oracle"}

    # the report's score and n are the per-question rows, rescored here (quarantined rows count as wrong)
    for name, folder in folders.items():
        rows = _rows(folder)
        assert len(rows) == table[name]["n"] == 16, name  # every held-out question, once
        rescored = [score("gsm8k", r["prediction"], r["answers"])["correct"] if not r.get("error") else False for r in rows]
        assert table[name]["score"] == pytest.approx(sum(rescored) / len(rows)), name

    # the student setting really went through the served app (the decomposer is the served model name)
    served = _rows(folders["student S_D-R (served) + oracle"])
    assert {r["decomposer"] for r in served} == {"divconq-decomposer"}
    assert all(r["decomposer_prompt_tokens"] > 0 and r["decomposer_completion_tokens"] > 0 for r in served)
    demo = json.load(open(os.path.join(out, "serve_demo.json")))
    assert "error" not in demo and demo["usage"]["decomposer"]["completion_tokens"] > 0, demo

    # training changed the model and lowered the validation loss; the student writes parseable
    # decompositions where the model it started from does not
    train_dir = os.path.join(out, "train")
    student, base = _weights(os.path.join(train_dir, "decomposer_correct", "model")), \
        _weights(os.path.join(train_dir, "checkpoints", "decomposer_correct-base_model"))
    assert student.keys() == base.keys() and any((student[k] != base[k]).any() for k in student)
    history = json.load(open(os.path.join(train_dir, "decomposer_correct", "model", "manifest.json")))["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"], history
    assert table["student S_D-R (served) + oracle"]["parse_rate"] > table["untrained tiny QD + oracle"]["parse_rate"]

    # dynamic decomposition (one call per subquestion, history re-sent) costs more tokens than static
    dynamic, static = table["teacher QD + oracle (dynamic)"], table["teacher QD + oracle (static)"]
    assert dynamic["calls_per_q"] > static["calls_per_q"]
    assert dynamic["decomposer_tokens_per_q"] + dynamic["solver_tokens_per_q"] > 2 * (static["decomposer_tokens_per_q"] + static["solver_tokens_per_q"])
    assert os.path.getsize(os.path.join(out, "report", "metric.png")) > 1000
