"""The errors ``fpn-train`` and ``fpn-export`` turn into one clear line instead of a traceback.

RuntimeError
 ├── DataError        a dataset could not be found, fetched or read
 └── CheckpointError  a checkpoint is missing, unreadable or not ours; an output cannot be written
ValueError
 └── ConfigError      a training setting outside its allowed range or choices
"""

from __future__ import annotations


class DataError(RuntimeError):
    """A dataset could not be found, fetched or read; the message says what was tried."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or not one of ours; or an output cannot be written."""


class ConfigError(ValueError):
    """A setting's value is not allowed: ``name`` is the field, ``reason`` what is wrong with it."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name} {reason}")
        self.name = name
        self.reason = reason
