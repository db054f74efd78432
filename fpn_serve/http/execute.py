"""Running one request for a route: through the model's scheduler (the shared active batch) for the
fixed-point solver, in a worker thread for the others; within the request timeout either way.

Work nobody waits for leaves the shared batch: when the request times out (504) or its client
hangs up, the request's scheduler future fails, and the scheduler evicts its rows at the next
iteration. Watching for a hang-up costs the common request nothing: only a request still
unanswered after ``WATCH_AFTER_S`` starts listening on its receive channel.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from ..batching.registry import ModelRegistry
from ..runtime.engine import ClassifyResult, Engine
from ..runtime.request import Prepared
from .errors import TimedOut

WATCH_AFTER_S = 0.05  # a request unanswered this long starts watching for its client's hang-up


def _timed_out(seconds: float) -> TimedOut:
    return TimedOut(f"the request took longer than {seconds:g} s; pass deadline_ms to bound it")


class _Abandon:
    """The one timer of a request awaiting its scheduler future: first the hang-up watch's start
    (after WATCH_AFTER_S), then the timeout. Either failure of the future tells the scheduler that
    nobody waits for the answer."""

    __slots__ = ("deadline", "future", "receive", "timeout_s", "timer", "watcher")

    def __init__(self, future: asyncio.Future[ClassifyResult], receive: Receive | None, timeout_s: float) -> None:
        loop = future.get_loop()
        self.future, self.receive, self.timeout_s = future, receive, timeout_s
        self.deadline = loop.time() + timeout_s
        self.watcher: asyncio.Task[None] | None = None
        if receive is None or timeout_s <= WATCH_AFTER_S:
            self.timer = loop.call_at(self.deadline, self._time_out)
        else:
            self.timer = loop.call_later(WATCH_AFTER_S, self._watch)

    def _watch(self) -> None:
        if self.future.done():
            return
        loop = self.future.get_loop()
        self.timer = loop.call_at(self.deadline, self._time_out)
        self.watcher = loop.create_task(self._until_hang_up())

    async def _until_hang_up(self) -> None:
        assert self.receive is not None
        while True:  # the body has been read: what comes now is the disconnect
            message = await self.receive()
            if message["type"] == "http.disconnect":
                if not self.future.done():
                    self.future.set_exception(ClientDisconnect())
                return

    def _time_out(self) -> None:
        if not self.future.done():
            self.future.set_exception(_timed_out(self.timeout_s))

    def close(self) -> None:
        self.timer.cancel()
        if self.watcher is not None:
            self.watcher.cancel()


async def await_answer(
    future: asyncio.Future[ClassifyResult], timeout_s: float, receive: Receive | None = None
) -> ClassifyResult:
    """The scheduler's answer; TimedOut after ``timeout_s``, ClientDisconnect once the client
    behind ``receive`` (whose body has been read) hangs up. Either one fails ``future``."""
    abandon = _Abandon(future, receive, timeout_s)
    try:
        return await future
    finally:
        abandon.close()


async def within(work: Any, seconds: float) -> Any:
    """Await ``work`` for at most ``seconds``; TimedOut after that."""
    try:
        return await asyncio.wait_for(work, seconds)
    except (TimeoutError, asyncio.TimeoutError) as exc:  # distinct types before Python 3.11
        raise _timed_out(seconds) from exc


async def run_model(
    registry: ModelRegistry, engine: Engine, request: Prepared, timeout_s: float, receive: Receive | None = None
) -> ClassifyResult:
    """Answer one prepared request: fixed-point requests share the model's active batch (the
    scheduler), other solvers run on their own in a worker thread; both within ``timeout_s``."""
    try:
        with registry.hold(engine):  # unloaded or replaced meanwhile, it finishes this request
            if request.solver == "fixed_point":
                future = registry.scheduler_for(engine).submit_async(request)
                result = await await_answer(future, timeout_s, receive)
            else:
                result = await within(run_in_threadpool(engine.run, request), timeout_s)
    except (TimedOut, ClientDisconnect) as exc:
        registry.metrics.observe_abandoned(engine.name, "timeout" if isinstance(exc, TimedOut) else "client_gone")
        raise
    registry.metrics.observe_result(engine.name, result)
    return result
