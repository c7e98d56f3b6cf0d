"""``chatstream serve`` as a real process on 127.0.0.1 for the tests that kill, restart or multiply servers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SRC_DIR = Path(__file__).resolve().parents[1] / "src"
READY = "ChatStream is ready: "
STARTUP_TIMEOUT_SEC = 60.0


@dataclass
class ServeProcess:
    """A running ``chatstream serve``: its URL, its process, everything it printed so far."""

    process: subprocess.Popen[bytes]
    output: list[bytes] = field(default_factory=list)
    url: str = ""

    @property
    def text(self) -> str:
        return b"".join(self.output).decode("utf-8", errors="replace")

    def kill_9(self) -> None:
        """SIGKILL: no shutdown, no drain, nothing flushed."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_serve(*options: str) -> ServeProcess:
    """``python -m chatstream serve --mock --port 0 <options>``, once it listens (its URL read from stdout)."""
    env = {**os.environ, "PYTHONPATH": str(SRC_DIR), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "chatstream", "serve", "--mock", "--port", "0", "--log-level", "warning", *options]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    server = ServeProcess(process)
    threading.Thread(target=_collect, args=(server,), daemon=True).start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_SEC
    while READY not in server.text:
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"chatstream serve did not start:\n{server.text}")
        time.sleep(0.05)
    server.url = server.text.split(READY, 1)[1].split()[0].rstrip("/")
    return server


@contextlib.contextmanager
def serving(*options: str) -> Iterator[ServeProcess]:
    """:func:`start_serve`, stopped when the block ends (unless the test killed it)."""
    server = start_serve(*options)
    try:
        yield server
    finally:
        server.stop()


def _collect(server: ServeProcess) -> None:
    assert server.process.stdout is not None
    while chunk := os.read(server.process.stdout.fileno(), 4096):
        server.output.append(chunk)
