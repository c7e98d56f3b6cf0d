"""``chatstream serve``'s HTTP server: uvicorn run until interrupted, announced once it listens.

The ready line (``ChatStream is ready: <url>`` on stdout) carries the real port with ``--port 0``. The SIGTERM that
uvicorn raises again after its graceful shutdown ends the command with status 0, as a service manager expects.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

logger = logging.getLogger(__name__)


def run_uvicorn(config: Any) -> None:
    """Run uvicorn until interrupted, printing the URL on stdout once it listens (the real port with --port 0)."""
    import uvicorn

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                print(f"ChatStream is ready: {listening_url(self)}", flush=True)

    _exit_quietly_on_sigterm()
    try:
        AnnouncingServer(config).run()
    except (KeyboardInterrupt, _Terminated):
        # uvicorn has already shut down gracefully (streams drained); it re-raises the signal for the caller to see
        logger.info("Stopped")


class _Terminated(Exception):
    """SIGTERM arrived (uvicorn raises the signal again once it has shut down)."""


def _exit_quietly_on_sigterm() -> None:
    """Make the SIGTERM that uvicorn re-raises after a graceful shutdown end the command with status 0 (a service
    manager's normal stop), instead of killing the process with the signal's default action."""
    if threading.current_thread() is not threading.main_thread():
        return

    def terminated(signum: int, frame: Any) -> None:
        raise _Terminated()

    signal.signal(signal.SIGTERM, terminated)


def listening_url(server: Any) -> str:
    """The URL ``server`` listens on: its bound port (the real one with --port 0), 127.0.0.1 for any address."""
    host, port = server.config.host, server.config.port
    for listener in getattr(server, "servers", []):
        for sock in listener.sockets:
            port = sock.getsockname()[1]
            break
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
