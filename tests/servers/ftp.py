"""A real FTP server (pyftpdlib, in its own process) on 127.0.0.1: the non-local, non-S3 storage of the
tests. fsspec ships ``ftp://``; unlike ``memory://`` it is shared by every process (Ray actors, Train
workers), and pyftpdlib is pure Python, so it runs wherever the tests do."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Optional

from tests.servers import free_port


class FTPServer:
    """``with FTPServer(root) as ftp: ftp.url`` -> ``ftp://127.0.0.1:<port>``, serving ``root``.

    Anonymous login with write access, unless ``user``/``password`` are given."""

    def __init__(self, root: str, user: Optional[str] = None, password: Optional[str] = None):
        self.root, self.user, self.password = root, user, password
        self.port = free_port()
        self.url = f"ftp://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "FTPServer":
        os.makedirs(self.root, exist_ok=True)
        cmd = [sys.executable, "-m", "pyftpdlib", "-i", "127.0.0.1", "-p", str(self.port), "-d", self.root, "-w"]
        if self.user:
            cmd += ["-u", self.user, "-P", self.password or ""]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:  # ready when its port accepts a connection
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the FTP server on port {self.port} did not start")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def __enter__(self) -> "FTPServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
