"""Shared helpers of the hand-run benchmarks: environment, shared inputs (prepared questions, tiny
models), local Ray, and writing results (measuring itself is in measure.py).

Every benchmark writes ``benchmarks/results/<name>.json`` (machine, load, parameters,
raw figures), ``<name>.md`` (the table plus notes) and, where a curve says more,
``<name>.png``. Scratch data goes to ``benchmarks/results/tmp/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shutil
import socket
import sys
import time
from typing import Any, Iterable, Optional, Sequence

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
TMP_DIR = os.path.join(RESULTS_DIR, "tmp")
SAMPLES = os.path.join(REPO, "data", "samples")

if REPO not in sys.path:  # `python benchmarks/x.py` as well as `python -m benchmarks.x`
    sys.path.insert(0, REPO)


# ---------------------------------------------------------------- environment
def setup_env(log_level: str = "WARNING") -> None:
    """Offline, CPU-only, quiet: the same knobs the tests use, plus no progress bars."""
    for k, v in {
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "RAY_DEDUP_LOGS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "DIVCONQ_LOG_LEVEL": log_level,
        "PYTHONWARNINGS": "ignore",
    }.items():
        if v:
            os.environ.setdefault(k, v)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("ray", "ray.data", "ray.train", "ray.serve", "deepspeed", "DeepSpeed", "httpx", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)


def quiet_ray_data() -> None:
    """No Ray Data progress bars in the benchmark output (driver side)."""
    try:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        if hasattr(ctx, "enable_operator_progress_bars"):
            ctx.enable_operator_progress_bars = False
        if hasattr(ctx, "print_on_execution_start"):
            ctx.print_on_execution_start = False
    except Exception:  # pragma: no cover - cosmetic only
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


from benchmarks.measure import LoadMonitor, machine_info, machine_line  # noqa: E402


# ---------------------------------------------------------------- shared inputs
def prepared_questions(train: int = 1000, test: int = 100) -> str:
    """GSM8K samples (socratic train + test) run through ``prepare``; cached under results/tmp."""
    from pipeline.data import SourceConfig
    from pipeline.preparation import PrepareConfig, PrepareOutput, prepare

    out = os.path.join(TMP_DIR, f"prepared-gsm8k-{train}-{test}")
    if os.path.exists(os.path.join(out, "manifest.json")) or os.path.isdir(os.path.join(out, "data")):
        return out
    cfg = PrepareConfig(
        sources=[
            SourceConfig(dataset="gsm8k", path=os.path.join(SAMPLES, "gsm8k", "train_socratic.jsonl"), split="train", limit=train),
            SourceConfig(dataset="gsm8k", path=os.path.join(SAMPLES, "gsm8k", "test_socratic.jsonl"), split="test", limit=test),
        ],
        output=PrepareOutput(dir=out),
    )
    prepare(cfg)
    return out


def tiny_model(hidden: int = 128, layers: int = 4, vocab: int = 1024, heads: int = 4) -> str:
    """A tiny random Llama + BPE tokenizer trained on the GSM8K sample (``build_tiny_model``), cached."""
    from pipeline import tables
    from pipeline.tiny_models import build_tiny_model, corpus_texts

    out = os.path.join(TMP_DIR, "models", f"tiny-llama-h{hidden}-l{layers}-v{vocab}")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    src = prepared_questions()
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_model(tmp, corpus_texts(tables.iter_rows(src)), vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                     num_heads=heads)
    os.replace(tmp, out)
    return out


def scratch(name: str, clean: bool = True) -> str:
    path = os.path.join(TMP_DIR, name)
    if clean:
        shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    return path


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- output
def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "–"
        if abs(x) < 5e-4:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 100:
            return f"{x:.1f}"
        if abs(x) >= 1:
            return f"{x:.2f}"
        return f"{x:.{digits}g}"
    return str(x)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(c) for c in r) + " |")
    return "\n".join(lines)


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a fast, small run (checks that it works; noisier figures)")
    p.add_argument("--out", default=RESULTS_DIR, help="results directory (default benchmarks/results)")
    return p


class Report:
    """One benchmark run: starts the load monitor, collects results, writes json/md/png."""

    def __init__(self, name: str, args: argparse.Namespace, title: str):
        setup_env()
        self.name = name
        self.title = title
        self.args = args
        self.quick = bool(getattr(args, "quick", False))
        self.out_dir = getattr(args, "out", RESULTS_DIR)
        self.started = time.time()
        self.command = "python -m benchmarks." + name + (" --quick" if self.quick else "")
        print(f"== {name} ({'quick' if self.quick else 'full'}) ==", flush=True)
        self.machine = machine_info()
        self.load = LoadMonitor().start()

    def write(self, results: dict[str, Any], table_md: str, notes_md: str = "", figure=None,
              params: Optional[dict[str, Any]] = None) -> dict[str, str]:
        load = self.load.stop()
        wall = time.time() - self.started
        os.makedirs(self.out_dir, exist_ok=True)
        paths = {k: os.path.join(self.out_dir, f"{self.name}.{k}") for k in ("json", "md", "png")}
        payload = {
            "benchmark": self.name,
            "mode": "quick" if self.quick else "full",
            "command": self.command,
            "started_at": _dt.datetime.fromtimestamp(self.started).isoformat(timespec="seconds"),
            "wall_s": round(wall, 1),
            "machine": self.machine,
            "load": load,
            "params": params or {},
            "results": results,
        }
        with open(paths["json"], "w") as f:
            json.dump(payload, f, indent=2, default=_json_default)
        md = [
            f"# {self.title}",
            "",
            f"`{self.command}` — {payload['started_at']}, {payload['mode']} run, {wall:.0f} s wall.",
            "",
            f"Machine: {machine_line(self.machine)}.",
            "",
            f"Load: {load['note']}.",
            "",
            table_md.strip(),
            "",
        ]
        if notes_md.strip():
            md += [notes_md.strip(), ""]
        if figure is not None:
            figure.savefig(paths["png"], dpi=120, bbox_inches="tight")
            md += [f"![{self.name}]({self.name}.png)", ""]
            import matplotlib.pyplot as plt

            plt.close(figure)
        else:
            paths.pop("png")
        with open(paths["md"], "w") as f:
            f.write("\n".join(md))
        print()
        print(table_md.strip())
        print()
        print(f"Load: {load['note']}.")
        print("wrote " + ", ".join(os.path.relpath(p, REPO) for p in paths.values()) + f" ({wall:.0f} s)", flush=True)
        return paths


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def run_job(main, argv: list[str], out_dir: str) -> tuple[float, dict[str, Any]]:
    """Run a job's ``main(argv)`` in this process: its wall time and the manifest it wrote to ``out_dir``."""
    quiet_ray_data()
    t0 = time.perf_counter()
    rc = main(argv)
    wall = time.perf_counter() - t0
    if rc:
        raise RuntimeError(f"{getattr(main, '__module__', 'job')} exited {rc}")
    with open(os.path.join(out_dir, "manifest.json")) as f:
        return wall, json.load(f)


def start_local_ray(num_cpus: int) -> float:
    """Start a local Ray like ``pipeline.cluster.init_ray`` does (no dashboard), but without forwarding
    worker logs to this terminal; returns the start-up time in seconds."""
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return time.perf_counter() - t0


def shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:
        pass


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as _plt

    return _plt
