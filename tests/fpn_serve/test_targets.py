"""Targets instead of tolerances: accuracy bounds from the calibration table, latency from measured costs."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

from fpn_serve import Engine, InputError
from fpn_serve.errors import TargetUnreachable
from fpn_serve.runtime.targets import Costs, wilson_lower_bound


@pytest.fixture(scope="module")
def engine(shipped_model: Path) -> Engine:
    return Engine.load(shipped_model, device="cpu")


def test_the_lower_bound_is_below_the_rate_and_tightens_with_more_images() -> None:
    assert wilson_lower_bound(9957, 10000) == pytest.approx(0.99448, abs=2e-5)
    assert wilson_lower_bound(99, 100) < wilson_lower_bound(990, 1000) < wilson_lower_bound(9900, 10000) < 0.99
    assert wilson_lower_bound(0, 10) == 0.0 and wilson_lower_bound(10, 10) < 1.0
    # one-sided 95 %: in repeated sampling the bound falls below the true rate about 95 % of the time
    rng = np.random.default_rng(0)
    draws = rng.binomial(500, 0.97, 4000)
    covered = np.mean([wilson_lower_bound(int(k), 500) <= 0.97 for k in draws])
    assert 0.93 <= covered <= 0.98


def test_target_accuracy_picks_the_loosest_tolerance_whose_bound_reaches_it(engine: Engine) -> None:
    rows = engine.targets.rows
    assert [r.tol for r in rows] == sorted((r.tol for r in rows), reverse=True)  # loosest first
    x = np.zeros((1, *engine.manifest.input.shape), np.float32)
    for target in (0.99, rows[1].lower_bound, max(r.lower_bound for r in rows)):
        prepared = engine.prepare(x, target_accuracy=target)
        choice = prepared.choice
        assert choice is not None and choice.target == "target_accuracy" and choice.lower_bound >= target
        chosen = next(r for r in rows if r.tol == prepared.tol)
        assert all(r.lower_bound < target for r in rows if r.tol > chosen.tol)  # nothing looser would do
        assert prepared.max_iter == chosen.max_iter and math.isinf(prepared.deadline)
    with pytest.raises(TargetUnreachable, match=r"target_accuracy 0\.9999 is out of reach: the best this model offers"):
        engine.prepare(x, target_accuracy=0.9999)


def test_latency_budget_picks_the_tightest_tolerance_that_fits_and_becomes_the_deadline(engine: Engine) -> None:
    targets = engine.targets
    saved = targets.costs
    # 50 us fixed plus 10 us per iteration at batch 1: p99 iterations 4 -> 0.09 ms, 17 -> 0.22 ms
    targets.costs = Costs((1, 256), (50e-6, 2e-3), (10e-6, 0.5e-3))
    try:
        x = np.zeros((1, *engine.manifest.input.shape), np.float32)
        before = time.perf_counter()
        prepared = engine.prepare(x, latency_budget_ms=0.15)
        assert prepared.choice is not None and prepared.choice.predicted_p99_ms is not None
        assert prepared.choice.predicted_p99_ms <= 0.15
        fits = [r for r in targets.rows if 1e3 * (50e-6 + r.p99_iterations * 10e-6) <= 0.15]
        assert prepared.tol == min(r.tol for r in fits)
        assert before + 0.15e-3 <= prepared.deadline <= time.perf_counter() + 0.15e-3  # the budget is the deadline
        with pytest.raises(TargetUnreachable, match=r"latency_budget_ms 0\.05 is out of reach: the fastest"):
            engine.prepare(x, latency_budget_ms=0.05)
        big = engine.prepare(np.zeros((2, *engine.manifest.input.shape), np.float32), latency_budget_ms=6.0, batch=256)
        assert big.choice is not None and big.choice.predicted_p99_ms is not None and big.choice.predicted_p99_ms > 2.0
    finally:
        targets.costs = saved


def test_measured_costs_feed_the_latency_table(engine: Engine) -> None:
    costs = engine.measure_costs()  # through the engine's own path on this machine (timings vary)
    assert costs.batches == (1, 16, 256)
    assert all(f > 0 for f in costs.fixed_s) and all(s >= 0 for s in costs.step_s)
    table = engine.targets.table()
    predicted = [row["predicted_p99_ms"] for row in table]
    assert all(isinstance(p, float) and p > 0 for p in predicted)
    by_p99 = sorted(zip((row["p99_iterations"] for row in table), predicted, strict=True))
    assert [p for _, p in by_p99] == sorted(p for _, p in by_p99)  # more iterations never predict less time


def test_a_target_and_a_tolerance_together_are_refused(engine: Engine) -> None:
    x = np.zeros((1, *engine.manifest.input.shape), np.float32)
    with pytest.raises(InputError, match="a target chooses tol and max_iter itself"):
        engine.prepare(x, tol=1e-3, target_accuracy=0.99)
    with pytest.raises(InputError, match="not both"):
        engine.prepare(x, target_accuracy=0.99, latency_budget_ms=1.0)
    with pytest.raises(InputError, match="target_accuracy must be a number with 0 < target_accuracy <= 1"):
        engine.prepare(x, target_accuracy=1.5)
