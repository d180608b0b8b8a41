"""The quickstart in its small mode: the whole pipeline end to end on real local Ray."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import free_port


@pytest.mark.slow
def test_quickstart_small_runs_every_stage(ray_session, tmp_path):
    from ray_jobs import quickstart

    out = str(tmp_path / "qs")
    assert quickstart.main(["--out", out, "--small", "--port", str(free_port())]) == 0
    for stage in ("prepare", "generate", "solve", "select", "infer/student-sd_r-served", "infer/teacher-static", "report"):
        assert os.path.exists(os.path.join(out, stage, "manifest.json")), stage
    assert os.path.exists(os.path.join(out, "train", "decomposer_correct", "model", "model.safetensors"))
    results = json.load(open(os.path.join(out, "report", "results.json")))
    table = {row["setting"]: row for row in results["table"]}
    assert table["teacher QD + oracle (static)"]["score"] == 1.0
    assert table["student S_D-R (served) + oracle"]["n"] == 16  # every held-out question went through the served app
    dynamic, static = table["teacher QD + oracle (dynamic)"], table["teacher QD + oracle (static)"]
    assert dynamic["decomposer_tokens_per_q"] + dynamic["solver_tokens_per_q"] > 2 * (static["decomposer_tokens_per_q"] + static["solver_tokens_per_q"])
    demo = json.load(open(os.path.join(out, "serve_demo.json")))
    assert set(demo) >= {"subquestions", "subanswers", "answer", "usage"}
    assert os.path.getsize(os.path.join(out, "report", "metric.png")) > 1000
