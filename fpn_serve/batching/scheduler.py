"""Iteration-level batching: concurrent requests share one active batch, rebuilt every iteration.

Two worker threads form a pipeline. The *encoder* takes waiting requests a few rows at a time and
computes their Q in one batched run; the *stepper* moves encoded requests into the active batch at
the next iteration boundary, applies T once to every active sample, and lets each sample leave the
moment it meets its own request's tol, reaches its own max_iter or its request's deadline. A
request is answered (S, batched over the requests that finish in the same iteration) as soon as
its last sample leaves, however long the others run. Q of newcomers never stalls the iterations of
the requests already running, and ONNX Runtime releases the GIL, so on two or more cores the two
stages run at once.

Admission order. Under load Q is the costly stage, so the order of the queue decides who waits.
Each request gets a virtual deadline: its arrival time plus ``slack`` times its expected service,
the iterations its tolerance needs (from the calibration in the model's manifest, capped by its
max_iter) times the measured time of one iteration. Loose-tolerance requests, which leave after a
few iterations, therefore pass tight ones in the queue and keep their latency near their latency
alone. A request is passed only by requests whose virtual deadline is earlier, which arrive at
most ``slack`` times its own expected service after it, so none starves. A request's own deadline
(``deadline_ms``) caps its virtual deadline.

    scheduler = Scheduler(engine, max_active=256, max_queue=1024)
    scheduler.start()
    result = scheduler.classify(x, tol=1e-3)      # or scheduler.submit(...) -> Future
    result = await scheduler.submit_async(x)       # from an event loop: an asyncio future
    scheduler.stop()

A caller may cancel its future (a timeout does): a request cancelled while it waits is never
admitted, and one cancelled while it runs finishes without disturbing the others.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..runtime.engine import ClassifyResult, Engine
from ..errors import FPNServeError, InputError
from ..contract.manifest import Manifest
from ..runtime.solvers import SolveOutput

log = logging.getLogger("fpn_serve")

ENCODE_ROWS = 8  # rows per Q run: Q costs about the same per row from batch 4 up; short runs let urgent requests in
SLACK = 30.0  # virtual deadline = arrival + SLACK * expected service
SOLO_MAX_ITER = 100  # a request that finds the scheduler idle runs on its own if it is short


class QueueFull(FPNServeError):
    """The scheduler's queue is full; the caller should retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


Outcome = ClassifyResult | BaseException


@dataclass
class _Request:
    x: np.ndarray
    tol: float
    max_iter: int
    deadline: float  # absolute perf_counter time, inf for none
    future: Future[ClassifyResult] | asyncio.Future[ClassifyResult]
    loop: asyncio.AbstractEventLoop | None  # the loop of an asyncio future, None for a concurrent one
    # filled in when the request joins the shared batch (a lone request never needs them)
    u: np.ndarray = field(init=False)
    iterations: np.ndarray = field(init=False)
    residuals: np.ndarray = field(init=False)
    steps: np.ndarray = field(init=False)
    remaining: int = field(init=False)


class Scheduler:
    """Shares one active batch between concurrent ``classify`` calls on one engine.

    ``encode_rows``: inputs per batched Q run. ``slack``: the virtual-deadline factor (0: first
    come, first served; larger: loose tolerances first, tight ones later). ``encoders``: threads
    computing Q (one keeps a 2-core machine's other core for the stepper and the event loop).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_active: int = 256,
        max_queue: int = 1024,
        encode_rows: int = ENCODE_ROWS,
        slack: float = SLACK,
        encoders: int = 1,
    ) -> None:
        if max_active < 1 or max_queue < 1 or encode_rows < 1 or encoders < 1:
            raise ValueError("max_active, max_queue, encode_rows and encoders must be >= 1")
        if not slack >= 0:
            raise ValueError("slack must be >= 0")
        self.engine = engine
        self.max_active = max_active
        self.max_queue = max_queue
        self.encode_rows = encode_rows
        self.slack = slack
        self.encoders = encoders
        self._iterations_for = expected_iterations(engine.manifest)
        self._waiting: list[tuple[float, int, _Request]] = []  # heap by virtual deadline
        self._seq = itertools.count()  # ties keep arrival order
        self._ready: list[tuple[list[_Request], np.ndarray]] = []  # encoded, joining at the next iteration
        self._occupied = 0  # rows encoding, ready or active: never more than max_active
        self._lock = threading.Lock()
        self._to_encode = threading.Condition(self._lock)
        self._to_step = threading.Condition(self._lock)
        self._running = False
        self._encoding_rows = 0  # rows the encoders hold: neither waiting nor ready
        self._loop_owed = False  # a request ran on its own on an event loop that has not turned since
        self._threads: list[threading.Thread] = []
        self._iteration_s = 50e-6  # running mean of one iteration's wall time, for the virtual deadlines
        self._runner = engine.new_runner(max_active)
        # per active row, in runner order
        self._owner: list[_Request] = []
        self._row = np.zeros(max_active, np.int64)  # index of the row within its request
        self._tol = np.zeros(max_active, np.float32)
        self._max_iter = np.zeros(max_active, np.int32)
        self._deadline = np.zeros(max_active, np.float64)
        self._iters = np.zeros(max_active, np.int32)
        # written by the stepper thread alone; lone requests count under the lock (see ``stats``)
        self._counts = {"iterations": 0, "admitted": 0, "answered": 0, "max_active_seen": 0}
        self._solo_count = 0
        self._solo_rows = 0  # lone requests running in their callers' threads
        self._inline = engine.single_graph  # a lone input has a one-call path (FPN1.onnx on the CPU)

    # -- public ------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, int]:
        """Counts so far: iterations of the shared batch, requests admitted and answered (lone ones
        included), lone requests (``solo``) and the largest active batch."""
        counts = dict(self._counts)
        solo = self._solo_count
        counts["admitted"] += solo
        counts["answered"] += solo
        counts["solo"] = solo
        return counts

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return self._runner.n

    def start(self) -> None:
        with self._lock:
            if self._running:
                return
            self._running = True
        name = self.engine.name
        self._threads = [
            *(
                threading.Thread(target=self._encode_loop, name=f"fpn-encoder-{name}-{i}", daemon=True)
                for i in range(self.encoders)
            ),
            threading.Thread(target=self._step_loop, name=f"fpn-scheduler-{name}", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is active and queued, then stop the workers."""
        with self._lock:
            self._running = False
            self._to_encode.notify_all()
            self._to_step.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []

    def submit(
        self, x: Any, tol: float | None = None, max_iter: int | None = None, *, deadline_ms: float | None = None
    ) -> Future[ClassifyResult]:
        """Queue a request; the future resolves to the same result ``engine.classify`` would give.

        Raises InputError for bad input (nothing is queued) and QueueFull when the queue is full.
        """
        future: Future[ClassifyResult] = Future()
        self._enqueue(x, tol, max_iter, deadline_ms, future, None, inline=False)
        return future

    def submit_async(
        self, x: Any, tol: float | None = None, max_iter: int | None = None, *, deadline_ms: float | None = None
    ) -> asyncio.Future[ClassifyResult]:
        """``submit`` for a caller on a running event loop: the answer comes as an asyncio future of
        that loop, and the answers that finish in one iteration reach the loop in one wake-up."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ClassifyResult] = loop.create_future()
        self._enqueue(x, tol, max_iter, deadline_ms, future, loop, inline=not self._loop_owed)
        return future

    def _enqueue(
        self,
        x: Any,
        tol: float | None,
        max_iter: int | None,
        deadline_ms: float | None,
        future: Future[ClassifyResult] | asyncio.Future[ClassifyResult],
        loop: asyncio.AbstractEventLoop | None,
        *,
        inline: bool,
    ) -> None:
        submitted = time.perf_counter()
        x = self.engine.validate_inputs(x)
        tol, max_iter = self.engine.resolve(tol, max_iter)
        if x.shape[0] > self.max_active:
            raise InputError(f"{x.shape[0]} inputs in one request; this scheduler runs at most {self.max_active}")
        deadline = float("inf")
        if deadline_ms is not None:
            if isinstance(deadline_ms, bool) or not (isinstance(deadline_ms, (int, float)) and deadline_ms > 0):
                raise InputError(f"deadline_ms must be a positive number, got {deadline_ms!r}")
            deadline = submitted + deadline_ms / 1000.0
        request = _Request(x, tol, max_iter, deadline, future, loop)
        service = min(self._iterations_for(tol), max_iter) * self._iteration_s
        key = min(submitted + self.slack * service, deadline)
        with self._lock:
            if not self._running:
                raise QueueFull("the scheduler is not running", retry_after=1.0)
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are queued, the most allowed; retry shortly")
            # Alone in an idle scheduler there is nothing to share a batch with: the caller runs it
            # itself, as one engine call, while later requests queue for the shared batch as usual.
            # On an event loop, that blocks the loop; the next request of that loop runs on its own
            # only after the loop has turned once (read its sockets, resumed its other callers), so
            # a burst of callers still meets in the shared batch.
            solo = (
                inline
                and self._inline
                and self._occupied == 0
                and not self._waiting
                and x.shape[0] == 1
                and max_iter <= SOLO_MAX_ITER
                and math.isinf(deadline)
                and _still_wanted(request)
            )
            if solo:
                self._occupied = self._solo_rows = 1
            else:
                heapq.heappush(self._waiting, (key, next(self._seq), request))
                self._to_encode.notify()
        if solo:
            self._run_solo(request)

    def classify(
        self, x: Any, tol: float | None = None, max_iter: int | None = None, *, deadline_ms: float | None = None
    ) -> ClassifyResult:
        """``submit`` and wait. A lone input that finds the scheduler idle runs in this thread."""
        future: Future[ClassifyResult] = Future()
        self._enqueue(x, tol, max_iter, deadline_ms, future, None, inline=True)
        return future.result()

    # -- the encoder: Q of newcomers, a few rows at a time -----------------------------------
    def _encode_loop(self) -> None:
        while True:
            with self._lock:
                while not (self._waiting and self._fits()):
                    if not self._running and not self._waiting:
                        self._to_step.notify_all()  # the stepper may now finish
                        return
                    self._to_encode.wait()
                taken = self._take_admissible()
                rows = sum(r.x.shape[0] for r in taken)
                self._encoding_rows += rows
            if not taken:  # the head of the queue had been cancelled
                continue
            try:
                z = self.engine.encode(np.concatenate([r.x for r in taken]) if len(taken) > 1 else taken[0].x)
            except Exception as exc:  # these callers get the error; nobody else is affected
                log.exception("scheduler: Q failed")
                _settle([(req, exc) for req in taken])
                with self._lock:
                    self._occupied -= rows
                    self._encoding_rows -= rows
                    self._to_step.notify()
                continue
            with self._lock:
                self._ready.append((taken, z))
                self._encoding_rows -= rows
                self._to_step.notify()

    def _run_solo(self, req: _Request) -> None:
        """Answer a request that found the scheduler idle in the caller's own thread, with one
        ``engine.classify`` call (for one input on the CPU, FPN1.onnx: Q, the loop and S in one ONNX
        Runtime run): the same answer to the bit as the shared batch gives, without two thread
        hand-offs and the per-iteration bookkeeping."""
        outcome: Outcome
        try:
            outcome = self.engine.classify(req.x, req.tol, req.max_iter)
        except Exception as exc:
            outcome = exc
        finally:
            with self._lock:
                self._occupied -= 1
                self._solo_rows = 0
                self._solo_count += 1
                if self._waiting:
                    self._to_encode.notify()
        if req.loop is not None:
            self._loop_owed = True
            req.loop.call_soon(self._loop_turned)
        future = req.future
        if future.done():  # an asyncio caller gave up meanwhile
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def _loop_turned(self) -> None:
        self._loop_owed = False

    def _fits(self) -> bool:
        rows: int = self._waiting[0][2].x.shape[0]
        return rows <= self.max_active - self._occupied

    def _take_admissible(self) -> list[_Request]:
        """Pop requests by virtual deadline while they fit, up to ``encode_rows`` rows (at least one
        request). The head is never skipped, so a large request is not passed by smaller ones."""
        taken: list[_Request] = []
        rows = 0
        while self._waiting and rows < self.encode_rows:
            req = self._waiting[0][2]
            n = req.x.shape[0]
            if n > self.max_active - self._occupied:
                break
            heapq.heappop(self._waiting)
            if not _still_wanted(req):  # cancelled while it waited: nobody needs the answer
                continue
            self._occupied += n
            rows += n
            taken.append(req)
        return taken

    # -- the stepper: one iteration of the active batch at a time ----------------------------
    def _step_loop(self) -> None:
        while True:
            with self._lock:
                while not self._ready and self._runner.n == 0:
                    if not self._running and not self._waiting and not self._encoding_rows:
                        return
                    self._to_step.wait()
                ready, self._ready = self._ready, []
            admitted: list[_Request] = [req for batch, _ in ready for req in batch]
            try:
                for batch, z in ready:
                    self._admit(batch, z)
                admitted = []  # from here on they are in the active batch (self._owner)
                if self._runner.n:
                    self._iterate()
            except Exception as exc:  # never leave a caller waiting forever
                log.exception("scheduler iteration failed")
                self._fail_all(exc, admitted)

    def _admit(self, requests: list[_Request], z: np.ndarray) -> None:
        start = self._runner.n
        self._runner.add(z)
        for req in requests:
            n = req.x.shape[0]
            req.u = np.zeros((n, *z.shape[1:]), np.float32)
            req.iterations = np.zeros(n, np.int32)
            req.residuals = np.full(n, np.inf, np.float32)
            req.steps = np.full(n, np.inf, np.float32)
            req.remaining = n
            sl = slice(start, start + n)
            self._owner.extend([req] * n)
            self._row[sl] = np.arange(n)
            self._tol[sl] = req.tol
            self._max_iter[sl] = req.max_iter
            self._deadline[sl] = req.deadline
            self._iters[sl] = 0
            start += n
        self._counts["admitted"] += len(requests)

    def _iterate(self) -> None:
        n = self._runner.n
        self._counts["max_active_seen"] = max(self._counts["max_active_seen"], n)
        began = time.perf_counter()
        r, st = self._runner.step()
        now = time.perf_counter()
        self._iteration_s += 0.05 * (now - began - self._iteration_s)
        self._counts["iterations"] += 1
        iters = self._iters[:n]
        iters += 1
        done = (r <= self._tol[:n]) | (iters >= self._max_iter[:n]) | (self._deadline[:n] <= now)
        if not done.any():
            return
        idx = np.flatnonzero(done)
        u_done = self._runner.current(done)
        finished: list[tuple[_Request, int]] = []
        owners = self._owner
        rows = self._row[idx]
        for j, i in enumerate(idx.tolist()):
            req = owners[i]
            row = rows[j]
            req.u[row] = u_done[j]
            req.iterations[row] = iters[i]
            req.residuals[row] = r[i]
            req.steps[row] = st[i]
            req.remaining -= 1
            if req.remaining == 0:
                finished.append((req, req.x.shape[0]))
        keep = ~done
        self._owner = [o for o, k in zip(owners, keep.tolist(), strict=True) if k]
        m = len(self._owner)
        for arr in (self._row, self._tol, self._max_iter, self._deadline, self._iters):
            arr[:m] = arr[:n][keep]
        self._runner.keep(keep)
        with self._lock:  # room for newcomers
            self._occupied -= n - m
            if self._waiting:
                self._to_encode.notify()
        if finished:
            self._answer(finished)

    def _answer(self, finished: list[tuple[_Request, int]]) -> None:
        """S for every finished request in one run, then each caller gets its own slice."""
        reqs = [r for r, _ in finished]
        if len(reqs) == 1:  # the common case under load: nothing to join or to split
            only = reqs[0]
            out = SolveOutput(only.u, only.iterations, only.residuals, only.steps)
            tols = np.full(finished[0][1], only.tol, np.float32)
        else:
            out = SolveOutput(
                np.concatenate([r.u for r in reqs]),
                np.concatenate([r.iterations for r in reqs]),
                np.concatenate([r.residuals for r in reqs]),
                np.concatenate([r.steps for r in reqs]),
            )
            tols = np.concatenate([np.full(n, r.tol, np.float32) for r, n in finished])
        try:
            result = self.engine.decode(out, tols)
        except Exception as exc:
            _settle([(req, exc) for req in reqs])
            return
        if len(reqs) == 1:
            _settle([(reqs[0], result)])
            self._counts["answered"] += 1
            return
        outcomes: list[tuple[_Request, Outcome]] = []
        start = 0
        probabilities = result.probabilities  # one softmax for all of them
        for req, n in finished:
            sl = slice(start, start + n)
            start += n
            outcomes.append(
                (
                    req,
                    ClassifyResult(
                        labels=result.labels[sl],
                        logits=result.logits[sl],
                        iterations=result.iterations[sl],
                        residuals=result.residuals[sl],
                        converged=result.converged[sl],
                        error_bounds=result.error_bounds[sl],
                        names=result.names,
                        probabilities=probabilities[sl],
                    ),
                )
            )
        _settle(outcomes)
        self._counts["answered"] += len(finished)

    def _fail_all(self, exc: Exception, admitted: list[_Request]) -> None:
        """An iteration failed: every request in the active batch, joining it or encoded for it gets
        ``exc``; the queue is left to run later."""
        with self._lock:
            ready = [req for batch, _ in self._ready for req in batch]
            self._ready = []
            # what still holds rows: batches being encoded and a lone request in its caller's thread
            self._occupied = self._encoding_rows + self._solo_rows
            self._to_encode.notify()
        victims = {id(r): r for r in [*self._owner, *admitted, *ready]}.values()
        _settle([(req, exc) for req in victims])
        self._owner = []
        if self._runner.n:
            self._runner.keep(np.zeros(self._runner.n, bool))


def _still_wanted(req: _Request) -> bool:
    """Mark a concurrent future running (from then on it cannot be cancelled); False if it was cancelled."""
    if isinstance(req.future, Future):
        return req.future.set_running_or_notify_cancel()
    return not req.future.done()  # cancelled, or failed by its caller's timeout


def _settle(outcomes: list[tuple[_Request, Outcome]]) -> None:
    """Give each request its result or exception: concurrent futures directly, asyncio futures in one
    ``call_soon_threadsafe`` per loop. A future its caller has given up on (cancelled, timed out) is skipped."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Outcome]]] = {}
    for req, outcome in outcomes:
        if req.loop is not None:
            by_loop.setdefault(req.loop, []).append((req.future, outcome))
            continue
        future = req.future
        try:
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        except InvalidStateError:  # cancelled or already failed
            pass
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[asyncio.Future[ClassifyResult], Outcome]]) -> None:
    """On the caller's loop: resolve the futures nobody has given up on."""
    for future, outcome in items:
        if future.done():
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


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
