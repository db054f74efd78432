"""Answers to callers: concurrent futures directly, asyncio futures on their own event loop.

A caller may give up on its future (a timeout, a cancelled call, a client that hung up); such a
future is skipped, never set twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import Future, InvalidStateError
from typing import Any, Protocol

from ..runtime.result import ClassifyResult

Outcome = ClassifyResult | BaseException
AnyFuture = Future[ClassifyResult] | asyncio.Future[ClassifyResult]


class Answerable(Protocol):
    future: AnyFuture
    loop: asyncio.AbstractEventLoop | None  # the loop of an asyncio future, None for a concurrent one


def still_wanted(req: Answerable) -> bool:
    """Mark a concurrent future running (from then on it cannot be cancelled); False if it was
    cancelled, or for an asyncio future that is already done (cancelled, or failed by its caller's
    timeout)."""
    if isinstance(req.future, Future):
        return req.future.set_running_or_notify_cancel()
    return not req.future.done()


def settle(outcomes: list[tuple[Any, Outcome]]) -> None:
    """Give each request (an ``Answerable``) its result or exception: concurrent futures directly,
    asyncio futures in one ``call_soon_threadsafe`` per loop."""
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
            loop.call_soon_threadsafe(resolve, items)


def resolve(items: list[tuple[asyncio.Future[ClassifyResult], Outcome]]) -> None:
    """On the caller's loop (or for a future of the calling thread): resolve the futures nobody has
    given up on."""
    for future, outcome in items:
        if future.done():
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
