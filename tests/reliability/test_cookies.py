"""Sessions over plain HTTP for a client that is not a browser (httpx), against the app the original README shows
(``append_middlewares(app, {"develop_mode": True})``): the history, a pass-phrase promotion and the session APIs
work; over HTTPS (uvicorn with a certificate made here) the cookie carries Secure."""

from __future__ import annotations

import ssl
import subprocess
import urllib.parse
from pathlib import Path

import httpx
import pytest

from tests.reliability.seed_app import PASS_PHRASE
from tests.reliability.servers import serve

pytestmark = pytest.mark.reliability

SEED_APP = ["tests/reliability/seed_app.py"]


def chat(client: httpx.Client, text: str) -> str:
    response = client.post("/chat_stream", json={"user_input": text})
    assert response.status_code == 200, response.text
    return response.text.split("<::EOS::>")[-2]


def test_plain_http_keeps_the_session_for_a_python_client(tmp_path: Path) -> None:
    with serve(SEED_APP, tmp_path) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        assert chat(client, "first question") == "first question"
        cookie = client.cookies.jar
        assert [c.name for c in cookie] == ["sid"] and not next(iter(cookie)).secure
        assert chat(client, "second question") == "second question"
        assert client.get("/get_prompt").status_code == 403  # the default role may not read the prompt
        assert chat(client, PASS_PHRASE) == "New role: 'developer' has been granted"
        prompt = client.get("/get_prompt").json()
        assert prompt["success"] is True  # the promotion persisted in the session
        text = urllib.parse.unquote(prompt["prompt"])
        assert "first question" in text and "second question" in text  # two turns kept the history
        assert PASS_PHRASE not in text
        params = client.post("/set_generation_params", json={"temperature": 0.5}).json()
        assert params["generation_params"]["temperature"] == 0.5
        assert client.get("/get_generation_params").json()["generation_params"]["temperature"] == 0.5
        assert client.post("/clear_context").json()["success"] is True
        assert client.get("/get_prompt").json()["prompt"] is None


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_https_marks_the_cookie_secure(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    args = [*SEED_APP, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    trust = ssl.create_default_context(cafile=str(cert))
    with serve(args, tmp_path, https=True) as server, httpx.Client(base_url=server.url, verify=trust) as client:
        response = client.post("/chat_stream", json={"user_input": "over tls"})
        assert response.status_code == 200
        set_cookie = response.headers["set-cookie"].lower()
        assert "; secure" in set_cookie and "httponly" in set_cookie
        assert chat(client, "again") == "again"  # the client sends the cookie back over https
        assert "set-cookie" not in client.post("/chat_stream", json={"user_input": "third"}).headers
