"""The demo page at ``/``: draw a digit, move the tolerance, watch the answer (no external resources)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"


async def demo() -> FileResponse:
    """The demo page; it calls /classify."""
    return FileResponse(STATIC / "index.html")


def install(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_api_route("/", demo, methods=["GET"], include_in_schema=False)
