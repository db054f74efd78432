"""The active set: which samples are still iterating, and the one place that decides when each stops.

Every fixed-point loop of the package (``Engine.solve``, the numpy Anderson solver, the
scheduler's shared batch) keeps its samples in flight in an ``ActiveSet``, row for row in the
order of its own buffers. After each application of T the loop hands the set the per-sample
residuals and step norms; ``advance`` counts the iteration and stops every row that

- met its tolerance (residual <= tol), or, for work that asked for the certified stop, has a
  certified label (see ``certificate.py``),
- reached its max_iter,
- passed its deadline (checked only while some row has one), or
- belongs to work that its caller abandoned (``abandon``; checked only after a call to it),

writes each stopped row's iterate and diagnostics into its work's ``SolveOutput``, compacts its
own per-row arrays and returns the mask of rows that go on, so that the loop compacts its buffers
by the same mask. A stopped row is never updated again, so a sample's answer is exactly what it
would be alone, whatever else shares the batch. Work that asked for a trace gets, per iteration,
each row's residual, top label and whether that label was certified.

Rows that need their label at every iteration (certified stop, trace) are passed to the loop's
``inspect(mask, steps)`` callback, which returns their top labels and certified flags; no other
row pays for S.

    active = ActiveSet(capacity, latent_shape)
    work = active.admit(rows=4, tol=1e-4, max_iter=100)
    while active.n:
        r, step = runner.step()
        keep, finished = active.advance(r, step, runner.current)
        if keep is not None:
            runner.keep(keep)
    work.out  # the SolveOutput of the four rows
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Trace:
    """Per row and iteration (k = 1 .. iterations): the residual, the top label and whether it was
    certified. Entries past a row's iterations are unused (residual NaN)."""

    residuals: np.ndarray  # float32 [rows, max_iter]
    labels: np.ndarray  # int32 [rows, max_iter]
    certified: np.ndarray  # bool [rows, max_iter]

    def take(self, rows: slice) -> Trace:
        return Trace(self.residuals[rows], self.labels[rows], self.certified[rows])

    @classmethod
    def empty(cls, rows: int, max_iter: int) -> Trace:
        return cls(
            np.full((rows, max_iter), np.nan, np.float32),
            np.full((rows, max_iter), -1, np.int32),
            np.zeros((rows, max_iter), bool),
        )


@dataclass
class SolveOutput:
    """The per-sample outcome of a solve, in input order: what every solver returns."""

    u: np.ndarray  # float32 [B, *latent], the returned iterate
    iterations: np.ndarray  # int32 [B], applications of T
    residuals: np.ndarray  # float32 [B], relative step at exit
    steps: np.ndarray  # float32 [B], absolute step ||u_k - u_{k-1}|| at exit (for the error bound)
    trace: Trace | None = None  # per iteration, for a solve that asked for it


Inspect = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


class Work:
    """Rows that are admitted together and answered together: one request, or one solve call."""

    __slots__ = ("abandoned", "certify", "deadline", "max_iter", "out", "remaining", "rows", "tag", "tol", "trace")

    def __init__(
        self,
        rows: int,
        latent: tuple[int, ...],
        tol: float,
        max_iter: int,
        deadline: float,
        tag: Any,
        certify: bool = False,
        trace: bool = False,
    ):
        self.tol = tol
        self.certify = certify  # stop at the first certified label (or max_iter), not at tol
        self.max_iter = max_iter
        self.deadline = deadline
        self.tag = tag  # the caller's handle (the scheduler's request)
        self.rows = rows
        self.remaining = rows  # rows still iterating
        self.abandoned = False  # nobody wants the answer any more: its rows stop at the next iteration
        self.trace = Trace.empty(rows, max_iter) if trace else None
        # a one-row work gets its output when its row stops (a view of that iteration's arrays); a
        # larger one collects its rows as they stop
        self.out = (
            SolveOutput(
                np.zeros((rows, *latent), np.float32),
                np.zeros(rows, np.int32),
                np.full(rows, np.inf, np.float32),
                np.full(rows, np.inf, np.float32),
                self.trace,
            )
            if rows > 1
            else _NO_OUTPUT
        )


_EMPTY = np.zeros(0, np.float32)
_NO_OUTPUT = SolveOutput(_EMPTY, _EMPTY, _EMPTY, _EMPTY)  # a one-row work's, until its row stops


class ActiveSet:
    """Per-row stopping state of up to ``capacity`` samples in flight (see the module's doc)."""

    def __init__(self, capacity: int, latent_shape: tuple[int, ...]) -> None:
        self.capacity = capacity
        self.latent_shape = latent_shape
        self.n = 0
        self._tol = np.zeros(capacity, np.float32)
        self._max_iter = np.zeros(capacity, np.int32)
        self._deadline = np.full(capacity, np.inf, np.float64)
        self._iters = np.zeros(capacity, np.int32)
        self._row = np.zeros(capacity, np.int64)  # index of the row within its work
        self._inspected = np.zeros(capacity, bool)  # rows whose label is read every iteration
        self._certify = np.zeros(capacity, bool)  # rows that stop at a certified label
        self._owner: list[Work] = []  # per row
        self._live = 0  # works in flight
        self._timed = 0  # works in flight with a finite deadline
        self._evict = False  # some work was abandoned since the last iteration
        self._watched = 0  # works in flight that are inspected every iteration

    @property
    def works(self) -> list[Work]:
        """The works with rows still in flight."""
        return list(dict.fromkeys(self._owner))  # in admission order

    def admit(
        self,
        rows: int,
        tol: float,
        max_iter: int,
        deadline: float = math.inf,
        tag: Any = None,
        *,
        certify: bool = False,
        trace: bool = False,
    ) -> Work:
        """Append ``rows`` rows that start their count at zero; returns their work. ``certify``:
        stop each row at its first certified label instead of at ``tol``; ``trace``: record every
        iteration (both need the loop's ``inspect``)."""
        start = self.n
        if start + rows > self.capacity:
            raise ValueError(f"{start + rows} rows exceed the active set's capacity {self.capacity}")
        work = Work(rows, self.latent_shape, tol, max_iter, deadline, tag, certify, trace)
        sl = slice(start, start + rows)
        self._tol[sl] = -1.0 if certify else tol  # a certified stop ignores the residual
        self._max_iter[sl] = max_iter
        self._deadline[sl] = deadline
        self._iters[sl] = 0
        self._row[sl] = np.arange(rows)
        self._certify[sl] = certify
        self._inspected[sl] = certify or trace
        self._owner.extend([work] * rows)
        self._live += 1
        self._timed += deadline != math.inf
        self._watched += certify or trace
        self.n += rows
        return work

    @property
    def multistep(self) -> bool:
        """Whether the rows in flight may run several iterations per call of the loop (a ``steps``
        graph, which applies the tol and max_iter rule itself): not while some row's stop is decided
        on the host every iteration (a certified stop, a trace or a deadline)."""
        return not (self._watched or self._timed)

    def limits(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Views [n] of each row's tol, max_iter and iterations so far, for a ``steps`` graph."""
        n = self.n
        return self._tol[:n], self._max_iter[:n], self._iters[:n]

    def abandon(self, work: Work) -> None:
        """Stop ``work``'s rows at the next iteration (its caller is gone). Safe from any thread:
        it only sets two flags, which the iterating thread reads once per iteration."""
        work.abandoned = True
        self._evict = True

    def advance(
        self,
        residuals: np.ndarray,
        steps: np.ndarray,
        current: Callable[[np.ndarray], np.ndarray],
        inspect: Inspect | None = None,
        iterations: np.ndarray | None = None,
    ) -> tuple[np.ndarray | None, list[Work]]:
        """Count one iteration of every row (or take each row's count from ``iterations``, after a
        ``steps`` run of several, only while ``multistep``) and stop the rows whose rule says so.

        ``residuals`` and ``steps`` are float32 [n] in row order; ``current(mask)`` returns the
        iterates [m, *latent] of the rows where ``mask`` is True; ``inspect(mask, steps[mask])``
        their (top labels, certified flags), needed only while some work has ``certify`` or
        ``trace``. Returns the mask of rows that go on (None when all do: nothing to compact) and
        the works whose last row stopped.
        """
        n = self.n
        iters = self._iters[:n]
        if iterations is None:
            iters += 1
        else:
            iters[:] = iterations
        done = residuals <= self._tol[:n]
        done |= iters >= self._max_iter[:n]
        if self._watched:
            if inspect is None:
                raise ValueError("a certified stop or a trace needs the loop's inspect callback")
            done |= self._inspect(inspect, residuals, steps)
        if self._timed:
            done |= self._deadline[:n] <= time.perf_counter()
        if self._evict:
            self._evict = False  # first, so that an abandonment from now on is seen next time
            done |= np.fromiter((w.abandoned for w in self._owner), bool, n)
        if not done.any():
            return None, []
        idx = np.flatnonzero(done)
        finished = self._record(idx, residuals, steps, current(done))
        keep = ~done
        m = n - len(idx)
        if m:
            for arr in (
                self._tol,
                self._max_iter,
                self._deadline,
                self._iters,
                self._row,
                self._inspected,
                self._certify,
            ):
                arr[:m] = arr[:n][keep]
            self._owner = [o for o, k in zip(self._owner, keep.tolist(), strict=True) if k]
        else:
            self._owner = []
        self.n = m
        if finished:
            # counts kept as works leave: nothing per iteration grows with the works in flight
            self._live -= len(finished)
            self._timed -= sum(w.deadline != math.inf for w in finished)
            self._watched -= sum(w.certify or w.trace is not None for w in finished)
        return keep, finished

    def _inspect(self, inspect: Inspect, residuals: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """Read the labels of the inspected rows: record their traces; returns the rows [n] that
        stop at a certified label."""
        n = self.n
        mask = self._inspected[:n]
        labels, certified = inspect(mask, steps[mask])
        idx = np.flatnonzero(mask)
        for j, i in enumerate(idx.tolist()):
            trace = self._owner[i].trace
            if trace is not None:
                row, k = self._row[i], self._iters[i] - 1
                trace.residuals[row, k] = residuals[i]
                trace.labels[row, k] = labels[j]
                trace.certified[row, k] = certified[j]
        stop = np.zeros(n, bool)
        stop[idx] = certified & self._certify[idx]
        return stop

    def clear(self) -> list[Work]:
        """Drop every row (a failed iteration); returns the works that were in flight."""
        works, self._owner = self.works, []
        self.n = self._live = self._timed = self._watched = 0
        return works

    def _record(self, idx: np.ndarray, residuals: np.ndarray, steps: np.ndarray, u: np.ndarray) -> list[Work]:
        """Write the stopped rows ``idx`` (with iterates ``u``) into their works' outputs."""
        rows = self._row[idx]
        iters = self._iters[idx]
        res, st = residuals[idx], steps[idx]  # copies: the loop's arrays are reused
        if self._live == 1 and self._owner[0].rows > 1:  # one work owns every row: write them all at once
            work = self._owner[0]
            out = work.out
            out.u[rows], out.iterations[rows], out.residuals[rows], out.steps[rows] = u, iters, res, st
            work.remaining -= len(idx)
            return [work] if work.remaining == 0 else []
        finished = []
        owners = self._owner
        for j, i in enumerate(idx.tolist()):
            work = owners[i]
            if work.rows == 1:  # its whole output: views of this iteration's copies
                work.out = SolveOutput(u[j : j + 1], iters[j : j + 1], res[j : j + 1], st[j : j + 1], work.trace)
                work.remaining = 0
                finished.append(work)
                continue
            row = rows[j]
            out = work.out
            out.u[row] = u[j]
            out.iterations[row] = iters[j]
            out.residuals[row] = res[j]
            out.steps[row] = st[j]
            work.remaining -= 1
            if work.remaining == 0:
                finished.append(work)
        return finished
