"""Shared helpers of the hand-run benchmarks: environment, machine info, load monitoring,
timing, shared inputs (prepared questions, tiny models) and writing results.

Every benchmark writes ``benchmarks/results/<name>.json`` (machine, load, parameters,
raw figures), ``<name>.md`` (the table plus notes) and, where a curve says more,
``<name>.png``. Scratch data goes to ``benchmarks/results/tmp/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import shutil
import socket
import sys
import threading
import time
from typing import Any, Iterable, Iterator, Optional, Sequence

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


# ---------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _version(mod: str) -> Optional[str]:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", None)
    except Exception:
        return None


def machine_info() -> dict[str, Any]:
    """CPU count and model, RAM, and the versions that matter for these figures."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = os.cpu_count()
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu_model": _cpu_model(),
        "ram_gib": _ram_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "ray": _version("ray"),
        "transformers": _version("transformers"),
        "deepspeed": None,
        "gpu": None,
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    try:
        from importlib.metadata import version

        info["deepspeed"] = version("deepspeed")  # no import: importing deepspeed is slow and noisy
    except Exception:
        pass
    return info


def machine_line(m: dict[str, Any]) -> str:
    return (f"{m['cpu_count']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM, no GPU" if not m.get("gpu") else
            f"{m['cpu_count']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM, GPU {m['gpu']}") + \
        f"; Python {m['python']}, torch {m['torch']}, Ray {m['ray']}, transformers {m['transformers']}, DeepSpeed {m['deepspeed']}"


# ---------------------------------------------------------------- load (is the machine shared right now?)
class TreeCPU:
    """CPU seconds used by this process and all its descendants (Ray's raylet/GCS, workers,
    actors) over a block, polled every ``interval`` s so short-lived processes are counted
    up to their last poll. CPU time is far less sensitive to other load than wall time,
    which makes "CPU per request" a useful figure on a shared machine."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self._seen: dict[tuple[int, float], float] = {}
        self._base: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.cpu_s = 0.0
        self.timeline: list[tuple[float, float, float]] = []

    def _poll(self) -> dict[tuple[int, float], float]:
        import psutil

        out = {}
        try:
            me = psutil.Process()
            procs = [me] + me.children(recursive=True)
        except psutil.Error:
            return out
        for p in procs:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    out[(p.pid, p.create_time())] = t.user + t.system
            except psutil.Error:
                pass
        return out

    def _total(self) -> float:
        return sum(v - self._base.get(k, 0.0) for k, v in self._seen.items())

    @staticmethod
    def _machine_busy_s() -> float:
        """Cumulative busy CPU seconds of the whole machine (all processes, ours and others)."""
        import psutil

        t = psutil.cpu_times()
        fields = t._asdict()
        total = sum(v for k, v in fields.items() if k not in ("guest", "guest_nice"))
        return total - fields.get("idle", 0.0) - fields.get("iowait", 0.0)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._seen.update(self._poll())
            self.timeline.append((time.monotonic(), self._total(), self._machine_busy_s()))

    def cores_between(self, t_a: float, t_b: float, machine: bool = False) -> Optional[float]:
        """Mean cores used by the tree (``machine=True``: by the whole machine) between two
        ``time.monotonic()`` instants, from the polls."""
        pts = [p for p in self.timeline if t_a <= p[0] <= t_b]
        if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
            return None
        i = 2 if machine else 1
        return (pts[-1][i] - pts[0][i]) / (pts[-1][0] - pts[0][0])

    def __enter__(self) -> "TreeCPU":
        self._base = self._poll()
        self._seen = dict(self._base)
        self.timeline = [(time.monotonic(), 0.0, self._machine_busy_s())]
        self._thread = threading.Thread(target=self._loop, daemon=True, name="tree-cpu")
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        self._seen.update(self._poll())
        self.cpu_s = self._total()
        self.timeline.append((time.monotonic(), self.cpu_s, self._machine_busy_s()))


class LoadMonitor:
    """Measures how busy the machine is with *other* work.

    ``background`` (before the benchmark starts): busy CPU of the whole machine over a
    couple of seconds while this process is idle, in cores. During the run a
    :class:`TreeCPU` polls this process tree's CPU (Ray workers and actors included, each
    counted up to its last poll even after it exits) and the whole machine's busy CPU; the
    difference is other people's work.
    """

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.background_cores: Optional[float] = None
        self.loadavg_start: Optional[list[float]] = None
        self._tree: Optional["TreeCPU"] = None

    def start(self, probe_s: float = 2.0) -> "LoadMonitor":
        import psutil

        self.loadavg_start = list(os.getloadavg())
        self.background_cores = round(psutil.cpu_percent(interval=probe_s) / 100 * (os.cpu_count() or 1), 2)
        self._tree = TreeCPU(self.interval).__enter__()
        return self

    def stop(self) -> dict[str, Any]:
        tree = self._tree
        own = busy = None
        if tree is not None:
            tree.__exit__(None, None, None)
            t0, t1 = tree.timeline[0][0], tree.timeline[-1][0]
            own = tree.cores_between(t0, t1)
            busy = tree.cores_between(t0, t1, machine=True)
        other = max(0.0, busy - own) if busy is not None and own is not None else None
        out = {
            "background_cores_before_start": self.background_cores,
            "loadavg_start": self.loadavg_start,
            "loadavg_end": list(os.getloadavg()),
            "mean_busy_cores_during": round(busy, 2) if busy is not None else None,
            "mean_own_cores_during": round(own, 2) if own is not None else None,
            "mean_other_cores_during": round(other, 2) if other is not None else None,
        }
        bg = max(self.background_cores or 0.0, other or 0.0)
        out["shared"] = bool(bg >= 0.25)
        out["note"] = (f"measured while other work ran (other processes used ~{bg:.2f} of {os.cpu_count()} cores; "
                       f"load average {self.loadavg_start[0]:.1f} at start): figures are noisy, re-run on an idle machine"
                       if out["shared"] else "machine otherwise idle during the run")
        return out


# ---------------------------------------------------------------- timing and stats
@contextlib.contextmanager
def timed(store: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        store[key] = time.perf_counter() - t0


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] if lo == hi else xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def steady_rate(times: Sequence[float], lo: float = 0.1, hi: float = 0.9) -> Optional[float]:
    """Events/s between the ``lo`` and ``hi`` quantiles of sorted event times (drops ramp-up and tail)."""
    ts = sorted(times)
    if len(ts) < 10:
        return None
    i, j = int(lo * (len(ts) - 1)), int(hi * (len(ts) - 1))
    span = ts[j] - ts[i]
    return (j - i) / span if span > 0 else None


def matmul_peak_gflops(threads: Optional[int] = None, n: int = 1024, seconds: float = 1.5) -> float:
    """Measured fp32 matmul GFLOP/s of torch on this machine (best of a few timed bursts)."""
    import torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(3):
            a @ b
        best = 0.0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            for _ in range(4):
                a @ b
            dt = time.perf_counter() - t0
            best = max(best, 4 * 2 * n**3 / dt / 1e9)
        return best
    finally:
        torch.set_num_threads(old)


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


def start_local_ray(num_cpus: int) -> float:
    """Start a local Ray like ``pipeline.jobs.init_ray`` does (no dashboard), but without forwarding
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
