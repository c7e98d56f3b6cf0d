"""A local Ray cluster with Serve on 127.0.0.1 for the Ray tests, and helpers to deploy and call applications."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import ray
from ray import serve

from chatstream.ray import build_app
from chatstream.ray.app import FrontSettings
from chatstream.ray.spec import EngineSpec, ReplicaSettings
from tests.live_server import free_port

AGENT = {"X-FastSession-Skip": "skip"}


@contextmanager
def local_cluster(num_cpus: int = 2) -> Iterator[str]:
    """Ray with ``num_cpus`` CPUs and Serve's HTTP proxy on a free port of 127.0.0.1; yields the proxy's URL.
    Everything is shut down afterwards."""
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        namespace="chatstream-tests",
    )
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@contextmanager
def deployed(
    url: str, spec: EngineSpec, replicas: ReplicaSettings, front: FrontSettings | None = None, name: str = "cs"
) -> Iterator[str]:
    """``build_app(...)`` running at the proxy's root until the block ends; waits until /health says ok."""
    serve.run(build_app(spec, replicas, front), name=name, route_prefix="/", blocking=False)
    try:
        wait_healthy(url)
        yield url
    finally:
        serve.delete(name)


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the application at {url} did not become healthy in {timeout:g} s")


def routing(client: httpx.Client, **params: Any) -> dict[str, Any]:
    """The front's /ray/replicas report (asked as an agent: the default roles let agents read the load)."""
    response = client.get("/ray/replicas", params=params, headers=AGENT)
    response.raise_for_status()
    return dict(response.json())
