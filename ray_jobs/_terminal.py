"""The terminal of a long job: its process output to a log file, one line per stage on the terminal."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, TextIO

# The lines of the log worth a glance while a stage runs: training steps and finished shards.
PROGRESS = re.compile(r"(train \S+: step \d+/\d+.*|\S+: \d+/\d+ shards, \d+ rows.*)$")


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [l for l in logging.Logger.manager.loggerDict.values() if isinstance(l, logging.Logger)]
    return [h for l in loggers for h in l.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


@contextmanager
def logs_to_file(path: str) -> Iterator[TextIO]:
    """Send this process's output (Ray's worker logs, logging, C++ core logs) to ``path``; yield the terminal.

    Three layers are redirected because each can bypass the others: file descriptors 1/2 (native code,
    subprocesses), ``sys.stdout``/``sys.stderr`` (Ray's driver prints worker logs through them, and a
    host such as pytest may point them elsewhere than fd 1/2), and logging handlers that captured the old
    stream objects when they were created (Ray Data's progress logger).
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    saved_streams = sys.stdout, sys.stderr
    with open(path, "a", buffering=1) as log_file:
        terminal = os.fdopen(os.dup(saved_out), "w", buffering=1)
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        sys.stdout = sys.stderr = log_file
        handlers = {h: h.stream for h in _stream_handlers() if h.stream in saved_streams}
        for handler in handlers:
            handler.setStream(log_file)
        try:
            yield terminal
        finally:
            for handler, stream in handlers.items():
                handler.setStream(stream)
            log_file.flush()
            sys.stdout, sys.stderr = saved_streams
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


