"""The front's operations route for the Ray application: GET /ray/replicas (where the turns went, replica loads)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

if TYPE_CHECKING:
    from fastapi import FastAPI

    from chatstream.chat_stream import ChatStream
    from chatstream.ray.client import RayEngine

logger = logging.getLogger(__name__)


def add_ray_routes(app: FastAPI, chat_stream: ChatStream, engine: RayEngine) -> None:
    """Mount GET /ray/replicas; it answers to the clients that may read /get_load.

    The report: turns relayed per replica, their actor names, conversations that changed replica; with
    ``?conversation=ID`` the replica of that conversation's latest turn; with ``?stats=1`` each replica's own stats.
    """

    async def replicas(request: Request) -> Response:
        denied = chat_stream.client_roles.deny_response(request, "get_load")
        if denied is not None:
            return denied
        report = engine.routing_report()
        conversation_id = request.query_params.get("conversation")
        if conversation_id:
            report["conversation_replica"] = engine.last_replica_of(conversation_id)
        if request.query_params.get("stats") in ("1", "true"):
            report["replicas"] = [await _stats_or_error(engine, replica_id) for replica_id in report["actor_names"]]
        return JSONResponse(report)

    app.add_api_route("/ray/replicas", replicas, methods=["GET"], include_in_schema=False)


async def _stats_or_error(engine: RayEngine, replica_id: str) -> dict[str, Any]:
    try:
        return await engine.replica_stats(replica_id)
    except Exception as exc:  # a dead or busy replica must not break the report
        logger.info("stats of replica %s unavailable: %s", replica_id, exc)
        return {"replica_id": replica_id, "error": f"{type(exc).__name__}: {exc}"}
