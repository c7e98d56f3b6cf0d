"""Tests for the ``chatstream`` command line: parsing, validation, console chat, and ``serve`` as a real process."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from chatstream import cli
from chatstream.cli import api_keys_from, build_parser, main, model_id_for, prompt_class_for
from chatstream.engine.mock_engine import ROUND_ANSWERS
from chatstream.prompts.chat_template import ChatTemplatePrompt
from chatstream.prompts.presets import ChatPromptPlainUserAssistant

SRC_DIR = Path(__file__).resolve().parents[1] / "src"
STARTUP_TIMEOUT_SEC = 60.0


@pytest.fixture(autouse=True)
def _private_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep load-time records and converted models out of the real home directory."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("CHATSTREAM_CACHE_DIR", str(tmp_path / "models"))


# ----- parsing and validation -----


def test_serve_defaults() -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    assert (args.max_concurrency, args.max_queue) == (32, 64)
    assert args.model is None and args.mock is False and args.dtype == "auto" and args.device is None
    assert args.api_key == [] and args.too_many_requests_as_http_error is False
    assert args.fused_decoder is True
    assert args.run is cli.run_serve


def test_serve_options_are_parsed() -> None:
    argv = (
        "serve --host 0.0.0.0 --port 0 --mock --mock-type echo --mock-time-per-token 0.5 --mock-initial-wait 1"
        " --dtype bf16 --device CUDA:1 --max-concurrency 4 --max-queue 0 --max-new-tokens 16 --context-len 512"
        " --too-many-requests-as-http-error --api-key a --api-key b --web-ui-title Hi --log-level debug"
        " --ignore-eos --secure-cookies --no-fused-decoder"
    )
    args = build_parser().parse_args(argv.split(" "))
    assert (args.host, args.port, args.mock_type, args.dtype, args.device) == ("0.0.0.0", 0, "echo", "bf16", "cuda:1")
    assert (args.mock_time_per_token, args.mock_initial_wait) == (0.5, 1.0)
    assert (args.max_concurrency, args.max_queue, args.max_new_tokens, args.context_len) == (4, 0, 16, 512)
    assert args.api_key == ["a", "b"] and args.web_ui_title == "Hi" and args.too_many_requests_as_http_error
    assert args.ignore_eos and args.secure_cookies and args.fused_decoder is False


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["serve", "--dtype", "int8"], "--dtype"),
        (["chat", "--dtype", "fp8"], "--dtype"),
        (["serve", "--device", "tpu"], "--device"),
        (["serve", "--port", "70000"], "--port"),
        (["serve", "--port", "http"], "--port"),
        (["serve", "--max-concurrency", "0"], "--max-concurrency"),
        (["serve", "--max-queue", "-1"], "--max-queue"),
        (["serve", "--mock-type", "shout"], "--mock-type"),
        (["serve", "--mock-time-per-token", "-0.1"], "--mock-time-per-token"),
        (["chat", "--top-p", "0"], "--top-p"),
        (["chat", "--num-gpus", "0"], "--num-gpus"),
        (["serve", "--log-level", "loud"], "--log-level"),
    ],
)
def test_bad_options_exit_2_naming_the_option(argv: list[str], option: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "serve" in capsys.readouterr().err


def test_a_missing_model_path_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(SystemExit) as info:
        main(["chat", "--model", str(missing), "--device", "cpu"])
    assert info.value.code == 2
    assert str(missing) in capsys.readouterr().err


def test_api_keys_come_from_options_and_the_environment() -> None:
    args = SimpleNamespace(api_key=["a", "b"])
    assert api_keys_from(args, {cli.API_KEYS_ENV: " c, a,, "}) == ("a", "b", "c")  # type: ignore[arg-type]
    assert api_keys_from(SimpleNamespace(api_key=[]), {}) == ()  # type: ignore[arg-type]


def test_prompt_preset_follows_the_model() -> None:
    with_template = SimpleNamespace(chat_template="{{ messages }}")
    without_template = SimpleNamespace(chat_template=None)
    assert prompt_class_for(None, with_template) is ChatPromptPlainUserAssistant  # the embedded base model
    assert prompt_class_for("/models/x", with_template) is ChatTemplatePrompt
    assert prompt_class_for("/models/x", without_template) is ChatPromptPlainUserAssistant


def test_model_ids() -> None:
    assert model_id_for(None) == "gemma-3-270m"
    assert model_id_for("/models/tiny-llama.gguf") == "tiny-llama"
    assert model_id_for("/models/my-model/") == "my-model"


# ----- convert -----


def test_convert_prints_a_model_directory_as_is(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "--model", str(tiny_model_dir), "--log-level", "warning"]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_model_dir)


def test_convert_of_a_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["convert", "--model", str(tmp_path / "absent.gguf")])
    assert info.value.code == 2
    assert "absent.gguf" in capsys.readouterr().err


# ----- chat -----


def _chat(argv: list[str], user_lines: str) -> str:
    args = build_parser().parse_args(["chat", *argv])
    stdout = io.StringIO()
    assert cli.run_chat(args, stdin=io.StringIO(user_lines), stdout=stdout) == 0
    return stdout.getvalue()


def test_chat_mock_streams_each_answer_and_ends_at_eof() -> None:
    out = _chat(["--mock", "--mock-time-per-token", "0"], "hello\n\nagain\n")
    assert f"You: Assistant: {ROUND_ANSWERS[0]}\n" in out
    assert f"You: You: Assistant: {ROUND_ANSWERS[1]}\n" in out  # the blank line asks again
    assert out.endswith("You: \n")


def test_chat_exit_word_stops_before_the_next_line() -> None:
    out = _chat(["--mock", "--mock-type", "echo", "--mock-time-per-token", "0"], "one\n/exit\ntwo\n")
    assert "Assistant: one\n" in out and "two" not in out


def test_chat_with_the_tiny_model(tiny_model_dir: Path) -> None:
    argv = ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "6"]
    out = _chat([*argv, "--temperature", "0"], "Hello, how are you today?\n")
    answer = out.split("Assistant: ", 1)[1].split("\nYou: ")[0]
    assert out.startswith(f"Chatting with {tiny_model_dir.name}.")
    assert answer.strip()  # six greedy tokens from the random model, streamed as text


def test_no_fused_decoder_reaches_the_engine_config(tiny_model_dir: Path) -> None:
    argv = ["chat", "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32"]
    for extra, fused in (([], True), (["--no-fused-decoder"], False)):
        args = build_parser().parse_args([*argv, *extra])
        chat_stream = cli.build_chat_stream(args, max_concurrency=1, max_queue_size=0, reject_as_http_error=False)
        assert chat_stream.engine_config.fused_decoder is fused


def test_prefill_budget_slowdown_quantization_and_cpu_kernels_reach_the_engine_config(tiny_model_dir: Path) -> None:
    argv = ["chat", "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32"]
    cases = (
        ([], 256, 2.5, None),
        (
            ["--max-prefill-tokens", "64", "--max-decode-slowdown", "0", "--weight-quantization", "int4"],
            64,
            None,
            "int4",
        ),
        (["--max-decode-slowdown", "1.5"], 256, 1.5, None),
    )
    for extra, budget, slowdown, quantization in cases:
        args = build_parser().parse_args([*argv, *extra])
        chat_stream = cli.build_chat_stream(args, max_concurrency=1, max_queue_size=0, reject_as_http_error=False)
        assert chat_stream.engine_config.max_prefill_tokens == budget
        assert chat_stream.engine_config.max_decode_slowdown == slowdown
        assert chat_stream.engine_config.weight_quantization == quantization
    for value, setting in (("auto", None), ("on", True), ("off", False)):
        args = build_parser().parse_args([*argv, "--cpu-kernels", value])
        assert cli.build_chat_stream(args, max_concurrency=1, max_queue_size=0, reject_as_http_error=False
                                     ).engine_config.cpu_kernels is setting  # fmt: skip
    bad_values = (["--max-prefill-tokens", "0"], ["--weight-quantization", "int3"], ["--max-decode-slowdown", "0.5"],
                  ["--cpu-kernels", "yes"])  # fmt: skip
    for bad in bad_values:
        with pytest.raises(SystemExit):
            build_parser().parse_args([*argv, *bad])


def _start(argv: list[str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(SRC_DIR), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "chatstream", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


class _OutputReader:
    """Collects a subprocess's stdout in a thread so that tests can wait for a piece of text."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self._fd = proc.stdout.fileno()
        self._chunks: list[bytes] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while chunk := os.read(self._fd, 4096):
            self._chunks.append(chunk)

    @property
    def text(self) -> str:
        return b"".join(self._chunks).decode("utf-8", errors="replace")

    def wait_for(self, needle: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} did not appear in time; got {self.text!r}")
            time.sleep(0.05)
        return self.text


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes started by a test; any still running at the end are killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_python_m_chatstream_chat_mock_over_stdin(processes: list[subprocess.Popen[bytes]]) -> None:
    proc = _start(["chat", "--mock", "--mock-type", "echo", "--mock-time-per-token", "0"])
    processes.append(proc)
    out, err = proc.communicate("こんにちは\nsecond line\n".encode(), timeout=STARTUP_TIMEOUT_SEC)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert "Assistant: こんにちは\n" in text and "Assistant: second line\n" in text
    assert b"Traceback" not in err


_LONG_CHAT = ["chat", "--mock", "--mock-type", "long", "--mock-time-per-token", "0.05"]


def _ctrl_c_during_an_answer(proc: subprocess.Popen[bytes]) -> _OutputReader:
    """Ask for the long answer, press Ctrl+C once it streams; the chat must quit within 15 s with status 0."""
    reader = _OutputReader(proc)
    assert proc.stdin is not None
    proc.stdin.write(b"tell me a story\n")
    proc.stdin.flush()
    reader.wait_for("Once upon a time", STARTUP_TIMEOUT_SEC)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 0
    return reader


def test_ctrl_c_during_an_answer_exits_cleanly(processes: list[subprocess.Popen[bytes]]) -> None:
    proc = _start(_LONG_CHAT)
    processes.append(proc)
    reader = _ctrl_c_during_an_answer(proc)
    assert proc.stderr is not None and b"Traceback" not in proc.stderr.read()
    assert "begin something new" not in reader.text  # the answer was cut short, not waited for


def test_ctrl_c_quits_also_when_started_with_sigint_ignored(processes: list[subprocess.Popen[bytes]]) -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the child inherits it, as from a parent that ignores it
    try:
        proc = _start(_LONG_CHAT)
    finally:
        signal.signal(signal.SIGINT, previous)
    processes.append(proc)
    _ctrl_c_during_an_answer(proc)


# ----- serve as a real process -----


def test_serve_mock_answers_chat_stream(processes: list[subprocess.Popen[bytes]]) -> None:
    proc = _start(
        [
            *("serve", "--mock", "--port", "0", "--mock-time-per-token", "0.001", "--api-key", "k1"),
            *("--web-ui-title", "CLI test title", "--log-level", "warning"),
        ]
    )
    processes.append(proc)
    reader = _OutputReader(proc)
    url = reader.wait_for("ChatStream is ready: ", STARTUP_TIMEOUT_SEC).split("ChatStream is ready: ", 1)[1].split()[0]
    assert url.startswith("http://127.0.0.1:")
    with httpx.Client(base_url=url, timeout=30) as client:
        response = client.post("/chat_stream", content=json.dumps({"user_input": "hello"}))
        assert response.status_code == 200
        chunks = [c for c in response.text.split("<::EOS::>") if c]
        assert chunks[-1] == ROUND_ANSWERS[0]
        cookie = response.headers["set-cookie"].lower()
        assert "httponly" in cookie and "secure" not in cookie  # plain HTTP: a Secure cookie would be dropped
        assert "<title>CLI test title</title>" in client.get("/").text
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0


def test_scale_out_options_are_parsed_and_checked(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["serve", "--devices", "cpu, CPU", "--max-concurrency", "2"])
    assert args.devices == ["cpu", "cpu"] and not args.ray and args.replicas == 1
    argv = ["serve", "--ray", "--replicas", "3", "--ray-address", "auto", "--gpus-per-replica", "0.5"]
    args = build_parser().parse_args([*argv, "--min-replicas", "1", "--max-replicas", "4"])
    assert (args.replicas, args.ray_address, args.gpus_per_replica, args.max_replicas) == (3, "auto", 0.5, 4)
    for bad, message in (
        (["--devices", "cpu", "--ray"], "--devices and --ray do not combine"),
        (["--max-replicas", "2"], "--max-replicas needs --ray"),
        (["--ray", "--min-replicas", "1"], "--min-replicas needs --max-replicas"),
    ):
        with pytest.raises(SystemExit) as info:
            main(["serve", "--mock", *bad])
        assert info.value.code == 2 and message in capsys.readouterr().err


def test_devices_build_a_pool_with_one_engine_per_device(tiny_model_dir: Path) -> None:
    from chatstream.pool import PoolEngine

    argv = ["serve", "--model", str(tiny_model_dir), "--devices", "cpu,cpu", "--dtype", "fp32"]
    args = build_parser().parse_args(argv)
    chat_stream = cli.build_chat_stream(args, max_concurrency=3, max_queue_size=0, reject_as_http_error=True)
    assert isinstance(chat_stream.engine, PoolEngine)
    assert [w.name for w in chat_stream.engine.workers()] == ["cpu#0", "cpu#1"]
    assert chat_stream.admission_config.max_concurrency == 6
