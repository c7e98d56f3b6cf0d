"""Real server processes on 127.0.0.1 for the reliability suite, their memory, and the figures the suite reports.

A server is ``python -m chatstream serve --mock ...`` (or a script of this folder) started on a free port, polled
until GET /health answers, and stopped with SIGTERM (then SIGKILL) at the end. Figures (latency, RSS per round,
fuzz case counts) are printed and kept in ``artifacts/reliability/figures.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.live_server import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
FIGURES = REPO_ROOT / "artifacts" / "reliability" / "figures.json"
STARTUP_TIMEOUT_SEC = 60.0
AGENT = {"X-FastSession-Skip": "skip"}
"""Headers of a client without a session (an agent): the ops endpoints' default role."""


@dataclass
class ServerProcess:
    """A server subprocess listening on ``url``."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def rss_mb(self) -> float:
        """The server's resident memory in MiB."""
        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit status (SIGKILL after ``timeout``)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise


def mock_serve(*options: str) -> list[str]:
    """``chatstream serve --mock`` arguments."""
    return ["-m", "chatstream", "serve", "--mock", "--log-level", "warning", *options]


@contextlib.contextmanager
def serve(args: list[str], log_dir: Path, *, https: bool = False) -> Iterator[ServerProcess]:
    """Start ``python <args> --port N``; yield it once GET /health answers; stop it afterwards."""
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    log_path = log_dir / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, *args, "--port", str(port)], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    server = ServerProcess(f"{'https' if https else 'http'}://127.0.0.1:{port}", process, log_path)
    try:
        _wait_until_ready(server)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def _wait_until_ready(server: ServerProcess) -> None:
    context = ssl._create_unverified_context()  # the test's own self-signed certificate
    deadline = time.monotonic() + STARTUP_TIMEOUT_SEC
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited with {server.process.returncode}:\n{server.log()}")
        request = urllib.request.Request(server.url + "/health", headers=AGENT)
        try:
            with urllib.request.urlopen(request, timeout=2, context=context) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    pytest.fail(f"server did not answer GET /health within {STARTUP_TIMEOUT_SEC} s:\n{server.log()}")


def record_figure(name: str, value: Any) -> None:
    """Print a figure and keep it in artifacts/reliability/figures.json."""
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    figures = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    figures[name] = value
    FIGURES.write_text(json.dumps(figures, indent=2, sort_keys=True))
    print(f"[reliability] {name}: {value}")


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]
