"""``chatstream serve --ray``: the Ray application's settings from the command line's options (docs/scaling.md).

``--max-concurrency`` is each replica's batch size, ``--max-queue`` the requests that may wait beyond every
replica's slots; the front's admission is sized from them by ``build_app``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from chatstream.cli_data import ServeData
from chatstream.cli_options import CPU_KERNELS
from chatstream.config import EngineConfig, MockConfig
from chatstream.ray import EngineSpec, FrontSettings, ReplicaSettings
from chatstream.ray.launch import default_gpus_per_replica


def engine_settings(args: argparse.Namespace, model_dir: str | None) -> tuple[EngineSpec, ReplicaSettings]:
    """What each replica loads (``model_dir``, or the mock with ``--mock``), and how many run where."""
    config = EngineConfig(
        max_batch_size=args.max_concurrency,
        context_len=args.context_len,
        fused_decoder=args.fused_decoder,
        max_prefill_tokens=args.max_prefill_tokens,
        max_decode_slowdown=args.max_decode_slowdown or None,
        weight_quantization=args.weight_quantization,
        cpu_kernels=CPU_KERNELS[args.cpu_kernels],
    )
    if args.mock or model_dir is None:
        mock = MockConfig.from_seed_params({"type": args.mock_type, "time_per_token_sec": args.mock_time_per_token})
        spec = EngineSpec(mock=mock, engine_config=config)
    else:
        spec = EngineSpec(model_dir, config, dtype=args.dtype, device=args.device, num_threads=args.threads)
    gpus = args.gpus_per_replica
    replicas = ReplicaSettings(
        num_replicas=args.replicas,
        min_replicas=args.min_replicas if args.min_replicas is not None else 1,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        num_cpus=args.cpus_per_replica,
        num_gpus=gpus if gpus is not None else default_gpus_per_replica(spec.mock is not None, args.device),
        max_queued_requests=args.max_queue,
    )
    return spec, replicas


def front_settings(
    args: argparse.Namespace, chat_stream_options: Mapping[str, Any], api_keys: tuple[str, ...], data: ServeData
) -> FrontSettings:
    """The front: ChatStream's options without the admission sizes (``build_app`` sets them from the replicas),
    the store and session secret of ``serve`` (with several front replicas the store must be shared: Redis)."""
    sized_by_the_app = {"num_of_concurrent_executions", "max_queue_size"}
    options = {key: value for key, value in chat_stream_options.items() if key not in sized_by_the_app}
    session: dict[str, Any] = {"secure": {"auto": "auto", "always": True, "never": False}[args.secure_cookies]}
    if data.session_secret is not None:
        session["secret_key"] = data.session_secret
    return FrontSettings(
        chat_stream_options=options,
        web_ui_params={"title": args.web_ui_title} if args.web_ui_title else {},
        api_keys=api_keys,
        drain_timeout=args.drain_timeout,
        middleware_opts={"session": session},
    )
