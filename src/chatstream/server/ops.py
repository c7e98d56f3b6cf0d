"""Operations endpoints: /health, /metrics, /get_load, /get_resource_usage, and the graceful drain on shutdown."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import psutil
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from chatstream.i18n import message

if TYPE_CHECKING:
    from chatstream.chat_stream import ChatStream

logger = logging.getLogger(__name__)

_GIB = 1024**3


async def handle_health(chat_stream: ChatStream, request: Request) -> Response:
    """GET /health: 200 ``{"status": "ok"}`` when the engine runs; 503 "starting" or "draining" otherwise."""
    denied = chat_stream.client_roles.deny_response(request, "health")
    if denied is not None:
        return denied
    if chat_stream.admission.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not chat_stream.engine.is_running:
        return JSONResponse({"status": "starting"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def handle_metrics(chat_stream: ChatStream, request: Request) -> Response:
    """GET /metrics: this instance's Prometheus registry in the text exposition format."""
    denied = chat_stream.client_roles.deny_response(request, "metrics")
    if denied is not None:
        return denied
    return Response(chat_stream.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def handle_get_load_request(chat_stream: ChatStream, request: Request) -> Response:
    """GET /get_load: running and waiting generations of this instance (the original's shape)."""
    denied = chat_stream.client_roles.deny_response(request, "get_load")
    if denied is not None:
        return denied
    stats = chat_stream.admission.stats()
    worker = {
        "name": chat_stream.name,
        "processing": stats.num_running,
        "waiting": stats.num_waiting,
        "max_processing": stats.max_running,
        "max_waiting": stats.max_waiting,
    }
    return JSONResponse({"success": True, "message": "success", "chatstream_workers": [worker]})


async def handle_get_resource_usage_request(chat_stream: ChatStream, request: Request) -> Response:
    """GET /get_resource_usage: process and GPU memory in GiB (the original's shape)."""
    denied = chat_stream.client_roles.deny_response(request, "get_resource_usage")
    if denied is not None:
        return denied
    usage = resource_usage(chat_stream.num_gpus, chat_stream.device)
    usage["name"] = chat_stream.name
    return JSONResponse({"success": True, "message": "success", "memory_usage": [usage]})


def resource_usage(num_gpus: int | None, device: Any) -> dict[str, Any]:
    """``{"num_gpus", "gpus": [{"index", "total_memory", "used_memory"}], "cpu": {...}}`` in GiB.

    CPU: this process's resident memory and the machine's total memory. GPUs (through torch, only when CUDA is
    available and the instance runs on it): used = total - free as the driver reports it.
    """
    rss = psutil.Process(os.getpid()).memory_info().rss
    total = psutil.virtual_memory().total
    return {
        "num_gpus": num_gpus,
        "gpus": _gpu_usage(num_gpus, device),
        "cpu": {"total_memory": round(total / _GIB, 2), "used_memory": round(rss / _GIB, 2)},
    }


def _gpu_usage(num_gpus: int | None, device: Any) -> list[dict[str, Any]]:
    device_type = str(device).split(":")[0] if device is not None else None
    if num_gpus == 0 or device_type not in (None, "cuda"):
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    index = torch.device(device).index if device is not None else None
    if num_gpus in (None, 1) and index is not None:
        indexes = [index]
    else:
        count = torch.cuda.device_count()
        indexes = list(range(count if num_gpus is None else min(num_gpus, count)))
    gpus = []
    for i in indexes:
        free, total = torch.cuda.mem_get_info(i)
        gpus.append(
            {"index": i, "total_memory": round(total / _GIB, 2), "used_memory": round((total - free) / _GIB, 2)}
        )
    return gpus


async def drain_and_shutdown(chat_stream: ChatStream, drain_timeout: float) -> None:
    """Stop admitting (new requests get 503), let running streams finish for up to ``drain_timeout`` s, then stop
    the engine (``chat_stream.shutdown``)."""
    running = chat_stream.admission.num_running
    logger.info(message("drain_started", chat_stream.locale), drain_timeout, running)
    await chat_stream.shutdown(drain_timeout)
    logger.info(message("drain_finished", chat_stream.locale))
