"""Exceptions raised by fpn_serve.

    FPNServeError
    ├── ModelError       a model folder or manifest is missing, malformed, or fails its checks
    └── InputError       a caller's input or parameter is invalid (the HTTP layer answers 4xx)
        └── ImageError   bytes that cannot be decoded as an allowed image, or are too large

Every message says what was wrong and, where it helps, what is allowed.
"""

from __future__ import annotations


class FPNServeError(Exception):
    """Base class of every error fpn_serve raises on purpose."""


class ModelError(FPNServeError):
    """A model folder cannot be served as it is."""


class InputError(FPNServeError, ValueError):
    """Invalid caller input; ``status`` is the HTTP status the server answers with."""

    status = 422


class ImageError(InputError):
    """An image body that cannot be used."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
