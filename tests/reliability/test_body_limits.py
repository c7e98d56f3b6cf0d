"""Oversized bodies against a real server: a 20 MB body and an endless chunked one are refused early (413), on
every kind of endpoint, and the server's memory stays flat (it never reads them whole)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from tests.reliability.servers import ServerProcess, mock_serve, record_figure, serve

pytestmark = pytest.mark.reliability

TWENTY_MB = 20 * 1024 * 1024
CHUNK = b"x" * 65536
ANSWER_WITHIN_SEC = 3.0
RSS_GROWTH_LIMIT_MB = 8.0


def send_oversized(url: str, method: str, path: str, *, chunked: bool) -> tuple[bytes, float, int]:
    """Send headers and then body bytes until the server answers; the response, the seconds it took and the body
    bytes sent (at most 20 MB: the server must answer long before)."""
    host, port = url.removeprefix("http://").split(":")
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {TWENTY_MB}"
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
    piece = b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK) if chunked else CHUNK
    started = time.monotonic()
    sent = 0
    with socket.create_connection((host, int(port)), timeout=ANSWER_WITHIN_SEC) as sock:
        sock.sendall(head.encode())
        sock.setblocking(False)
        while sent < TWENTY_MB:
            try:
                reply = sock.recv(65536)
                if reply:
                    return reply + _rest(sock), time.monotonic() - started, sent
            except BlockingIOError:
                pass
            try:
                sent += sock.send(piece)
            except BlockingIOError:
                time.sleep(0.001)
            except (BrokenPipeError, ConnectionResetError):
                break
            assert time.monotonic() - started < ANSWER_WITHIN_SEC, "no answer while the body kept coming"
        sock.setblocking(True)
        return sock.recv(65536) + _rest(sock), time.monotonic() - started, sent


def _rest(sock: socket.socket) -> bytes:
    sock.setblocking(True)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serve(mock_serve(), tmp_path_factory.mktemp("body_limits")) as process:
        yield process


def json_body(reply: bytes) -> dict[str, object]:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head[:80]
    assert b"connection: close" in head.lower()
    return json.loads(body)


@pytest.mark.parametrize(
    ("method", "path", "chunked"),
    [
        ("POST", "/chat_stream", False),
        ("POST", "/chat_stream", True),
        ("POST", "/v1/chat/completions", True),
        ("GET", "/get_load", True),
    ],
)
def test_oversized_bodies_get_413_quickly_and_memory_stays_flat(
    server: ServerProcess, method: str, path: str, chunked: bool
) -> None:
    before = server.rss_mb()
    replies = [send_oversized(server.url, method, path, chunked=chunked) for _ in range(3)]
    after = server.rss_mb()
    for reply, elapsed, sent in replies:
        body = json_body(reply)
        message = json.dumps(body)
        assert "1048576 bytes" in message and "1 MiB" in message
        if path.startswith("/v1/"):
            assert body["error"]["code"] == "payload_too_large"  # type: ignore[index]
        elif path == "/chat_stream":
            assert body["error"] == "payload_too_large"
        else:
            assert body["success"] is False
        assert elapsed < ANSWER_WITHIN_SEC and sent < TWENTY_MB
    assert after - before < RSS_GROWTH_LIMIT_MB, (before, after)
    record_figure(
        f"body_limit {method} {path} {'chunked' if chunked else 'content-length'}",
        {
            "answer_s": [round(e, 3) for _, e, _ in replies],
            "sent_mb": [round(s / 2**20, 1) for _, _, s in replies],
            "rss_mb_before_after": [round(before, 1), round(after, 1)],
        },
    )
