"""The terminal of a long job: its process output to a log file, one line per stage on the terminal."""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, TextIO

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


