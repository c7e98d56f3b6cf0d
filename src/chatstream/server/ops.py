"""Operations endpoints: /health, /metrics, /get_load, /get_resource_usage."""

from __future__ import annotations

import os
from typing import Any

import psutil
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from chatstream.engine.base import WorkerStats, engine_health, engine_workers
from chatstream.server.access import role_checked
from chatstream.server.context import ServerContext

_GIB = 1024**3


@role_checked("health")
async def handle_health(ctx: ServerContext, request: Request) -> Response:
    """GET /health: 200 ``{"status": "ok"}`` when the engine runs; 503 "starting", "draining" or "failed" otherwise.

    An engine of several (a pool, Ray replicas) adds ``"engines": [{"name", "status", "error"?}]``; the status is
    "degraded" (200: the others serve) while some of them failed, "failed" (503) when all did.
    """
    engine = ctx.service.engine
    if ctx.service.admission.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not engine.is_running:
        return JSONResponse({"status": "starting"}, status_code=503)
    workers = engine_workers(engine)
    problem = engine_health(engine)
    if not workers:
        if problem is not None:
            return JSONResponse({"status": "failed", "error": problem}, status_code=503)
        return JSONResponse({"status": "ok"})
    engines = [_worker_health(worker) for worker in workers]
    healthy = sum(worker.healthy for worker in workers)
    if problem is not None or healthy == 0:
        return JSONResponse({"status": "failed", "engines": engines}, status_code=503)
    return JSONResponse({"status": "ok" if healthy == len(workers) else "degraded", "engines": engines})


def _worker_health(worker: WorkerStats) -> dict[str, Any]:
    if worker.healthy:
        return {"name": worker.name, "status": "ok"}
    return {"name": worker.name, "status": "failed", "error": worker.error}


@role_checked("metrics")
async def handle_metrics(ctx: ServerContext, request: Request) -> Response:
    """GET /metrics: this instance's Prometheus registry in the text exposition format."""
    return Response(ctx.service.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@role_checked("get_load")
async def handle_get_load_request(ctx: ServerContext, request: Request) -> Response:
    """GET /get_load: running and waiting generations of this instance (the original's shape).

    An engine of several (a pool, Ray replicas) is listed one entry per engine in ``chatstream_workers`` (named
    "<name>/<engine>", with its own running and queued requests and its status), and the shared admission line,
    where requests wait before an engine is chosen, is ``admission``.
    """
    stats = ctx.service.admission.stats()
    admission = {
        "name": ctx.service.name,
        "processing": stats.num_running,
        "waiting": stats.num_waiting,
        "max_processing": stats.max_running,
        "max_waiting": stats.max_waiting,
        "engine": ctx.service.engine_info(),
    }
    workers = engine_workers(ctx.service.engine)
    if not workers:
        return JSONResponse({"success": True, "message": "success", "chatstream_workers": [admission]})
    entries = [_worker_load(ctx.service.name, worker) for worker in workers]
    return JSONResponse({"success": True, "message": "success", "chatstream_workers": entries, "admission": admission})


def _worker_load(service_name: str, worker: WorkerStats) -> dict[str, Any]:
    return {
        "name": f"{service_name}/{worker.name}",
        "processing": worker.stats.num_running,
        "waiting": worker.stats.num_waiting,
        "max_processing": worker.max_running or 0,
        "max_waiting": 0,  # requests wait in the shared admission line, before an engine is chosen
        "status": "ok" if worker.healthy else "failed",
        "turns": worker.turns_total,
        "moved_in": worker.moved_in_total,
        "conversations": worker.conversations,
    }


@role_checked("get_resource_usage")
async def handle_get_resource_usage_request(ctx: ServerContext, request: Request) -> Response:
    """GET /get_resource_usage: process and GPU memory in GiB (the original's shape)."""
    usage = resource_usage(ctx.service.config.num_gpus, ctx.service.config.device)
    usage["name"] = ctx.service.name
    usage["engine"] = ctx.service.engine_info()
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
