"""The scheduler's policy, as a plain object: who waits, who is admitted next, who runs alone.

No threads, no futures and no clock of its own (the caller passes ``now``), so every decision can
be tested with a list of requests. The scheduler (``scheduler.py``) holds its lock around each
call and carries the decisions out.

Rooms. The shared batch holds at most ``capacity`` rows. A row holds a room from the moment it is
taken for encoding until it leaves the active batch (or, for a request that runs alone, until its
caller's engine call returns); ``occupied`` counts them.

Admission order. Under load Q is the costly stage, so the order of the queue decides who waits.
Each request gets a virtual deadline: its arrival time plus ``slack`` times its expected service,
the iterations its tolerance needs (from the calibration in the model's manifest, capped by its
max_iter) times the measured time of one iteration. Loose-tolerance requests, which leave after a
few iterations, therefore pass tight ones in the queue and keep their latency near their latency
alone. A request is passed only by requests whose virtual deadline is earlier, which arrive at
most ``slack`` times its own expected service after it, so none starves. A request's own deadline
(``deadline_ms``) caps its virtual deadline.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ..contract.manifest import Manifest
from ..errors import QueueFull
from ..runtime.request import Prepared

ENCODE_ROWS = 16  # rows per Q run: Q costs about the same per row from batch 4 up; fewer hand-offs per answer
SLACK = 30.0  # virtual deadline = arrival + SLACK * expected service
ALONE_MAX_ITER = 100  # a request that finds the scheduler idle runs alone if it is short
FAST_LANE_ITERATIONS = 4.0  # loose tolerances (mean iterations at most this) take the fast lane

Item = TypeVar("Item")


class QueuePolicy(Generic[Item]):
    """The queue by virtual deadline, the room count and the choice to run a request alone.

    ``Item`` is whatever the scheduler queues (its request objects); the policy reads only the
    ``Prepared`` passed beside it.
    """

    def __init__(
        self,
        iterations_for: Callable[[float], float],
        *,
        capacity: int,
        max_queue: int,
        encode_rows: int = ENCODE_ROWS,
        slack: float = SLACK,
    ) -> None:
        if capacity < 1 or max_queue < 1 or encode_rows < 1:
            raise ValueError("capacity, max_queue and encode_rows must be >= 1")
        if not slack >= 0:
            raise ValueError("slack must be >= 0")
        self.iterations_for = iterations_for
        self.capacity = capacity
        self.max_queue = max_queue
        self.encode_rows = encode_rows
        self.slack = slack
        self.occupied = 0  # rows encoding, ready, active or running alone: never more than capacity
        self.iteration_s = 50e-6  # running mean of one iteration's wall time
        self.chooser = ModeChooser()  # the shared batch, one engine call per input, or inline: per load level
        self._waiting: list[tuple[float, int, int, Item]] = []  # heap of (virtual deadline, seq, rows, item)
        self._seq = itertools.count()  # ties keep arrival order

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def virtual_deadline(self, request: Prepared, now: float) -> float:
        service = min(self.iterations_for(request.tol), request.max_iter) * self.iteration_s
        return min(now + self.slack * service, request.deadline)

    def may_run_alone(self, request: Prepared) -> bool:
        """Alone in an idle scheduler there is nothing to share a batch with: one short, plain input
        (no deadline, certified stop, trace or warm start) runs as one engine call in its caller's
        thread. Takes its room if so."""
        alone = self.occupied == 0 and not self._waiting and _short_plain_single(request)
        if alone:
            self.occupied = 1
        return alone

    def fast_lane(self, request: Prepared) -> bool:
        """A plain single input whose tolerance needs at most ``FAST_LANE_ITERATIONS`` on average
        runs as one engine call in its caller's thread even while the scheduler is busy, if a room
        is free: its caller chose speed over accuracy, and it waits behind no batch. Takes its room
        if so."""
        fast = (
            self.occupied < self.capacity
            and _short_plain_single(request)
            and self.iterations_for(request.tol) <= FAST_LANE_ITERATIONS
        )
        if fast:
            self.occupied += 1
        return fast

    def push(self, item: Item, request: Prepared, now: float) -> None:
        """Queue ``item``; QueueFull when ``max_queue`` requests already wait."""
        if len(self._waiting) >= self.max_queue:
            raise QueueFull(f"{len(self._waiting)} requests are queued, the most allowed; retry shortly")
        heapq.heappush(self._waiting, (self.virtual_deadline(request, now), next(self._seq), request.rows, item))

    def head_fits(self) -> bool:
        """Whether the first request in the queue fits in the free rooms."""
        return bool(self._waiting) and self._waiting[0][2] <= self.capacity - self.occupied

    def take(self, still_wanted: Callable[[Item], bool]) -> tuple[list[Item], int]:
        """Pop requests by virtual deadline while they fit, up to ``encode_rows`` rows (at least one
        request), taking their rooms; returns them and their rows. The head is never skipped, so a
        large request is not passed by smaller ones. A request its caller no longer wants is
        dropped without a room."""
        taken: list[Item] = []
        rows = 0
        while self._waiting and rows < self.encode_rows:
            n = self._waiting[0][2]
            if n > self.capacity - self.occupied:
                break
            item = heapq.heappop(self._waiting)[3]
            if not still_wanted(item):
                continue
            self.occupied += n
            rows += n
            taken.append(item)
        return taken, rows

    def release(self, rows: int) -> None:
        """``rows`` rows left (answered, failed or done alone): their rooms are free."""
        self.occupied -= rows

    def observe_iteration(self, seconds: float) -> None:
        self.iteration_s += 0.05 * (seconds - self.iteration_s)

    def goes_solo(self, taken: list[Prepared]) -> bool:
        """Whether the requests just taken are answered one engine call each (on the CPU one
        FPN1.onnx run, its loop inside ONNX Runtime) instead of joining the shared batch: plain
        single inputs, while the chooser finds that faster at the present load."""
        return self.chooser.mode == SOLO and all(p.rows == 1 and p.plain for p in taken)

    def inline(self) -> bool:
        """Whether an input that finds nothing queued, encoding or running runs in its caller's
        thread even on an event loop that has not turned since its last one (``INLINE``)."""
        return self.chooser.mode == INLINE

    def answered(self, count: int, now: float, ready: int = 0) -> None:
        """``count`` requests were answered (by any path), before their rooms are released: the
        chooser's measure, at the load they met (rooms held and requests waiting, or ``ready``:
        for a request run in its caller's thread, its event loop's requests since it last turned)."""
        self.chooser.answered(count, max(self.occupied + len(self._waiting), ready), now)


def _short_plain_single(request: Prepared) -> bool:
    """One input, at most ALONE_MAX_ITER iterations, no deadline, certified stop, trace or warm
    start: what may run as one engine call in its caller's thread."""
    return request.rows == 1 and request.max_iter <= ALONE_MAX_ITER and request.plain


def expected_iterations(manifest: Manifest) -> Callable[[float], float]:
    """The iterations a request at ``tol`` needs on average, for ordering the queue.

    From the manifest's calibration (mean iterations at several tolerances), linear in log10(tol)
    between them and beyond them; without one, from the certified contraction factor gamma:
    log(tol) / log(gamma). At least 1; infinite for tol = 0.
    """
    by_tol: dict[float, float] = {}  # log10(tol) -> mean iterations; malformed rows are skipped
    table = manifest.calibration.get("tolerances", [])
    for row in table if isinstance(table, list) else []:
        tol: Any = row.get("tol") if isinstance(row, dict) else None
        mean: Any = row.get("mean_iterations") if isinstance(row, dict) else None
        if _finite_number(tol) and tol > 0 and _finite_number(mean) and mean >= 0:
            by_tol[math.log10(tol)] = float(mean)
    if len(by_tol) >= 2:
        xs = sorted(by_tol)
        ys = [by_tol[x] for x in xs]

        def from_calibration(tol: float) -> float:
            if tol <= 0:
                return math.inf
            x = math.log10(tol)
            i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
            slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
            return max(1.0, ys[i - 1] + slope * (x - xs[i - 1]))

        return from_calibration
    factor = manifest.contraction.gamma

    def from_contraction(tol: float) -> float:
        if tol <= 0:
            return math.inf
        if not 0 < factor < 1:
            return 1.0
        return max(1.0, math.log(tol) / math.log(factor))

    return from_contraction


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


SHARED, SOLO, INLINE = "shared", "solo", "inline"
MODES = (SHARED, SOLO, INLINE)


class ModeChooser:
    """Chooses how the scheduler answers plain single inputs, from the answers per second each way
    achieved, at each load level (requests held or waiting, in powers of two):

    - ``SHARED``: the shared batch (Q batched in the encoder, iterations in the stepper);
    - ``SOLO``: the encoder answers queued inputs one engine call each (FPN1.onnx on the CPU);
    - ``INLINE``: an input that finds the scheduler with nothing of its own to do runs in its
      caller's thread, also on an event loop that has not turned since its last one: requests
      one at a time, with no hand-off between threads.

    Time is cut into epochs of ``EPOCH_S``; after each, the mode for the next is the fastest at
    the epoch's level, or one whose figure there is missing or older than ``STALE_S`` (so a change
    of machine load or traffic is noticed). Inline requests never queue: their load is the count of
    requests an event loop ran inline since it last turned (the scheduler's), which is how many of
    its callers were ready at once. An epoch with a pause longer than itself is not measured: an
    idle server says nothing about any mode."""

    EPOCH_S = 0.25
    STALE_S = 10.0

    def __init__(self) -> None:
        self.mode = SHARED
        self.rates: dict[tuple[int, str], tuple[float, float]] = {}  # (level, mode) -> (answers/s, when)
        self._began = self._last = -math.inf
        self._count = 0
        self._load = 0.0

    def answered(self, count: int, load: int, now: float) -> None:
        if now - self._last > self.EPOCH_S:  # idle meanwhile (or the first answer): a new epoch
            self._began, self._count, self._load = now, 0, 0.0
        self._last = now
        self._count += count
        self._load = max(self._load, float(load))
        if now - self._began >= self.EPOCH_S:
            self._close(now)

    def _close(self, now: float) -> None:
        level = max(0, round(math.log2(max(self._load, 1.0))))
        rate = self._count / (now - self._began)
        kept = self.rates.get((level, self.mode))
        if kept is not None and now - kept[1] <= self.STALE_S:
            rate = 0.5 * (rate + kept[0])
        self.rates[level, self.mode] = (rate, now)
        fresh = {}
        for mode in MODES:
            figure = self.rates.get((level, mode))
            if figure is None or now - figure[1] > self.STALE_S:
                self.mode = mode  # not measured here lately: try it
                break
            fresh[mode] = figure[0]
        else:
            self.mode = max(fresh, key=fresh.__getitem__)
        self._began, self._count, self._load = now, 0, 0.0
