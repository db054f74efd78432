"""The gRPC server's lifecycle: built on the running asyncio loop, bound, started, stopped.

    endpoint = GrpcEndpoint(registry, settings)   # on the loop that serves HTTP
    endpoint.bind()                               # FPNServeError when the port is taken
    await endpoint.start()                        # once the registry's schedulers run
    await endpoint.stop()                         # in-flight calls get the request timeout to finish

The server takes the HTTP side's limits: messages up to ``max_body_bytes`` (a larger one is
RESOURCE_EXHAUSTED before it is read), ``max_inputs`` per request, and with a token set, every
call but ServerLive and ServerReady (the health calls, open as over HTTP) needs the metadata
``authorization: Bearer <token>`` (UNAUTHENTICATED otherwise).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from ..batching.registry import ModelRegistry
from ..errors import FPNServeError
from ..settings import Settings
from . import grpc_service_pb2_grpc as pb_grpc
from .service import InferenceService

log = logging.getLogger("fpn_serve")

SERVICE = "inference.GRPCInferenceService"
OPEN_METHODS = frozenset({f"/{SERVICE}/ServerLive", f"/{SERVICE}/ServerReady"})  # no token needed
AUTH_MESSAGE = "this server needs the metadata 'authorization: Bearer <token>' on every call but health"


async def _deny(request: Any, context: Any) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, AUTH_MESSAGE)


class BearerAuth(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no type hints
    """Refuse with UNAUTHENTICATED every call but those to ``OPEN_METHODS`` without the token."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}".encode()
        self.deny = grpc.unary_unary_rpc_method_handler(_deny)

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        if details.method not in OPEN_METHODS:
            given = next((v for k, v in details.invocation_metadata or () if k == "authorization"), "")
            given = given.encode() if isinstance(given, str) else given
            if not hmac.compare_digest(given, self.expected):
                return self.deny
        return await continuation(details)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcEndpoint:
    """The inference service on ``settings.host``:``port`` (default ``settings.grpc_port``), serving
    ``registry``; built on the running loop so that calls await the scheduler's asyncio futures."""

    def __init__(self, registry: ModelRegistry, settings: Settings, port: int | None = None) -> None:
        self.registry, self.settings = registry, settings
        self.address = _address(settings.host, settings.grpc_port if port is None else port)
        token = settings.bearer_token
        self.server = grpc.aio.server(
            interceptors=[BearerAuth(token)] if token is not None else [],
            options=[
                ("grpc.max_receive_message_length", settings.max_body_bytes),
                ("grpc.so_reuseport", 0),  # a port another server holds is an error, not shared
            ],
        )
        service = InferenceService(registry, settings)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(service, self.server)  # type: ignore[no-untyped-call]
        self.port = 0

    def bind(self) -> int:
        """Listen on the address; returns the port (the one chosen, for port 0). Raises
        FPNServeError when the address cannot be bound."""
        try:
            self.port = int(self.server.add_insecure_port(self.address))
        except RuntimeError as exc:  # grpc raises for an address in use
            raise FPNServeError(f"cannot listen for gRPC on {self.address}: {exc}") from exc
        if self.port == 0:
            raise FPNServeError(f"cannot listen for gRPC on {self.address}; choose another --grpc-port (0: no gRPC)")
        return self.port

    async def start(self) -> None:
        await self.server.start()
        log.info("gRPC (Open Inference Protocol) on %s", _address(self.settings.host, self.port))

    async def stop(self) -> None:
        """Refuse new calls; calls in flight get up to the request timeout to finish."""
        await self.server.stop(grace=self.settings.request_timeout_s)
