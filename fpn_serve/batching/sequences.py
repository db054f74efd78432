"""Warm starts for streams: the last fixed point of each live sequence, per model.

A caller that sends a stream of related inputs (frames of a video, readings of a sensor) names it
with Triton's sequence parameters: ``sequence_id`` (a positive integer or a string),
``sequence_start`` and ``sequence_end``. The server keeps each live sequence's last latents and
starts the sequence's next input from them instead of from 0. The fixed point is unique, so the
answer is the cold start's to within tol; only the iterations change.

Memory is bounded: at most ``max_sequences`` live sequences per store (the least recently used
goes first), each dropped after ``idle_s`` seconds without an input, and at ``sequence_end``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

SequenceId = int | str
MAX_ID_CHARS = 128


@dataclass(frozen=True)
class SequenceRef:
    """A request's place in a stream, as its protocol gave it (validated by ``parse_sequence``)."""

    id: SequenceId
    start: bool = False
    end: bool = False


def parse_sequence(sequence_id: object, start: object = False, end: object = False) -> SequenceRef | None:
    """Check Triton's sequence parameters; None when ``sequence_id`` is absent (or 0, Triton's "none")."""
    if sequence_id is None or sequence_id == 0 or sequence_id == "":
        if start or end:
            raise InputError("sequence_start and sequence_end need a sequence_id")
        return None
    if isinstance(sequence_id, bool) or not isinstance(sequence_id, (int, str)):
        raise InputError(f"sequence_id must be a positive integer or a string, got {sequence_id!r}")
    if isinstance(sequence_id, int) and sequence_id < 0:
        raise InputError(f"sequence_id must be a positive integer or a string, got {sequence_id}")
    if isinstance(sequence_id, str) and len(sequence_id) > MAX_ID_CHARS:
        raise InputError(f"sequence_id has {len(sequence_id)} characters; at most {MAX_ID_CHARS} are allowed")
    for name, flag in (("sequence_start", start), ("sequence_end", end)):
        if not isinstance(flag, bool):
            raise InputError(f"{name} must be true or false, got {flag!r}")
    return SequenceRef(sequence_id, bool(start), bool(end))


class SequenceStore:
    """The live sequences of one model: id -> last latents [rows, *latent], least recently used first.

    Safe to call from any thread.
    """

    def __init__(
        self, max_sequences: int = 1024, idle_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_sequences < 1 or not idle_s > 0:
            raise ValueError("max_sequences must be >= 1 and idle_s > 0")
        self.max_sequences = max_sequences
        self.idle_s = idle_s
        self._clock = clock
        self._live: OrderedDict[SequenceId, tuple[float, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self.dropped = 0  # sequences dropped before their end: idle, or pushed out by newer ones

    def __len__(self) -> int:
        return len(self._live)

    @property
    def nbytes(self) -> int:
        """The memory the kept latents take."""
        with self._lock:
            return sum(u.nbytes for _, u in self._live.values())

    def start_of(self, ref: SequenceRef, rows: int) -> np.ndarray | None:
        """The warm start for the next input of ``ref`` with ``rows`` rows: its last latents, or None
        (a cold start) at ``sequence_start``, for an unknown or expired sequence, or when the row
        count changed."""
        with self._lock:
            self._expire()
            if ref.start:
                self._live.pop(ref.id, None)
                return None
            entry = self._live.get(ref.id)
            if entry is None or entry[1].shape[0] != rows:
                return None
            self._live[ref.id] = (self._clock(), entry[1])  # in use: neither idle nor least recent
            self._live.move_to_end(ref.id)
            return entry[1]

    def update(self, ref: SequenceRef, latents: np.ndarray | None) -> None:
        """Keep ``latents`` as the sequence's last fixed point; at ``sequence_end``, forget it."""
        with self._lock:
            if ref.end or latents is None:
                self._live.pop(ref.id, None)
                return
            # a copy: an answer's latents may be a slice of the whole batch's array, kept alive by a view
            self._live[ref.id] = (self._clock(), np.array(latents, np.float32, copy=True))
            self._live.move_to_end(ref.id)
            while len(self._live) > self.max_sequences:
                self._live.popitem(last=False)
                self.dropped += 1

    def _expire(self) -> None:
        horizon = self._clock() - self.idle_s
        while self._live:
            oldest = next(iter(self._live))
            if self._live[oldest][0] > horizon:
                break
            del self._live[oldest]
            self.dropped += 1
