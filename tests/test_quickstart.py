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
def test_quickstart_small_runs_every_stage(ray_session, tmp_path, capfd):
    from pipeline.metrics import score
    from pipeline.quickstart import STUDENTS
    from ray_jobs import quickstart

    out = str(tmp_path / "qs")
    assert quickstart.main(["--out", out, "--small", "--port", str(free_port())]) == 0
    terminal = capfd.readouterr().out
    results = json.load(open(os.path.join(out, "report", "results.json")))
    table = {(row["setting"], row["dataset"]): row for row in results["table"]}
    folders = {s["name"]: s["lineage"]["predictions"] for s in results["settings"]}
    trained = [n for n in STUDENTS if os.path.exists(os.path.join(out, "students", n, "config.json"))]
    skipped = [n for n in STUDENTS if n not in trained]
    assert trained, "no student had training rows"
    for name in skipped:  # a student without rows is said to be skipped, on the terminal
        assert f"{name}: no training rows" in terminal

    # one line per stage on the terminal, the logs in a file; the summary table printed at the end
    assert "train teacher: done" in terminal and "evaluate: done" in terminal and "| setting |" in terminal
    assert "TrainingReport" not in terminal
    log_text = open(os.path.join(out, "logs", "quickstart.log")).read()  # Ray's own output went there, not to the terminal
    assert log_text and "core_worker" not in terminal and "MapBatches" not in terminal

    # every setting answered every test question of every family once; the report's scores are the
    # per-question rows rescored here (quarantined rows count as wrong)
    assert {"single-stage teacher (direct)", "teacher QD + teacher QA (static)", "teacher QD + teacher QA (dynamic)",
            "untrained student + teacher QA"} <= set(folders)
    for name, folder in folders.items():
        rows = _rows(folder)
        assert len(rows) == len({r["id"] for r in rows}) == 36, name
        for dataset in {r["dataset"] for r in rows}:
            subset = [r for r in rows if r["dataset"] == dataset]
            rescored = [score(dataset, r["prediction"], r["answers"])["correct"] if not r.get("error") else False for r in subset]
            assert table[(name, dataset)]["score"] == pytest.approx(sum(rescored) / len(subset)), (name, dataset)
            assert table[(name, dataset)]["score_ci95"] is not None

    # the teacher was reached over HTTP (the served model names), the students in-process
    static = _rows(folders["teacher QD + teacher QA (static)"])
    assert {r["decomposer"] for r in static} == {"teacher-qd"} and {r["solver"] for r in static} == {"teacher-qa"}
    assert all(r["decomposer_prompt_tokens"] > 0 and r["solver_completion_tokens"] > 0 for r in static)

    # each trained student changed from the base it started from (the copy-pretrained student base, itself
    # changed by its pretraining from its random initialization)
    base = _weights(os.path.join(out, "student_base", "model"))
    init = _weights(os.path.join(out, "checkpoints", "student_base-base_model"))
    assert any((base[k] != init[k]).any() for k in base)
    for name in trained:
        student = _weights(os.path.join(out, "students", name))
        assert student.keys() == base.keys() and any((student[k] != base[k]).any() for k in student), name

    # the teacher's settings ran beside the students' training, the students' after them: teacher QD's decompositions
    # in S_E-T and S_E-A all came from the replies the static setting left in the run's one cache
    for name in ("S_E-T", "S_E-A"):
        if name in trained:
            manifest = json.load(open(os.path.join(folders[f"teacher QD + {name}"], "manifest.json")))
            decomposer = [m for m in manifest["usage"]["cost"]["by_stage_model"] if m["stage"] == "decomposer"]
            assert [(m["model"], m["cached"], m["requests"]) for m in decomposer] == [("teacher-qd", 36, 0)], name

    # dynamic decomposition (one call per follow-up, history re-sent) makes more calls than static
    dyn = [r for r in _rows(folders["teacher QD + teacher QA (dynamic)"]) if not r.get("error")]
    sta = [r for r in static if not r.get("error")]
    assert sum(r["decomposer_calls"] + r["solver_calls"] for r in dyn) >= sum(r["decomposer_calls"] for r in sta)
    assert os.path.getsize(os.path.join(out, "report", "metric.png")) > 1000
    assert "cost/q" in open(os.path.join(out, "report", "summary.md")).read()


def test_students_are_dealt_over_jobs_with_one_schedule_and_random_micro_batches(tmp_path):
    """Each student in exactly one job, decomposer and solver students on the same schedule, and every student
    on micro-batches of random rows (length-grouped batches decided what S_D-T learned: probe_batch_order)."""
    from pipeline.quickstart import STUDENTS, Quickstart, QuickstartConfig
    from training.config import TrainConfig

    qs = Quickstart(QuickstartConfig(out=str(tmp_path / "run")))
    jobs = qs.student_jobs(list(STUDENTS), 2)
    assert sorted(n for group, _ in jobs for n in group) == sorted(STUDENTS) and len(jobs) == 2
    runs = {r.name: r for _, cfg in jobs for r in TrainConfig.model_validate(cfg.model_dump()).runs}
    assert {r.data.pack_or_group for r in runs.values()} == {"none"}
    assert {(r.schedule.max_steps, r.optim.lr) for r in runs.values()} == {(qs.plan.decomposer.steps, qs.plan.decomposer.lr)}
    assert all(r.data.train_path.endswith(f"select/{STUDENTS[n]}/train") for n, r in runs.items())
    # started before select runs (start_students), they wait for its manifest, and a set it leaves empty is skipped
    assert {(r.data.wait_for, r.data.skip_if_empty) for r in runs.values()} == {(qs.p("select", "manifest.json"), True)}
    assert qs.student_jobs([], 2) == []


def test_the_served_teacher_leaves_every_cpu_to_the_student_jobs(tmp_path):
    """The teacher's app stays up from distillation to the last setting; while it idles, the students' train
    jobs (one CPU each, as many as the cluster has CPUs) must all fit beside it, so it reserves none."""
    from pipeline.quickstart import STUDENT_JOB_CPUS, TEACHER_QD, Quickstart, QuickstartConfig

    qs = Quickstart(QuickstartConfig(out=str(tmp_path / "run")))
    app = qs.serve_config(qs.p("teacher", "model"), TEACHER_QD)
    # colocated, the ingress's replicas are the app's only ones (the models' own deployment options do not apply)
    reserved = [app.ingress] if app.colocate else [app.decomposer, app.solver, app.ingress]
    assert [(d.ray_actor_options.num_cpus, d.ray_actor_options.num_gpus) for d in reserved] == [(0, 0)] * len(reserved)
    # as many replicas as asked (one per CPU in the run: served), all reserving none
    assert qs.serve_config(qs.p("teacher", "model"), TEACHER_QD, replicas=2).ingress.num_replicas == 2
    assert qs.product_config().ingress.num_replicas == 1
    # the students' jobs start while the teacher's holds its CPU (start_students): each reserves a token CPU
    _, job = qs.student_jobs(["S_D-T"], 1)[0]
    assert (job.scaling.num_workers, job.scaling.cpus_per_worker) == (1, STUDENT_JOB_CPUS) and 2 * STUDENT_JOB_CPUS < 1


def test_settings_share_one_response_cache_and_bill_its_replies_as_computed(tmp_path):
    """The teacher's greedy replies to identical requests are reused across settings (the run's cache), and every
    setting bills them at the model's price, so a cost per question does not depend on the settings' order; a
    setting that opts out (the served product: every call through the app) runs without the cache."""
    import dataclasses

    from pipeline.quickstart import Quickstart, QuickstartConfig

    qs = Quickstart(QuickstartConfig(out=str(tmp_path / "run")))
    teacher = tmp_path / "run" / "teacher" / "model"
    teacher.mkdir(parents=True)
    (teacher / "model.safetensors").write_bytes(b"weights, first teacher")
    settings = qs.all_settings("http://127.0.0.1:1")
    configs = [qs.infer_config(s) for s in settings]
    shared = {c.cache_dir for c in configs}
    assert len(shared) == 1 and shared.pop().startswith(qs.p("cache"))
    assert all(c.pricing.bill_cached for c in configs)
    alone = qs.infer_config(dataclasses.replace(settings[1], shares_cache=False))
    assert alone.cache_dir is None and alone.pricing.bill_cached
    # a retrained teacher in the same output never reads the first one's replies; trained students do not move the
    # folder (the teacher's settings run before they exist): they name their weights in the cache's keys
    students = tmp_path / "run" / "students" / "S_D-T"
    students.mkdir(parents=True)
    (students / "model.safetensors").write_bytes(b"weights, a student")
    assert qs.infer_config(settings[1]).cache_dir == configs[1].cache_dir
    (teacher / "model.safetensors").write_bytes(b"weights, retrained")
    assert qs.infer_config(settings[1]).cache_dir != configs[1].cache_dir


def test_the_product_app_starts_beside_the_teachers(tmp_path):
    """The product's app starts when S_D-R's train job ends, while the teacher's app still serves: it needs its own
    app name and route on Serve's one HTTP proxy, and like the teacher's it reserves no CPU."""
    from pipeline.quickstart import TEACHER_QD, Quickstart, QuickstartConfig

    qs = Quickstart(QuickstartConfig(out=str(tmp_path / "run")))
    teacher, product = qs.serve_config(qs.p("teacher", "model"), TEACHER_QD), qs.product_config()
    assert product.app_name != teacher.app_name and product.route_prefix != teacher.route_prefix
    assert product.http == teacher.http and product.base_url() == teacher.base_url() + product.route_prefix
    assert product.colocate and product.ingress.ray_actor_options.num_cpus == 0
    assert product.decomposer.model == qs.p("students", "S_D-R") and product.solver.backend.model == qs.p("teacher", "model")


def test_a_models_weights_digest_reads_two_ranges_of_each_file_from_any_storage(s3_bucket, tmp_path):
    """The digest that names a model in the response cache (and the quickstart's cache folder by its teacher) reads a
    weights file's first and last MiB through ``storage``: a model on S3 gets its local copy's digest without being
    downloaded, and a change at either end of a file changes it."""
    from pipeline import storage
    from pipeline.backends.hf_local import weights_digest

    local = tmp_path / "model"
    local.mkdir()
    weights = bytearray(os.urandom(3 << 20))  # 3 MiB: its middle MiB is in neither range
    (local / "model.safetensors").write_bytes(bytes(weights))
    (local / "config.json").write_text("{}")
    remote = f"{s3_bucket}/model"
    storage.copy_dir(str(local), remote)
    assert weights_digest(remote) == weights_digest(str(local)) != ""
    assert weights_digest(f"{s3_bucket}/no-model") == ""
    weights[-1] ^= 1
    storage.write_bytes(storage.join(remote, "model.safetensors"), bytes(weights))
    assert weights_digest(remote) != weights_digest(str(local))


def test_a_local_model_retrained_in_place_never_reads_its_predecessors_cached_replies(tiny_model_dir, tmp_path):
    """The quickstart's settings share one response cache from before the students exist to after; a local model
    is named in the cache's keys by its path and its weights, so a copy of it hits the same entries only if the
    weights are the same, and a model retrained into the same folder misses its predecessor's."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from pipeline.backends.base import Request, SamplingParams
    from pipeline.backends.cache import CachedBackend
    from pipeline.backends.hf_local import HFBackend, weights_digest

    model = str(tmp_path / "student")
    shutil.copytree(tiny_model_dir, model)
    assert weights_digest(model) == weights_digest(tiny_model_dir) != ""
    assert weights_digest(str(tmp_path)) == ""  # no weights: a hub name, named by itself
    cache, request, params = str(tmp_path / "cache"), [Request(messages=[{"role": "user", "content": "How old?"}])], SamplingParams(max_tokens=4)

    def ask() -> tuple[int, int]:
        backend = CachedBackend(HFBackend(model, device="cpu"), cache)
        backend.generate(request, params)
        return backend.hits, backend.misses

    assert ask() == (0, 1) and ask() == (1, 0)
    weights = _weights(model)
    save_file({k: v * 0.5 if v.dtype.kind == "f" else v for k, v in weights.items()}, os.path.join(model, "model.safetensors"))
    assert weights_digest(model) != weights_digest(tiny_model_dir)
    assert ask() == (0, 1) and ask() == (1, 0)
