"""Exceptions raised by fpn_serve: domain errors, which say what went wrong, never how a protocol
answers it (``fpn_serve.http.errors`` maps each to a status in one table).

    FPNServeError
    ├── ModelError         a model folder or manifest is missing, malformed, or fails its checks
    ├── ModelNotFound      no served model has the name (or version) a request asks for
    ├── QueueFull          the scheduler's queue is full; retry after ``retry_after`` seconds
    └── InputError         a caller's input or parameter is invalid
        ├── LimitExceeded  a body, an input count or an image over its limit
        ├── TargetUnreachable  an accuracy or latency target the model cannot meet (says the best it offers)
        └── ImageError     bytes that cannot be decoded as an allowed image, or are too large

Every message says what was wrong and, where it helps, what is allowed.
"""

from __future__ import annotations


class FPNServeError(Exception):
    """Base class of every error fpn_serve raises on purpose."""


class ModelError(FPNServeError):
    """A model folder cannot be served as it is."""


class ModelNotFound(FPNServeError):
    """A request names a model (or a version of one) that is not served; the message lists those that are."""


class QueueFull(FPNServeError):
    """The scheduler's queue is full; the caller should retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InputError(FPNServeError, ValueError):
    """Invalid caller input: a wrong shape, type or value, or a parameter out of its range."""


class LimitExceeded(InputError):
    """Input over a size limit (body bytes, inputs per request, image pixels)."""


class TargetUnreachable(InputError):
    """A target_accuracy or latency_budget_ms the model cannot meet; the message says the best it offers."""


class ImageError(InputError):
    """An image body that cannot be used. ``status`` tells its kind as an HTTP status: 400 unreadable,
    413 too large, 415 a model that takes no images (the image decoder sets it)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
