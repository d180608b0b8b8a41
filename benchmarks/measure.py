"""Measuring on a shared machine: machine info, CPU of a process tree (TreeCPU), other load on the
machine (LoadMonitor), timing and rate helpers, and the fp32 matmul peak."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import threading
import time
from typing import Any, Callable, Iterator, Optional, Sequence


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
        # each process's command line at its last poll (a Ray worker retitles itself when it becomes an actor)
        self._names: dict[tuple[int, float], str] = {}
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
                    key = (p.pid, p.create_time())
                    out[key] = t.user + t.system
                    self._names[key] = " ".join(p.cmdline())
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

    def cpu_by(self, group: Callable[[str], str]) -> dict[str, float]:
        """CPU seconds over the block by ``group(command line)`` of each process (its last polled one)."""
        out: dict[str, float] = {}
        for key, cpu in self._seen.items():
            name = group(self._names.get(key, ""))
            out[name] = out.get(name, 0.0) + cpu - self._base.get(key, 0.0)
        return out

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
