"""Pure ASGI middleware, one concern each: the bearer token, the request metrics, the body limit.

Plain ASGI classes cost one call each per request; ``@app.middleware("http")`` would put an extra
task and stream around every request, which the sub-millisecond /classify answer would feel.
"""

from __future__ import annotations

import hmac
import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import LimitExceeded
from .errors import error_key

AUTH_MESSAGE = "this server needs 'Authorization: Bearer <token>' on every route but health"


class BearerAuth:
    """Refuse with 401 every HTTP request but those to ``open_paths`` that lacks the bearer token."""

    def __init__(self, app: ASGIApp, token: str | None, open_paths: frozenset[str]) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode() if token is not None else None
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is not None and scope["type"] == "http" and scope["path"] not in self.open_paths:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = JSONResponse(
                    status_code=401,
                    content={error_key(scope["path"]): AUTH_MESSAGE},
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestMetrics:
    """Count every HTTP request by route and status, with its latency, in the app's registry."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            app = scope.get("app")
            registry = getattr(app.state, "registry", None) if app is not None else None
            if registry is not None:
                path = getattr(scope.get("route"), "path", "unmatched")
                registry.metrics.observe_request(path, status, time.perf_counter() - started)


class BodyLimit:
    """Bodies over ``limit`` bytes raise LimitExceeded where the route reads them: at once when the
    declared Content-Length is over, else (a chunked body) as soon as the bytes read pass it. A
    body within its declared length is passed on uncounted: the HTTP server delivers no more than
    that. Raised inside the route, the error is answered by the route's error table and counted
    under the route."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit
        declared = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                declared = value
                break
        if declared is not None and declared.isdigit():
            if int(declared) <= limit:  # the server reads no byte past a declared length: nothing to count
                await self.app(scope, receive, send)
                return
            message = f"the body is {declared.decode()} bytes; at most {limit} are allowed"

            async def refuse() -> Message:
                raise LimitExceeded(message)

            await self.app(scope, refuse, send)
            return
        size = 0

        async def counted() -> Message:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    raise LimitExceeded(f"the body is over {limit} bytes, the most allowed")
            return message

        await self.app(scope, counted, send)
