"""The Ray tests: skipped as a whole where the ``ray`` extra is not installed; one local cluster for all of them."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A local Ray cluster (2 CPUs) with Serve's HTTP proxy on 127.0.0.1; yields the proxy's URL. Shut down after
    the last Ray test."""
    from tests.ray.cluster import local_cluster

    with local_cluster() as url:
        yield url
