"""Iteration-level batching: concurrent requests share one active batch, rebuilt every iteration.

One worker thread owns a ``StepRunner``. At each iteration boundary it admits waiting requests
(their Q computed in one batched run) as far as the active batch has room, applies T once to every
active sample, and lets each sample leave the moment it meets its own request's tol, reaches its
own max_iter or its request's deadline. A request is answered as soon as its last sample leaves,
however long the others run. Admission is first come, first served, and every sample leaves after
at most max_iter iterations, so no request waits forever behind others.

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
import contextlib
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .engine import ClassifyResult, Engine
from .errors import FPNServeError, InputError
from .solvers import SolveOutput

log = logging.getLogger("fpn_serve")


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
    u: np.ndarray = field(init=False)
    iterations: np.ndarray = field(init=False)
    residuals: np.ndarray = field(init=False)
    steps: np.ndarray = field(init=False)
    remaining: int = field(init=False)

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        self.remaining = n
        self.iterations = np.zeros(n, np.int32)
        self.residuals = np.full(n, np.inf, np.float32)
        self.steps = np.full(n, np.inf, np.float32)


class Scheduler:
    """Shares one active batch between concurrent ``classify`` calls on one engine."""

    def __init__(self, engine: Engine, *, max_active: int = 256, max_queue: int = 1024) -> None:
        if max_active < 1 or max_queue < 1:
            raise ValueError("max_active and max_queue must be >= 1")
        self.engine = engine
        self.max_active = max_active
        self.max_queue = max_queue
        self._waiting: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self._runner = engine.new_runner(max_active)
        # per active row, in runner order
        self._owner: list[_Request] = []
        self._row = np.zeros(max_active, np.int64)  # index of the row within its request
        self._tol = np.zeros(max_active, np.float32)
        self._max_iter = np.zeros(max_active, np.int32)
        self._deadline = np.zeros(max_active, np.float64)
        self._iters = np.zeros(max_active, np.int32)
        self.stats = {"iterations": 0, "admitted": 0, "answered": 0, "max_active_seen": 0}

    # -- public ------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return self._runner.n

    def start(self) -> None:
        with self._cond:
            if self._running:
                return
            self._running = True
        self._thread = threading.Thread(target=self._loop, name=f"fpn-scheduler-{self.engine.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is active and queued, then stop the worker."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(
        self, x: Any, tol: float | None = None, max_iter: int | None = None, *, deadline_ms: float | None = None
    ) -> Future[ClassifyResult]:
        """Queue a request; the future resolves to the same result ``engine.classify`` would give.

        Raises InputError for bad input (nothing is queued) and QueueFull when the queue is full.
        """
        future: Future[ClassifyResult] = Future()
        self._enqueue(x, tol, max_iter, deadline_ms, future, None)
        return future

    def submit_async(
        self, x: Any, tol: float | None = None, max_iter: int | None = None, *, deadline_ms: float | None = None
    ) -> asyncio.Future[ClassifyResult]:
        """``submit`` for a caller on a running event loop: the answer comes as an asyncio future of
        that loop, and the answers that finish in one iteration reach the loop in one wake-up."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ClassifyResult] = loop.create_future()
        self._enqueue(x, tol, max_iter, deadline_ms, future, loop)
        return future

    def _enqueue(
        self,
        x: Any,
        tol: float | None,
        max_iter: int | None,
        deadline_ms: float | None,
        future: Future[ClassifyResult] | asyncio.Future[ClassifyResult],
        loop: asyncio.AbstractEventLoop | None,
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
        with self._cond:
            if not self._running:
                raise QueueFull("the scheduler is not running", retry_after=1.0)
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are queued, the most allowed; retry shortly")
            self._waiting.append(request)
            self._cond.notify()

    def classify(
        self, x: Any, tol: float | None = None, max_iter: int | None = None, *, deadline_ms: float | None = None
    ) -> ClassifyResult:
        return self.submit(x, tol, max_iter, deadline_ms=deadline_ms).result()

    # -- the worker --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._running and not self._waiting and self._runner.n == 0:
                    self._cond.wait()
                if not self._running and not self._waiting and self._runner.n == 0:
                    return
                admitted = self._take_admissible()
            try:
                if admitted:
                    self._admit(admitted)
                admitted = []  # from here on they are in the active batch (self._owner)
                if self._runner.n:
                    self._iterate()
            except Exception as exc:  # never leave a caller waiting forever
                log.exception("scheduler iteration failed")
                self._fail_all(exc, admitted)

    def _take_admissible(self) -> list[_Request]:
        free = self.max_active - self._runner.n
        taken = []
        while self._waiting and self._waiting[0].x.shape[0] <= free:  # FIFO: never skip the head
            req = self._waiting.popleft()
            if not _still_wanted(req):  # cancelled while it waited: nobody needs the answer
                continue
            free -= req.x.shape[0]
            taken.append(req)
        return taken

    def _admit(self, requests: list[_Request]) -> None:
        z = self.engine.encode(np.concatenate([r.x for r in requests]) if len(requests) > 1 else requests[0].x)
        start = self._runner.n
        self._runner.add(z)
        for req in requests:
            n = req.x.shape[0]
            req.u = np.zeros((n, *z.shape[1:]), np.float32)
            sl = slice(start, start + n)
            self._owner.extend([req] * n)
            self._row[sl] = np.arange(n)
            self._tol[sl] = req.tol
            self._max_iter[sl] = req.max_iter
            self._deadline[sl] = req.deadline
            self._iters[sl] = 0
            start += n
        self.stats["admitted"] += len(requests)

    def _iterate(self) -> None:
        n = self._runner.n
        self.stats["max_active_seen"] = max(self.stats["max_active_seen"], n)
        r, st = self._runner.step()
        self.stats["iterations"] += 1
        iters = self._iters[:n]
        iters += 1
        done = (r <= self._tol[:n]) | (iters >= self._max_iter[:n]) | (self._deadline[:n] <= time.perf_counter())
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
            self.stats["answered"] += 1
            return
        outcomes: list[tuple[_Request, Outcome]] = []
        start = 0
        for req, n in finished:
            sl = slice(start, start + n)
            start += n
            outcomes.append(
                (
                    req,
                    ClassifyResult(
                        labels=result.labels[sl],
                        probabilities=result.probabilities[sl],
                        logits=result.logits[sl],
                        iterations=result.iterations[sl],
                        residuals=result.residuals[sl],
                        converged=result.converged[sl],
                        error_bounds=result.error_bounds[sl],
                        names=result.names,
                    ),
                )
            )
        _settle(outcomes)
        self.stats["answered"] += len(finished)

    def _fail_all(self, exc: Exception, admitted: list[_Request]) -> None:
        with self._cond:
            pending = list(self._waiting)
            self._waiting.clear()
        _settle([(req, exc) for req in {id(r): r for r in [*self._owner, *admitted, *pending]}.values()])
        self._owner = []
        if self._runner.n:
            self._runner.keep(np.zeros(self._runner.n, bool))


def _still_wanted(req: _Request) -> bool:
    """Mark a concurrent future running (from then on it cannot be cancelled); False if it was cancelled."""
    if isinstance(req.future, Future):
        return req.future.set_running_or_notify_cancel()
    return not req.future.cancelled()


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
