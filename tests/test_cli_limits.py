"""``chatstream serve``'s limits: body size, fair queueing, per-user cap, the cookie's Secure flag."""

from __future__ import annotations

from chatstream import cli
from chatstream.cli import build_parser


def test_defaults() -> None:
    args = build_parser().parse_args(["serve", "--mock"])
    assert (args.max_body_bytes, args.fair_queue, args.max_running_per_user) == (1024 * 1024, True, None)
    assert args.secure_cookies == "auto"
    assert build_parser().parse_args(["serve", "--secure-cookies"]).secure_cookies == "always"


def test_limits_reach_the_chat_stream() -> None:
    argv = ["serve", "--mock", "--max-body-bytes", "4096", "--no-fair-queue", "--max-running-per-user", "2"]
    args = build_parser().parse_args([*argv, "--secure-cookies", "never"])
    assert args.secure_cookies == "never"
    chat_stream = cli.build_chat_stream(args, max_concurrency=4, max_queue_size=8, reject_as_http_error=True)
    assert chat_stream.server_context.max_body_bytes == 4096
    assert chat_stream.admission_config.fair is False
    assert chat_stream.admission_config.max_running_per_user == 2
