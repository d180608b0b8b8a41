"""How busy the whole machine's cores were, stage by stage: the sampler behind the README's idle core-seconds.

    python -m benchmarks.machine_idle sample /tmp/qs23/cpu.txt &     # one line a second until killed
    divconq quickstart --out /tmp/qs23/run > /tmp/qs23/out.txt; kill %1
    python -m benchmarks.machine_idle summarize /tmp/qs23/cpu.txt --start 1796299996 \\
        --stages "teacher alone:100-219,gen+solve:232-307"

``sample`` writes ``<unix time> <busy cores over the last second> <MiB in use>`` from ``/proc/stat`` and
``/proc/meminfo`` (Linux), so it sees every process (Ray's daemons, actors, train workers), not only one tree.
``summarize`` gives each stage (seconds after ``--start``, from the quickstart's progress lines) its mean busy
cores and the core-seconds left idle, and the peak memory rise over the first sample.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional


def _cpu_times() -> tuple[int, int]:
    """(all jiffies, idle + iowait jiffies) since boot."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(fields[:8]), fields[3] + fields[4]


def _mib_in_use() -> int:
    info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
    return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) // 1024


def sample(path: str) -> None:
    cores = os.cpu_count() or 1
    total, idle = _cpu_times()
    with open(path, "a") as out:
        while True:
            time.sleep(1)
            t, i = _cpu_times()
            busy = cores * (1 - (i - idle) / max(1, t - total))
            out.write(f"{int(time.time())} {busy:.2f} {_mib_in_use()}\n")
            out.flush()
            total, idle = t, i


def summarize(path: str, start: int, stages: str) -> list[str]:
    cores = os.cpu_count() or 1
    rows = [(int(t) - start, float(b), int(m)) for t, b, m in (line.split() for line in open(path))]
    lines, idle_total = [], 0.0
    for stage in stages.split(","):
        name, span = stage.rsplit(":", 1)
        a, b = (int(x) for x in span.split("-"))
        busy = [c for t, c, _ in rows if a <= t < b]
        if busy:
            mean = sum(busy) / len(busy)
            idle_total += (cores - mean) * (b - a)
            lines.append(f"{name}: {a}-{b} s, {mean:.2f} of {cores} cores busy, {(cores - mean) * (b - a):.0f} core-s idle")
    lines.append(f"idle in these stages: {idle_total:.0f} core-s; memory in use rose {max(m for *_, m in rows) - rows[0][2]} MiB")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("out")
    z = sub.add_parser("summarize")
    z.add_argument("samples")
    z.add_argument("--start", type=int, required=True, help="unix time the run started")
    z.add_argument("--stages", required=True, help="name:from-to,... in seconds after --start")
    args = p.parse_args(argv)
    if args.cmd == "sample":
        sample(args.out)
    else:
        print("\n".join(summarize(args.samples, args.start, args.stages)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
