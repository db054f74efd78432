"""Targets instead of tolerances: the (tol, max_iter) that meets an accuracy or a latency target.

``target_accuracy=A`` picks the loosest calibrated tolerance whose accuracy, as a one-sided 95 %
lower confidence bound (Wilson's score bound) over the manifest's calibration images, is at least
A. The exporter measures the table on training images that training held out where there are
such (the manifest's ``calibration.split`` says which), so the bound is not fitted to the test
figure the model card reports.

``latency_budget_ms=B`` picks the tightest calibrated tolerance whose predicted p99 latency fits
B: a call's fixed cost (Q, S, overhead) plus the table's p99 iteration count times the cost of one
iteration, both measured by this engine on this machine through its own path (``Costs``; a
server measures them when it starts), at the batch size the request will run in.
The budget also becomes the request's deadline, the safety net for a busy moment.

A target the model cannot meet raises ``InputError`` (422) saying the best the model offers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..contract.manifest import Manifest
from ..errors import TargetUnreachable

Z_95 = 1.6448536269514722  # one-sided 95 % normal quantile


def shown(bound: float) -> float:
    """A lower bound as shown to callers: rounded down to 5 decimals, so that asking for the value
    shown is always met by the row that showed it."""
    return math.floor(bound * 1e5) / 1e5


def wilson_lower_bound(correct: int, n: int, z: float = Z_95) -> float:
    """One-sided lower confidence bound on a proportion from ``correct`` successes in ``n`` trials."""
    if n <= 0:
        return 0.0
    p = correct / n
    denom = 1 + z * z / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / denom)


@dataclass(frozen=True)
class Row:
    """One calibrated setting and what it gives."""

    tol: float
    max_iter: int
    accuracy: float
    lower_bound: float  # one-sided 95 % lower confidence bound on the accuracy
    mean_iterations: float
    p99_iterations: int
    images: int


@dataclass(frozen=True)
class Choice:
    """What a target chose, and why."""

    tol: float
    max_iter: int
    target: str  # "target_accuracy" or "latency_budget_ms"
    lower_bound: float  # of the chosen row's accuracy
    predicted_p99_ms: float | None = None  # for a latency budget
    requested: float | None = None  # the target's value, as the caller gave it

    def report(self) -> dict[str, float | str | None]:
        """What the answer says about the choice."""
        return {
            "by": self.target,
            "requested": self.requested,
            "accuracy_lower_bound": shown(self.lower_bound),
            "predicted_p99_ms": None if self.predicted_p99_ms is None else round(self.predicted_p99_ms, 4),
        }


@dataclass
class Costs:
    """Seconds per call at a few batch sizes, measured on this machine through the engine's own
    path: ``fixed_s`` (Q, S and the call's overhead) plus ``step_s`` per iteration. ``at(batch)``
    interpolates between the measured sizes (in log batch)."""

    batches: tuple[int, ...]
    fixed_s: tuple[float, ...]
    step_s: tuple[float, ...]

    def at(self, batch: int) -> tuple[float, float]:
        xs = np.log(np.asarray(self.batches, np.float64))
        at = math.log(max(1, batch))
        return float(np.interp(at, xs, self.fixed_s)), float(np.interp(at, xs, self.step_s))

    @classmethod
    def measure(
        cls,
        run: Callable[[np.ndarray, int], object],
        input_shape: tuple[int, ...],
        batches: tuple[int, ...] = (1, 16, 256),
        repeats: int = 15,
        pause: Callable[[], object] | None = None,
    ) -> Costs:
        """``run(x, k)`` answers inputs ``x`` with exactly ``k`` iterations; timed at 1 and 25.
        ``pause``, when given, is called before every timed call (a server waits there for a quiet
        moment, so that the measurement neither slows its traffic nor is slowed by it)."""
        rng = np.random.default_rng(0)
        fixed, step = [], []
        for b in batches:
            x = rng.normal(0, 1, (b, *input_shape)).astype(np.float32)
            one = _median(lambda x=x: run(x, 1), repeats, pause)  # type: ignore[misc]
            many = _median(lambda x=x: run(x, 25), repeats, pause)  # type: ignore[misc]
            per = max(0.0, (many - one) / 24)
            step.append(per)
            fixed.append(max(0.0, one - per))
        return cls(batches, tuple(fixed), tuple(step))


def _median(fn: Callable[[], object], repeats: int, pause: Callable[[], object] | None = None) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if pause is not None:
            pause()
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return float(np.median(times))


class Targets:
    """The calibration table of one model as targets: rows from loosest to tightest tolerance."""

    def __init__(self, manifest: Manifest, max_iter_cap: int) -> None:
        cal = manifest.calibration
        self.split = str(cal.get("split", "test"))
        rows = []
        for r in cal.get("tolerances", []) if isinstance(cal.get("tolerances"), list) else []:
            try:
                tol, images = float(r["tol"]), int(r["images"])
                correct = int(r.get("correct", round(float(r["accuracy"]) * images)))
                max_iter = min(int(r["max_iter"]), max_iter_cap)
                row = Row(
                    tol,
                    max_iter,
                    correct / images,
                    wilson_lower_bound(correct, images),
                    float(r["mean_iterations"]),
                    int(r["p99_iterations"]),
                    images,
                )
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                continue  # a malformed row offers nothing
            rows.append(row)
        self.rows = sorted(rows, key=lambda r: -r.tol)  # loosest first
        self.costs: Costs | None = None

    def for_accuracy(self, target: float) -> Choice:
        """The loosest row whose lower bound reaches ``target``."""
        for row in self.rows:
            if row.lower_bound >= target:
                return Choice(row.tol, row.max_iter, "target_accuracy", row.lower_bound, requested=target)
        best = max(self.rows, key=lambda r: r.lower_bound, default=None)
        if best is None:
            raise TargetUnreachable("this model has no calibration table, so it cannot choose by target_accuracy")
        raise TargetUnreachable(
            f"target_accuracy {target:g} is out of reach: the best this model offers is {best.lower_bound:.4f} "
            f"(95 % lower bound of {100 * best.accuracy:.2f} % on {best.images} {self._split_name()}, "
            f"at tol={best.tol:g})"
        )

    def predicted_p99_ms(self, row: Row, batch: int) -> float:
        assert self.costs is not None
        fixed, step = self.costs.at(batch)
        return 1e3 * (fixed + row.p99_iterations * step)

    def for_latency(self, budget_ms: float, batch: int = 1) -> Choice:
        """The tightest row whose predicted p99 latency at ``batch`` fits ``budget_ms``."""
        if self.costs is None or not self.rows:
            raise TargetUnreachable("this model has no calibration table, so it cannot choose by latency_budget_ms")
        fitting = [r for r in self.rows if self.predicted_p99_ms(r, batch) <= budget_ms]
        if not fitting:
            fastest = min(self.rows, key=lambda r: self.predicted_p99_ms(r, batch))
            raise TargetUnreachable(
                f"latency_budget_ms {budget_ms:g} is out of reach: the fastest this model offers is "
                f"{self.predicted_p99_ms(fastest, batch):.3f} ms at p99 (tol={fastest.tol:g}) on this machine"
            )
        row = min(fitting, key=lambda r: r.tol)
        predicted = self.predicted_p99_ms(row, batch)
        return Choice(row.tol, row.max_iter, "latency_budget_ms", row.lower_bound, predicted, budget_ms)

    def table(self, batch: int = 1) -> list[dict[str, float | int | None]]:
        """What callers choose from: each row with its accuracy bound and predicted p99 latency."""
        return [
            {
                "tol": r.tol,
                "max_iter": r.max_iter,
                "accuracy": r.accuracy,
                "accuracy_lower_bound": shown(r.lower_bound),
                "mean_iterations": r.mean_iterations,
                "p99_iterations": r.p99_iterations,
                "predicted_p99_ms": None if self.costs is None else round(self.predicted_p99_ms(r, batch), 4),
            }
            for r in self.rows
        ]

    def _split_name(self) -> str:
        return "test images" if self.split == "test" else self.split
