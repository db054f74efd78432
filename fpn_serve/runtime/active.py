"""The active set: which samples are still iterating, and the one place that decides when each stops.

Every fixed-point loop of the package (``Engine.solve``, the numpy Anderson solver, the
scheduler's shared batch) keeps its samples in flight in an ``ActiveSet``, row for row in the
order of its own buffers. After each application of T the loop hands the set the per-sample
residuals and step norms; ``advance`` counts the iteration and stops every row that

- met its tolerance (residual <= tol),
- reached its max_iter,
- passed its deadline (checked only while some row has one), or
- belongs to work that its caller abandoned (``abandon``; checked only after a call to it),

writes each stopped row's iterate and diagnostics into its work's ``SolveOutput``, compacts its
own per-row arrays and returns the mask of rows that go on, so that the loop compacts its buffers
by the same mask. A stopped row is never updated again, so a sample's answer is exactly what it
would be alone, whatever else shares the batch.

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
class SolveOutput:
    """The per-sample outcome of a solve, in input order: what every solver returns."""

    u: np.ndarray  # float32 [B, *latent], the returned iterate
    iterations: np.ndarray  # int32 [B], applications of T
    residuals: np.ndarray  # float32 [B], relative step at exit
    steps: np.ndarray  # float32 [B], absolute step ||u_k - u_{k-1}|| at exit (for the error bound)


class Work:
    """Rows that are admitted together and answered together: one request, or one solve call."""

    __slots__ = ("abandoned", "deadline", "max_iter", "out", "remaining", "tag", "tol")

    def __init__(self, rows: int, latent: tuple[int, ...], tol: float, max_iter: int, deadline: float, tag: Any):
        self.tol = tol
        self.max_iter = max_iter
        self.deadline = deadline
        self.tag = tag  # the caller's handle (the scheduler's request)
        self.remaining = rows  # rows still iterating
        self.abandoned = False  # nobody wants the answer any more: its rows stop at the next iteration
        self.out = SolveOutput(
            np.zeros((rows, *latent), np.float32),
            np.zeros(rows, np.int32),
            np.full(rows, np.inf, np.float32),
            np.full(rows, np.inf, np.float32),
        )


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
        self._owner: list[Work] = []  # per row
        self._works: list[Work] = []  # in flight, in admission order
        self._timed = 0  # works in flight with a finite deadline
        self._evict = False  # some work was abandoned since the last iteration

    @property
    def works(self) -> list[Work]:
        """The works with rows still in flight."""
        return list(self._works)

    def admit(self, rows: int, tol: float, max_iter: int, deadline: float = math.inf, tag: Any = None) -> Work:
        """Append ``rows`` rows that start their count at zero; returns their work."""
        start = self.n
        if start + rows > self.capacity:
            raise ValueError(f"{start + rows} rows exceed the active set's capacity {self.capacity}")
        work = Work(rows, self.latent_shape, tol, max_iter, deadline, tag)
        sl = slice(start, start + rows)
        self._tol[sl] = tol
        self._max_iter[sl] = max_iter
        self._deadline[sl] = deadline
        self._iters[sl] = 0
        self._row[sl] = np.arange(rows)
        self._owner.extend([work] * rows)
        self._works.append(work)
        self._timed += deadline != math.inf
        self.n += rows
        return work

    def abandon(self, work: Work) -> None:
        """Stop ``work``'s rows at the next iteration (its caller is gone). Safe from any thread:
        it only sets two flags, which the iterating thread reads once per iteration."""
        work.abandoned = True
        self._evict = True

    def advance(
        self, residuals: np.ndarray, steps: np.ndarray, current: Callable[[np.ndarray], np.ndarray]
    ) -> tuple[np.ndarray | None, list[Work]]:
        """Count one iteration of every row and stop the rows whose rule says so.

        ``residuals`` and ``steps`` are float32 [n] in row order; ``current(mask)`` returns the
        iterates [m, *latent] of the rows where ``mask`` is True. Returns the mask of rows that
        go on (None when all do: nothing to compact) and the works whose last row stopped.
        """
        n = self.n
        iters = self._iters[:n]
        iters += 1
        done = residuals <= self._tol[:n]
        done |= iters >= self._max_iter[:n]
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
            for arr in (self._tol, self._max_iter, self._deadline, self._iters, self._row):
                arr[:m] = arr[:n][keep]
            self._owner = [o for o, k in zip(self._owner, keep.tolist(), strict=True) if k]
        else:
            self._owner = []
        self.n = m
        if finished:
            self._works = [w for w in self._works if w.remaining]
            self._timed = sum(w.deadline != math.inf for w in self._works)
        return keep, finished

    def clear(self) -> list[Work]:
        """Drop every row (a failed iteration); returns the works that were in flight."""
        works, self._works, self._owner = self._works, [], []
        self.n = self._timed = 0
        return works

    def _record(self, idx: np.ndarray, residuals: np.ndarray, steps: np.ndarray, u: np.ndarray) -> list[Work]:
        """Write the stopped rows ``idx`` (with iterates ``u``) into their works' outputs."""
        rows = self._row[idx]
        iters = self._iters[idx]
        if len(self._works) == 1:  # one work owns every row: write them all at once
            work = self._works[0]
            out = work.out
            out.u[rows], out.iterations[rows], out.residuals[rows], out.steps[rows] = (
                u,
                iters,
                residuals[idx],
                steps[idx],
            )
            work.remaining -= len(idx)
            return [work] if work.remaining == 0 else []
        finished = []
        owners = self._owner
        for j, i in enumerate(idx.tolist()):
            work = owners[i]
            row = rows[j]
            out = work.out
            out.u[row] = u[j]
            out.iterations[row] = iters[j]
            out.residuals[row] = residuals[i]
            out.steps[row] = steps[i]
            work.remaining -= 1
            if work.remaining == 0:
                finished.append(work)
        return finished
