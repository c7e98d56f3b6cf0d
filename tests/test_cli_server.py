"""The server of ``chatstream serve``: the announced URL (the real end to end run is in test_cli.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from chatstream.cli_server import listening_url


@pytest.mark.parametrize(
    ("host", "expected"),
    [("127.0.0.1", "http://127.0.0.1:4321/"), ("0.0.0.0", "http://127.0.0.1:4321/"), ("::1", "http://[::1]:4321/")],
)
def test_the_announced_url_uses_the_bound_port(host: str, expected: str) -> None:
    sock = SimpleNamespace(getsockname=lambda: (host, 4321))
    server = SimpleNamespace(config=SimpleNamespace(host=host, port=0), servers=[SimpleNamespace(sockets=[sock])])
    assert listening_url(server) == expected
