"""Answers to callers: S for the requests that finished together, then each caller its slice;
concurrent futures directly, asyncio futures on their own event loop.

A caller may give up on its future (a timeout, a cancelled call, a client that hung up); such a
future is skipped, never set twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from concurrent.futures import Future, InvalidStateError
from typing import Any, Protocol

import numpy as np

from ..runtime.active import SolveOutput, Work
from ..runtime.engine import Engine
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


def resolve(items: list[tuple[AnyFuture, Outcome]]) -> None:
    """On the caller's loop (or for a future of the calling thread): resolve the futures nobody has
    given up on."""
    for future, outcome in items:
        if future.done():
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def answer(engine: Engine, finished: list[Work]) -> int:
    """S for every finished work (its ``tag`` an ``Answerable`` request of ``rows`` inputs) in one
    run, then each caller gets its own slice; returns how many were answered (0 if S failed, in
    which case each gets the error)."""
    reqs = [w.tag for w in finished]
    if len(finished) == 1:  # the common case under load: nothing to join or to split
        out = finished[0].out
        tols: np.ndarray = np.full(len(out.iterations), finished[0].tol, np.float32)
    else:
        outs = [w.out for w in finished]
        out = SolveOutput(
            np.concatenate([o.u for o in outs]),
            np.concatenate([o.iterations for o in outs]),
            np.concatenate([o.residuals for o in outs]),
            np.concatenate([o.steps for o in outs]),
        )
        tols = np.repeat(np.array([w.tol for w in finished], np.float32), [w.rows for w in finished])
    try:
        result = engine.decode(out, tols, finished[0].trace if len(finished) == 1 else None)
    except Exception as exc:
        settle([(req, exc) for req in reqs])
        return 0
    # what every answer reads, computed here for all the rows at once: off the callers' event loop
    result.probabilities  # noqa: B018
    result.certified  # noqa: B018
    if len(reqs) == 1:
        settle([(reqs[0], result)])
    else:
        parts = _split(result, finished)
        settle([(w.tag, part) for w, part in zip(finished, parts, strict=True)])
    return len(reqs)


def _split(result: ClassifyResult, finished: list[Work]) -> list[ClassifyResult]:
    """One result per work, by consecutive row counts, each with its own trace."""
    bounds = list(itertools.accumulate((w.rows for w in finished), initial=0))
    return [result.take(slice(a, b), w.trace) for w, (a, b) in zip(finished, itertools.pairwise(bounds), strict=True)]
