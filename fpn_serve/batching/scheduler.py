"""Iteration-level batching: concurrent requests share one active batch, rebuilt every iteration.

Two worker threads form a pipeline. The *encoder* takes waiting requests a few rows at a time and
computes their Q in one batched run; the *stepper* moves encoded requests into the active batch at
the next iteration boundary, applies T to every active sample (four times per run of the
model's steps.onnx, each sample frozen inside the graph at its own stop, where the active set
allows it; else once), and lets each sample leave the moment it meets its own request's tol,
reaches its own max_iter or its request's deadline. A
request is answered (S, batched over the requests that finish in the same iteration) as soon as
its last sample leaves, however long the others run. Q of newcomers never stalls the iterations of
the requests already running, and ONNX Runtime releases the GIL, so on two or more cores the two
stages run at once.

When the policy's chooser finds it faster at the present load (it measures each way), the
encoder instead answers queued single inputs one engine call each (on the CPU one FPN1.onnx run,
the loop inside ONNX Runtime), and the stepper never sees them; or each single input that finds
the scheduler with nothing of its own to do runs in its caller's thread, one at a time.

The queue's order, the room count, the choice to run an input alone and the choice between the
shared batch and solo calls are the policy's (``policy.py``); this module carries them out.

    scheduler = Scheduler(engine, max_active=256, max_queue=1024)
    scheduler.start()
    result = scheduler.classify(x, tol=1e-3)      # or scheduler.submit(...) -> Future
    result = await scheduler.submit_async(x)       # from an event loop: an asyncio future
    scheduler.stop()

A caller may give up on its future (a timeout, a cancelled asyncio future, a client that hung up):
a request given up on while it waits is never admitted, and one given up on while it runs leaves
the active batch at the next iteration (the active set's eviction) without disturbing the others.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError, QueueFull
from ..runtime.active import ActiveSet, Work
from ..runtime.engine import Engine, advance, multistep
from ..runtime.request import Prepared
from ..runtime.result import ClassifyResult
from .delivery import AnyFuture, Outcome, answer, resolve, settle, still_wanted
from .policy import ENCODE_ROWS, SLACK, QueuePolicy, expected_iterations

__all__ = ["QueueFull", "Scheduler", "expected_iterations"]

log = logging.getLogger("fpn_serve")


@dataclass(eq=False)
class _Request:
    prepared: Prepared
    future: AnyFuture
    loop: asyncio.AbstractEventLoop | None  # the loop of an asyncio future, None for a concurrent one
    work: Work | None = None  # its rows in the active set, once it joins the shared batch


class _Workers:
    """The scheduler's mechanism: its state, and its threads. Encoders compute Q for newcomers (or
    answer the single inputs the policy sends solo, one engine call each); the stepper runs one
    iteration of the shared batch at a time and answers the rows that stop. ``Scheduler`` adds
    the callers' side."""

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
        if encoders < 1:
            raise ValueError("encoders must be >= 1")
        self.engine = engine
        self.policy: QueuePolicy[_Request] = QueuePolicy(
            expected_iterations(engine.manifest),
            capacity=max_active,
            max_queue=max_queue,
            encode_rows=encode_rows,
            slack=slack,
        )
        self.max_active = max_active
        self.encoders = encoders
        self._ready: list[tuple[list[_Request], np.ndarray]] = []  # encoded, joining at the next iteration
        self._lock = threading.Lock()
        self._to_encode = threading.Condition(self._lock)
        self._to_step = threading.Condition(self._lock)
        self._running = False
        self._encoding_rows = 0  # rows the encoders hold: neither waiting nor ready
        self._alone_rows = 0  # inputs running alone in their callers' threads
        # requests run alone on an event loop since it last turned (how many of its callers were ready);
        # while it is not 0, a request of that loop runs alone only inline or in the fast lane
        self._since_turn = 0
        self._last_arrival = -math.inf  # perf_counter of the latest submit
        self._threads: list[threading.Thread] = []
        self._runner = engine.new_runner(max_active)
        self._active = ActiveSet(max_active, tuple(engine.manifest.latent_shape))  # row for row with the runner
        # written by the stepper thread alone; requests run alone count under the lock (see ``stats``)
        self._counts = {"iterations": 0, "admitted": 0, "answered": 0, "evicted": 0, "max_active_seen": 0}
        self._alone_count = 0
        self._can_run_alone = engine.single_graph  # one input has a one-call path (FPN1.onnx on the CPU)

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

    # -- answering solo, in an encoder's thread -----------------------------------------------
    def _answer_solo(self, taken: list[_Request]) -> None:
        """In the encoder's thread: requests the policy sends solo, each answered by one engine
        call (the stepper never sees them), its room freed before its caller hears of it."""
        for req in taken:
            outcome = _outcome(self.engine, req.prepared)
            with self._lock:
                self.policy.answered(1, time.perf_counter())
                self.policy.release(1)
                self._encoding_rows -= 1
                self._alone_count += 1
                if not self._running:
                    self._to_step.notify()  # a stop waits for the encoders to finish
            settle([(req, outcome)])

    # -- the encoder: Q of newcomers, a few rows at a time -----------------------------------
    def _encode_loop(self) -> None:
        while True:
            with self._lock:
                while not self.policy.head_fits():
                    if not self._running and not self.policy.waiting:
                        self._to_step.notify_all()  # the stepper may now finish
                        return
                    self._to_encode.wait()
                taken, rows = self.policy.take(still_wanted)
                self._encoding_rows += rows
                solo = bool(taken) and self._can_run_alone and self.policy.goes_solo([r.prepared for r in taken])
            if not taken:  # the head of the queue had been given up on
                continue
            if solo:  # single inputs only: one row each
                self._answer_solo(taken)
                continue
            try:
                xs = [r.prepared.x for r in taken]
                z = self.engine.encode(np.concatenate(xs) if len(xs) > 1 else xs[0])
            except Exception as exc:  # these callers get the error; nobody else is affected
                log.exception("scheduler: Q failed")
                settle([(req, exc) for req in taken])
                with self._lock:
                    self.policy.release(rows)
                    self._encoding_rows -= rows
                    self._to_step.notify()
                continue
            with self._lock:
                self._ready.append((taken, z))
                self._encoding_rows -= rows
                self._to_step.notify()

    # -- the stepper: one iteration of the active batch at a time ----------------------------
    def _step_loop(self) -> None:
        while True:
            with self._lock:
                while not self._ready and self._runner.n == 0:
                    if not self._running and not self.policy.waiting and not self._encoding_rows:
                        return
                    self._to_step.wait()
                ready, self._ready = self._ready, []
            joining: list[_Request] = [req for batch, _ in ready for req in batch]
            try:
                for batch, z in ready:
                    self._admit(batch, z)
                joining = []  # from here on they are in the active set
                if self._runner.n:
                    self._iterate()
            except Exception as exc:  # never leave a caller waiting forever
                log.exception("scheduler iteration failed")
                self._fail_all(exc, joining)

    def _admit(self, requests: list[_Request], z: np.ndarray) -> None:
        self._runner.add(z, _starts(requests, z))
        for req in requests:
            p = req.prepared
            req.work = self._active.admit(
                p.rows, p.tol, p.max_iter, p.deadline, tag=req, certify=p.stop == "certified", trace=p.trace
            )
            if req.future.done():  # given up on while it was encoded: it leaves at once
                self._active.abandon(req.work)
        self._counts["admitted"] += len(requests)

    def _iterate(self) -> None:
        n = self._runner.n
        self._counts["max_active_seen"] = max(self._counts["max_active_seen"], n)
        several = multistep(self._runner, self._active)
        k = self._runner.k if several else 1
        began = time.perf_counter()
        keep, finished = advance(self._runner, self._active, self._inspect, several)  # k iterations
        self.policy.observe_iteration((time.perf_counter() - began) / k)
        self._counts["iterations"] += k
        if keep is None:
            return
        self._runner.keep(keep)
        answered = [w for w in finished if not w.abandoned]
        with self._lock:  # room for newcomers
            if answered:
                self.policy.answered(len(answered), time.perf_counter())
            self.policy.release(n - self._runner.n)
            if self.policy.waiting:
                self._to_encode.notify()
        self._counts["evicted"] += len(finished) - len(answered)
        if answered:
            self._counts["answered"] += answer(self.engine, answered)
        for w in finished:  # the request and its work refer to each other: part them, so refcounts free both
            w.tag.work = None

    def _inspect(self, mask: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.engine.inspect(self._runner.current(mask), steps)

    def _fail_all(self, exc: Exception, joining: list[_Request]) -> None:
        """An iteration failed: every request in the active batch, joining it or encoded for it gets
        ``exc``; the queue is left to run later."""
        with self._lock:
            ready = [req for batch, _ in self._ready for req in batch]
            self._ready = []
            # what still holds rows: batches being encoded and a request running alone in its caller's thread
            self.policy.occupied = self._encoding_rows + self._alone_rows
            self._to_encode.notify()
        in_flight = [w.tag for w in self._active.clear()]
        for req in in_flight:
            req.work = None
        victims = {id(r): r for r in [*in_flight, *joining, *ready]}.values()
        settle([(req, exc) for req in victims])
        if self._runner.n:
            self._runner.keep(np.zeros(self._runner.n, bool))


class Scheduler(_Workers):
    """Shares one active batch between concurrent ``classify`` calls on one engine.

    ``encode_rows``: inputs per batched Q run. ``slack``: the virtual-deadline factor (0: first
    come, first served; larger: loose tolerances first, tight ones later). ``encoders``: threads
    computing Q (one keeps a 2-core machine's other core for the stepper and the event loop).
    """

    # -- public ------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, int]:
        """Counts so far: iterations of the shared batch, requests admitted and answered (those run alone
        included), requests evicted because their callers left, requests run alone (``alone``) and the
        largest active batch."""
        counts = dict(self._counts)
        alone = self._alone_count
        counts["admitted"] += alone
        counts["answered"] += alone
        counts["alone"] = alone
        return counts

    @property
    def queue_depth(self) -> int:
        return self.policy.waiting

    @property
    def active(self) -> int:
        return self._runner.n

    def wait_quiet(self, quiet_s: float = 0.05, timeout_s: float = 1.0) -> bool:
        """Block until no request has arrived for ``quiet_s`` and none is queued or running, or
        ``timeout_s`` has passed; True if it is quiet. For background work that should neither slow
        the traffic nor be timed beside it (the latency targets' cost measurement)."""
        end = time.perf_counter() + timeout_s
        while True:
            now = time.perf_counter()
            since = now - self._last_arrival
            if since >= quiet_s and not self.policy.waiting and not self._runner.n and not self._alone_rows:
                return True
            if now >= end:
                return False
            time.sleep(max(1e-3, min(quiet_s - since if since < quiet_s else quiet_s / 5, end - now)))

    def submit(
        self,
        x: Prepared | Any,
        tol: float | None = None,
        max_iter: int | None = None,
        **options: Any,
    ) -> Future[ClassifyResult]:
        """Queue a request (a ``Prepared`` one, or inputs and parameters to prepare: ``options`` are
        ``engine.prepare``'s, e.g. ``deadline_ms``, ``stop``, ``trace``, ``u0``); the future
        resolves to the same result ``engine.classify`` would give.

        Raises InputError for bad input (nothing is queued) and QueueFull when the queue is full.
        """
        future: Future[ClassifyResult] = Future()
        self._enqueue(self._prepare(x, tol, max_iter, options), future, None, alone=False, lane=False)
        return future

    def submit_async(
        self,
        x: Prepared | Any,
        tol: float | None = None,
        max_iter: int | None = None,
        **options: Any,
    ) -> asyncio.Future[ClassifyResult]:
        """``submit`` for a caller on a running event loop: the answer comes as an asyncio future of
        that loop, and the answers that finish in one iteration reach the loop in one wake-up.
        Cancelling the future (or failing it, as a timeout does) evicts the request's rows from the
        shared batch at the next iteration."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ClassifyResult] = loop.create_future()
        alone = not self._since_turn or self.policy.inline()
        request = self._enqueue(self._prepare(x, tol, max_iter, options), future, loop, alone=alone, lane=True)
        if request is not None:
            future.add_done_callback(functools.partial(self._given_up, request))
        return future

    def classify(
        self,
        x: Prepared | Any,
        tol: float | None = None,
        max_iter: int | None = None,
        **options: Any,
    ) -> ClassifyResult:
        """``submit`` and wait. An input that finds the scheduler idle runs alone, in this thread."""
        future: Future[ClassifyResult] = Future()
        self._enqueue(self._prepare(x, tol, max_iter, options), future, None, alone=True, lane=True)
        return future.result()

    # -- the caller's side -------------------------------------------------------------------
    def _prepare(self, x: Prepared | Any, tol: float | None, max_iter: int | None, options: dict[str, Any]) -> Prepared:
        return _admissible(x if isinstance(x, Prepared) else self.engine.prepare(x, tol, max_iter, **options), self)

    def _enqueue(
        self,
        prepared: Prepared,
        future: AnyFuture,
        loop: asyncio.AbstractEventLoop | None,
        *,
        alone: bool,
        lane: bool,
    ) -> _Request | None:
        """Queue the request, or run it alone in this thread (``alone``: if the scheduler is idle;
        ``lane``: if it is a fast-lane input); returns it if it was queued."""
        request = _Request(prepared, future, loop)
        self._last_arrival = now = time.perf_counter()
        with self._lock:
            if not self._running:
                raise QueueFull("the scheduler is not running", retry_after=1.0)
            # One input in an idle scheduler runs as one engine call in the caller's thread. On an
            # event loop that blocks the loop; the next request of that loop runs alone only after the
            # loop has turned once (read its sockets, resumed its other callers), so a burst of
            # callers still meets in the shared batch.
            # A loose-tolerance input (the fast lane) runs in its caller's thread even when the
            # scheduler is busy: it asked for speed over accuracy, and waits behind no batch.
            alone = self._can_run_alone and (
                (alone and self.policy.may_run_alone(prepared)) or (lane and self.policy.fast_lane(prepared))
            )
            if alone and not still_wanted(request):  # cancelled before it began: nothing to run
                self.policy.release(1)
                return None
            if alone:
                self._alone_rows += 1
            else:
                self.policy.push(request, prepared, now)
                self._to_encode.notify()
        if alone:
            self._run_alone(request)
            return None
        return request

    def _given_up(self, request: _Request, future: asyncio.Future[ClassifyResult]) -> None:
        """On the caller's loop, when its future is done: if that was not this scheduler's answer
        (cancelled, or failed by a timeout), its rows leave the shared batch at the next iteration."""
        work = request.work
        if work is not None and work.remaining:
            self._active.abandon(work)

    def _run_alone(self, req: _Request) -> None:
        """Answer a request in the caller's own thread (it found the scheduler idle, or it is inline
        or in the fast lane), with one ``engine.run`` (for one input on the CPU, FPN1.onnx: Q, the
        loop and S in one ONNX Runtime run): the same answer to the bit as the shared batch gives,
        without two thread hand-offs and the per-iteration bookkeeping."""
        outcome = _outcome(self.engine, req.prepared)
        if req.loop is not None:
            self._since_turn += 1
        with self._lock:
            self.policy.answered(1, time.perf_counter(), self._since_turn)
            self.policy.release(1)
            self._alone_rows -= 1
            self._alone_count += 1
            if self.policy.waiting:
                self._to_encode.notify()
        answer: list[tuple[AnyFuture, Outcome]] = [(req.future, outcome)]
        if req.loop is None:
            resolve(answer)
            return
        if self._since_turn <= 1:  # the first since the loop turned: its caller goes on at once
            req.loop.call_soon(self._loop_turned)
            resolve(answer)
            return
        # Later ones reach their callers after the loop has turned: callers that all got their answers
        # at once would go on without yielding, and a server whose requests all ran this way would stop
        # reading its sockets in time (measured over HTTP at 32 connections: p99 of 150 ms and more, not 30).
        req.loop.call_soon(resolve, answer)  # skipped if its caller gave up meanwhile

    def _loop_turned(self) -> None:
        self._since_turn = 0


def _admissible(prepared: Prepared, scheduler: Scheduler) -> Prepared:
    if prepared.solver != "fixed_point":
        raise InputError(f"the shared batch runs the fixed_point solver, not {prepared.solver!r}; use engine.run")
    if prepared.rows > scheduler.max_active:
        raise InputError(f"{prepared.rows} inputs in one request; this scheduler runs at most {scheduler.max_active}")
    return prepared


def _outcome(engine: Engine, prepared: Prepared) -> Outcome:
    try:
        return engine.run(prepared)
    except Exception as exc:
        return exc


def _starts(requests: list[_Request], z: np.ndarray) -> np.ndarray | None:
    """The warm starts of requests encoded together, zeros for those without one; None if none has one."""
    starts = [r.prepared.u0 for r in requests]
    if all(u0 is None for u0 in starts):
        return None
    return np.concatenate(
        [
            np.zeros((r.prepared.rows, *z.shape[1:]), np.float32) if u0 is None else u0
            for r, u0 in zip(requests, starts, strict=True)
        ]
    )
