"""quickstart: the paper's experiment in miniature, offline, on a CPU; every model learned here.

prepare (a generated world) -> train the teacher -> serve it -> generate -> solve -> select ->
train the four students -> infer every setting (and through the served S_D-R) -> evaluate.

    divconq quickstart --out runs/quickstart          # the full miniature (README: Results)
    divconq quickstart --out /tmp/qs --small          # the CI-sized smoke run

The terminal shows one line per stage (and the stage's latest progress: steps, loss, ETA, shards);
Ray's and the workers' logs go to <out>/logs/quickstart.log.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, TextIO

from pipeline import storage
from pipeline.config import ConfigError, load_config
from pipeline.quickstart import QuickstartConfig, run
from ray_jobs._shell import config_error, run_main, setup_logging

# The lines of the log worth a glance while a stage runs: training steps and finished shards.
PROGRESS = re.compile(r"(train \S+: step \d+/\d+.*|\S+: \d+/\d+ shards, \d+ rows.*)$")


@contextmanager
def logs_to_file(path: str) -> Iterator[TextIO]:
    """Send this process's stdout/stderr (Ray's worker logs, logging) to ``path``; yield the terminal."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    with open(path, "a", buffering=1) as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        terminal = os.fdopen(os.dup(saved_out), "w", buffering=1)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            terminal.close()


class StageLines:
    """One line per stage; while a stage runs, its latest progress line from the log rewrites the line below it."""

    def __init__(self, terminal: TextIO, log_path: str) -> None:
        self.terminal, self.log_path, self.t0 = terminal, log_path, time.time()
        self.live = terminal.isatty()
        self.stop = threading.Event()
        if self.live:
            threading.Thread(target=self._follow, daemon=True).start()

    def __call__(self, line: str) -> None:
        self.terminal.write(f"\r\033[K[{time.time() - self.t0:6.0f} s] {line}\n" if self.live else
                            f"[{time.time() - self.t0:6.0f} s] {line}\n")
        self.terminal.flush()

    def _follow(self) -> None:
        # polling, not a notification: the log is written by Ray's log monitor in other processes
        with open(self.log_path, errors="replace") as f:
            f.seek(0, os.SEEK_END)
            while not self.stop.wait(1.0):
                latest = None
                for line in f.readlines():
                    m = PROGRESS.search(line.strip())
                    latest = m.group(1) if m else latest
                if latest:
                    self.terminal.write(f"\r\033[K         {latest[:150]}")
                    self.terminal.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="divconq quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quickstart", help="output directory (local path or storage URL: s3://, gs://...)")
    parser.add_argument("--small", action="store_true", help="a smaller, faster run (CI)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port for the served app (127.0.0.1)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(QuickstartConfig, overrides={"out": args.out, "small": args.small, "port": args.port})
    except ConfigError as e:
        raise config_error("quickstart", e) from None
    local_out = storage.localize(cfg.out) if storage.is_local(cfg.out) else os.path.join("/tmp", "divconq-quickstart")
    log_path = os.path.join(local_out, "logs", "quickstart.log")

    def body() -> None:
        with logs_to_file(log_path) as terminal:
            setup_logging()
            stages = StageLines(terminal, log_path)
            terminal.write(f"divconq quickstart: logs in {log_path}\n")
            try:
                manifest = run(cfg, stages)
            finally:
                stages.stop.set()
        report = manifest.report
        print(storage.read_text(storage.join(os.path.dirname(report), "summary.md")))
        print(f"Report: {report}\nPlots: {os.path.dirname(report)}/*.png\nLogs: {log_path}")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
