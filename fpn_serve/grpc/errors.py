"""One table from exception to gRPC status code, for every call of the inference service.

Below the protocol, code raises domain errors (``fpn_serve.errors``); this package adds the one
that only a protocol knows (``TimedOut``: the call's deadline or the server's request timeout
passed). ``CODES`` maps each to its status code; a more specific class wins over its base (the
lookup follows the class's MRO). A caller's mistake is never UNKNOWN or INTERNAL: INTERNAL is
kept for a failure of the server itself, whose details go to the log, not to the caller.
"""

from __future__ import annotations

import grpc

from ..errors import FPNServeError, InputError, LimitExceeded, ModelError, ModelNotFound, QueueFull


class TimedOut(FPNServeError):
    """The call ran past its deadline or the server's request timeout."""


CODES: dict[type[BaseException], grpc.StatusCode] = {
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    InputError: grpc.StatusCode.INVALID_ARGUMENT,
    TimedOut: grpc.StatusCode.DEADLINE_EXCEEDED,
    ModelError: grpc.StatusCode.FAILED_PRECONDITION,  # a repository folder that cannot be served as it is
    FPNServeError: grpc.StatusCode.FAILED_PRECONDITION,
}

INTERNAL_MESSAGE = "the server failed to answer this call; its log says why"


def code_of(exc: BaseException) -> grpc.StatusCode:
    """The status code answering ``exc``: its class's (or nearest base's) entry in ``CODES``,
    INTERNAL for an exception the server did not raise on purpose."""
    for cls in type(exc).__mro__:
        code = CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def trailers_of(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """Trailing metadata that helps a caller act on ``exc``: how long to wait before retrying a
    full queue (as HTTP's Retry-After)."""
    if isinstance(exc, QueueFull):
        return (("retry-after", str(max(1, round(exc.retry_after)))),)
    return ()
