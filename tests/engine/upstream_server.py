"""A real ``python -m chatstream serve`` process on 127.0.0.1, as the upstream of the upstream-engine tests."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from tests.live_server import free_port

ROOT_DIR = Path(__file__).resolve().parents[2]
SRC_DIR = ROOT_DIR / "src"
CHATSTREAM_SERVE = ("-m", "chatstream", "serve")
STARTUP_TIMEOUT_SEC = 90.0
READY = "ChatStream is ready: "


class UpstreamServer:
    """``chatstream serve ARGV`` on a fixed port; ``start()`` waits until it listens, ``kill()`` is a SIGKILL.

    ``launcher``: the Python arguments before ARGV, for another server that takes ``chatstream serve``'s ``--port``,
    ``--log-level`` and ``--drain-timeout`` and prints its ready line (``-m tests.server.scripted_upstream``).
    """

    def __init__(self, argv: list[str], port: int | None = None, launcher: tuple[str, ...] = CHATSTREAM_SERVE) -> None:
        self.argv = argv
        self.launcher = launcher
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._stdout: list[bytes] = []
        self._stderr: list[bytes] = []

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The base URL as OpenAI clients take it."""
        return f"{self.root}/v1"

    def start(self) -> UpstreamServer:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(SRC_DIR), str(ROOT_DIR))), "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, *self.launcher, "--port", str(self.port), "--log-level", "warning"]
        argv += ["--drain-timeout", "0"]  # stop() needs no graceful drain
        self._stdout, self._stderr = [], []
        self.proc = subprocess.Popen([*argv, *self.argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        for pipe, chunks in ((self.proc.stdout, self._stdout), (self.proc.stderr, self._stderr)):
            threading.Thread(target=_read, args=(pipe, chunks), daemon=True).start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_SEC
        while READY not in b"".join(self._stdout).decode(errors="replace"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"the upstream did not start: {self.stderr()[-2000:]}")
            time.sleep(0.05)
        return self

    def stderr(self) -> str:
        return b"".join(self._stderr).decode(errors="replace")

    def kill(self) -> None:
        """SIGKILL: the process dies mid-stream, its connections drop."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def _read(pipe: IO[bytes] | None, chunks: list[bytes]) -> None:
    assert pipe is not None
    while chunk := os.read(pipe.fileno(), 4096):
        chunks.append(chunk)
