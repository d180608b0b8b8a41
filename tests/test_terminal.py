"""The quickstart's terminal: everything a process prints goes to the log file, only stage lines to the terminal."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from ray_jobs._terminal import StageLines, logs_to_file


def test_logs_to_file_takes_fds_sys_streams_and_existing_handlers(tmp_path, capfd):
    handler = logging.StreamHandler(sys.stderr)  # made before the redirect, as Ray Data's logger is
    logger = logging.getLogger("divconq.test_terminal")
    logger.addHandler(handler)
    logger.propagate = False
    log_path = str(tmp_path / "logs" / "run.log")
    try:
        with logs_to_file(log_path) as terminal:
            StageLines(terminal, log_path)("stage one: done")
            print("through sys.stdout")
            logger.warning("through a handler made before")
            os.write(2, b"through fd 2\n")
            subprocess.run([sys.executable, "-c", "print('from a child process')"], check=True)
        logger.warning("after the context")
    finally:
        logger.removeHandler(handler)
    seen = capfd.readouterr()
    log = open(log_path).read()
    for line in ("through sys.stdout", "through a handler made before", "through fd 2", "from a child process"):
        assert line in log and line not in seen.out + seen.err, line
    assert "stage one: done" in seen.out and "stage one: done" not in log
    assert "after the context" in seen.err and "after the context" not in log
