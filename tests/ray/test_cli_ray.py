"""``chatstream serve --ray``: the settings the command line builds, deployed on the test cluster."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from chatstream import cli
from chatstream.cli import build_parser
from chatstream.prompts.presets import ChatPromptPlainUserAssistant
from tests.ray.cluster import AGENT, deployed

pytestmark = pytest.mark.ray


def test_ray_settings_follow_the_options(tiny_model_dir: Path) -> None:
    argv = ["serve", "--ray", "--model", str(tiny_model_dir), "--max-concurrency", "4", "--max-queue", "8"]
    extra = ["--max-replicas", "3", "--target-ongoing-requests", "2", "--cpus-per-replica", "2", "--temperature", "0"]
    extra += ["--gpus-per-replica", "1", "--store", "redis://127.0.0.1:6399/0", "--session-secret", "s3cret"]
    spec, replicas, front = cli.ray_settings(build_parser().parse_args([*argv, *extra]))
    assert spec.model_path == str(tiny_model_dir) and spec.max_batch_size == 4
    options = replicas.deployment_options(spec.max_batch_size)
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2}
    assert options["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 1.0}
    assert options["max_ongoing_requests"] == 4 and replicas.max_queued_requests == 8
    assert front.chat_stream_options["temperature"] == 0.0
    assert "num_of_concurrent_executions" not in front.chat_stream_options  # build_app sizes admission
    assert front.chat_stream_options["store"] == "redis://127.0.0.1:6399/0"  # every front reads the same store
    # --secure-cookies defaults to auto: Secure only on requests that came over HTTPS
    assert front.middleware_opts == {"session": {"secure": "auto", "secret_key": "s3cret"}}


def test_serve_ray_mock_with_two_replicas_answers_both_protocols(ray_cluster: str) -> None:
    argv = ["serve", "--ray", "--mock", "--mock-type", "echo", "--replicas", "2", "--cpus-per-replica", "0.25"]
    argv += ["--mock-time-per-token", "0", "--store", "memory://"]
    spec, replicas, front = cli.ray_settings(build_parser().parse_args(argv))
    assert replicas.num_gpus == 0 and front.chat_stream_options["store"] == "memory://"
    assert front.chat_stream_options["chat_prompt_clazz"] is ChatPromptPlainUserAssistant
    with deployed(ray_cluster, spec, replicas, front, name="cli") as url, httpx.Client(base_url=url, timeout=30) as c:
        native = c.post("/chat_stream", json={"user_input": "echo through Ray"})
        assert native.status_code == 200 and native.text.endswith("echo through Ray<::EOS::>")
        body = {"model": "chatstream-mock", "messages": [{"role": "user", "content": "and back"}]}
        assert c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"] == "and back"
        load = c.get("/get_load", headers=AGENT).json()
        assert load["admission"]["max_processing"] == 2 * 32 and len(load["chatstream_workers"]) >= 1
