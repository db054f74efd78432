"""One table from exception to HTTP status, for every route.

Below the HTTP layer code raises domain errors (``fpn_serve.errors``); the HTTP layer adds the few
that only a protocol knows (a malformed body, an unsupported content type, a timeout). ``STATUS``
maps each to its status; the one handler answers with the Open Inference Protocol's shape
``{"error": ...}`` on ``/v2`` routes and with ``{"detail": ...}`` everywhere else. A more specific
exception class wins over its base (the lookup follows the class's MRO).
"""

from __future__ import annotations

from typing import NamedTuple

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from ..errors import (
    FPNServeError,
    ImageError,
    InputError,
    LimitExceeded,
    ModelError,
    ModelNotFound,
    QueueFull,
    TargetUnreachable,
)


class MalformedBody(InputError):
    """A body that cannot be parsed at all (not JSON, a broken multipart body, no 'file' field)."""


class UnsupportedType(InputError):
    """A content type the route does not accept; the message lists those it does."""


class TimedOut(FPNServeError):
    """The request ran past the server's request timeout."""


class Status(NamedTuple):
    status: int  # on /classify and every other route
    v2: int  # on the Open Inference Protocol's routes (its errors are 400 unless more specific)


CLIENT_GONE = 499  # nginx's convention: the client closed the connection; nobody reads the answer

# None: the exception carries its own status (the image decoder's 400, 413 or 415; the router's 404 or 405)
STATUS: dict[type[Exception], Status | None] = {
    ModelNotFound: Status(404, 404),
    ModelError: Status(422, 400),  # a repository load of a folder that cannot be served
    QueueFull: Status(503, 503),
    TimedOut: Status(504, 504),
    LimitExceeded: Status(413, 413),
    MalformedBody: Status(400, 400),
    UnsupportedType: Status(415, 415),
    TargetUnreachable: Status(422, 422),
    ImageError: None,
    InputError: Status(422, 400),
    RequestValidationError: Status(422, 400),
    HTTPException: None,
    ClientDisconnect: Status(CLIENT_GONE, CLIENT_GONE),
}


def status_of(exc: BaseException, v2: bool) -> int:
    """The status answering ``exc`` (a subclass of a key of ``STATUS``)."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            rule = STATUS[cls]
            if rule is None:
                own: int = exc.status_code if isinstance(exc, HTTPException) else exc.status  # type: ignore[attr-defined]
                return own
            return rule.v2 if v2 else rule.status
    raise KeyError(f"no status for {type(exc).__name__}")  # only subclasses of STATUS's keys reach here


def message_of(exc: BaseException) -> str:
    if isinstance(exc, RequestValidationError):  # FastAPI's parameter checks, one line per parameter
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
            parts.append(f"{where}: {err.get('msg')} (got {err.get('input')!r})")
        return "; ".join(parts)
    if isinstance(exc, HTTPException):
        return str(exc.detail)
    return str(exc)


def error_key(path: str) -> str:
    """The error body's key: the Open Inference Protocol's on its routes, FastAPI's elsewhere."""
    return "error" if path.startswith("/v2") else "detail"


def error_response(exc: BaseException, path: str) -> Response:
    key = error_key(path)
    status = status_of(exc, v2=key == "error")
    if status == CLIENT_GONE:
        return Response(status_code=status)  # the client hung up: nothing went wrong here
    headers = None
    if isinstance(exc, QueueFull):
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
    elif isinstance(exc, HTTPException) and exc.headers:
        headers = dict(exc.headers)
    return JSONResponse(status_code=status, content={key: message_of(exc)}, headers=headers)


async def handle(request: Request, exc: Exception) -> Response:
    return error_response(exc, request.url.path)


def install(app: FastAPI) -> None:
    """Answer every exception in ``STATUS`` through the one handler."""
    for cls in STATUS:
        app.add_exception_handler(cls, handle)


class ErrorResponse(BaseModel):
    """The error body of every route but the v2 ones (OpenAPI documents it)."""

    detail: str
