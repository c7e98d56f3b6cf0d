"""The Responses API (stub)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI


def add_responses_routes(app: FastAPI, ctx: Any) -> None:
    """Mount the Responses API."""
