"""The shape of the code, as rules a change cannot break silently: the library (pipeline/, training/)
never imports the entry points (ray_jobs/); every job is ``run(cfg) -> Manifest`` in the library with
its command a thin shell over it; functions stay short; an import inside a function says why."""

from __future__ import annotations

import ast
import importlib
import inspect
import os

import pytest

from ray_jobs.cli import JOBS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = ("pipeline", "training")
MAX_FUNCTION_LINES = 80
LAZY_IMPORT_EXEMPT: tuple[str, ...] = ()


def python_files(*roots: str):
    for root in roots:
        for dirpath, _, names in os.walk(os.path.join(REPO, root)):
            for name in sorted(names):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    yield os.path.relpath(path, REPO), ast.parse(open(path, encoding="utf-8").read(), path)


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import anywhere in the module, inside functions too."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def test_the_library_never_imports_the_entry_points():
    upward = [f"{path}:{line} imports {module}" for path, tree in python_files(*LIBRARY)
              for line, module in imported_modules(tree) if module == "ray_jobs" or module.startswith("ray_jobs.")]
    assert not upward, "pipeline/ and training/ must not import ray_jobs/:\n" + "\n".join(upward)


@pytest.mark.parametrize("job", JOBS)
def test_every_job_is_a_library_run_returning_a_manifest(job):
    """``ray_jobs.<job>`` runs ``run(cfg) -> Manifest`` from the library, and its own functions are few
    lines (argument parsing and exit codes, nothing of the job's logic)."""
    module = importlib.import_module(f"ray_jobs.{job}")
    run = module.run
    assert run.__module__.split(".")[0] in LIBRARY, f"{job}: run comes from {run.__module__}"
    assert inspect.signature(run).return_annotation in ("Manifest", "'Manifest'"), f"{job}: {inspect.signature(run)}"
    source = inspect.getsource(module)
    functions = [n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    assert sum(n.end_lineno - n.lineno + 1 for n in functions) <= 40, f"ray_jobs/{job}.py should be a thin shell"


def test_no_long_functions():
    long = [f"{path}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for path, tree in python_files("pipeline", "training", "ray_jobs") for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them by meaning):\n" + "\n".join(long)


def test_an_import_inside_a_function_says_why_it_is_lazy():
    """Imports sit at module top, except optional or heavy dependencies needed only at run time, each with a
    ``# lazy: <reason>`` comment on its line or the line above."""
    unexplained = []
    for path, tree in python_files("pipeline", "training", "ray_jobs"):
        if path in LAZY_IMPORT_EXEMPT:
            continue
        lines = open(os.path.join(REPO, path), encoding="utf-8").read().splitlines()
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    here = " ".join(lines[max(0, node.lineno - 2):node.end_lineno])
                    if "# lazy:" not in here:
                        unexplained.append(f"{path}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not unexplained, "imports inside functions without a '# lazy: <reason>' comment:\n" + "\n".join(unexplained)


def test_validating_a_config_stays_cheap():
    """What ``divconq <job>`` imports before it validates the config (every job's module) pulls in neither Ray
    nor torch nor transformers: they are imported when a job runs (~1 s, ~3 s and ~2 s to import here)."""
    import subprocess
    import sys

    heavy = ("ray", "torch", "transformers", "deepspeed")
    code = ("import importlib, sys\nfrom ray_jobs.cli import JOBS\n[importlib.import_module('ray_jobs.' + j) for j in JOBS]\n"
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"importing the job configs imported {out.stdout.strip()}"


def test_a_job_runs_in_process_from_a_config_object_and_returns_its_manifest(tmp_path):
    """The README's Python use: load a shipped config, update nested sections, ``run(cfg)``; the returned
    Manifest is what the job wrote to manifest.json."""
    from pipeline.config import ConfigError, load_config, updated
    from pipeline.manifest import Manifest, read_manifest
    from pipeline.preparation import PrepareConfig, run

    cfg = load_config(PrepareConfig, os.path.join(REPO, "configs", "prepare.yaml"))
    source = cfg.sources[0].model_copy(update={"path": os.path.join(REPO, cfg.sources[0].path), "limit": 7})
    manifest = run(updated(cfg, {"sources": [source], "output": {"dir": str(tmp_path / "prep")}}))
    assert isinstance(manifest, Manifest) and manifest.job == "prepare" and manifest.counts["rows_out"] == 7
    assert read_manifest(str(tmp_path / "prep")) == manifest.to_dict()
    assert manifest.config["sources"][0]["limit"] == 7 and cfg.sources[0].limit is None  # the loaded config is untouched
    with pytest.raises(ConfigError, match=r"sources\.0\.limit"):
        updated(cfg, {"sources": [{"dataset": "gsm8k", "path": "x", "limit": -1}]})


def test_a_copy_of_a_config_keeps_the_backends_built_in_code():
    """``updated`` keeps only the fields that were set; a backend section built in code, its ``type`` left at
    the default, is still that backend in a copy of a copy (the quickstart updates the infer configs it built)."""
    from pipeline.backends import HFBackendConfig, OpenAIBackendConfig
    from pipeline.config import load_config, updated
    from pipeline.inference import InferConfig

    cfg = updated(load_config(InferConfig, os.path.join(REPO, "configs", "infer.yaml")),
                  {"decomposer": OpenAIBackendConfig(base_url="http://127.0.0.1:9/v1", model="qd"),
                   "solver": HFBackendConfig(model="/models/solver")})
    again = updated(cfg, {"pool": {"batch_size": 256}})
    assert isinstance(again.decomposer, OpenAIBackendConfig) and again.decomposer.model == "qd"
    assert isinstance(again.solver, HFBackendConfig) and again.solver.model == "/models/solver"
    assert again.pool.batch_size == 256
