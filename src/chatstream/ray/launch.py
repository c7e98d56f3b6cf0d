"""Running the Ray application from the command line (``chatstream serve --ray``): start or join Ray, deploy, wait."""

from __future__ import annotations

import logging
import signal
import socket
import threading

import ray
from ray import serve

from chatstream.ray.app import FrontSettings, build_app
from chatstream.ray.spec import EngineSpec, ReplicaSettings

logger = logging.getLogger(__name__)

APP_NAME = "chatstream"


def serve_until_interrupted(
    spec: EngineSpec,
    replicas: ReplicaSettings,
    front: FrontSettings,
    *,
    address: str | None,
    host: str,
    port: int,
) -> None:
    """Deploy ``build_app(spec, replicas, front)`` behind Serve's HTTP proxy on ``host:port`` and block until
    SIGINT or SIGTERM; then remove the application, and stop Ray when this call started it.

    ``port`` 0 picks a free one. ``address``: a running cluster ("auto", or "HOST:6379" of ``ray start --head``);
    None starts a local Ray in this process, with this machine's CPUs and GPUs.
    """
    started_ray = address is None and not ray.is_initialized()
    port = port or _free_port(host)
    ray.init(address=address, namespace="chatstream", configure_logging=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(spec, replicas, front), name=APP_NAME, route_prefix="/")
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        print(f"ChatStream is ready: http://{shown}:{port}/ ({_replica_text(replicas)} on Ray)", flush=True)
        _wait_for_signal()
    finally:
        logger.info("removing the Ray Serve application %r", APP_NAME)
        try:
            serve.delete(APP_NAME)
        finally:
            if started_ray:
                serve.shutdown()
                ray.shutdown()


def default_gpus_per_replica(mock: bool, device: str | None) -> float:
    """One GPU per replica where this machine has CUDA and the model should run on it, else none."""
    if mock or (device is not None and not device.startswith("cuda")):
        return 0.0
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host if host not in ("", "::") else "0.0.0.0", 0))
        return int(sock.getsockname()[1])


def _replica_text(replicas: ReplicaSettings) -> str:
    if replicas.autoscaling:
        return f"{replicas.min_replicas}..{replicas.max_replicas} engine replicas"
    return f"{replicas.num_replicas} engine replica{'s' if replicas.num_replicas != 1 else ''}"


def _wait_for_signal() -> None:
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        logger.info("signal %d received; stopping", signum)
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
