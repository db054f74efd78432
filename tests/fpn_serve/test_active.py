"""The active set's stopping rules and the queue policy, with plain arrays and a given clock."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from fpn_serve.batching.policy import ALONE_MAX_ITER, INLINE, SHARED, SOLO, ModeChooser, QueuePolicy
from fpn_serve.errors import QueueFull
from fpn_serve.runtime.active import ActiveSet
from fpn_serve.runtime.request import Prepared

LATENT = (3,)


def _rows(n: int, value: float = 0.0) -> np.ndarray:
    return np.full(n, value, np.float32)


def _iterates(active: ActiveSet) -> np.ndarray:
    """Each row's iterate is its row number at admission time plus 100 * the work's index."""
    return np.arange(active.n * 3, dtype=np.float32).reshape(active.n, 3)


def test_each_row_stops_by_its_own_tolerance_and_max_iter() -> None:
    active = ActiveSet(8, LATENT)
    loose = active.admit(2, tol=1e-1, max_iter=50)
    capped = active.admit(3, tol=0.0, max_iter=2)
    residuals = np.array([0.05, 0.5, 0.5, 0.5, 0.5], np.float32)
    u = np.arange(15, dtype=np.float32).reshape(5, 3)
    keep, finished = active.advance(residuals, residuals * 2, lambda mask: u[mask])
    assert keep is not None and keep.tolist() == [False, True, True, True, True]
    assert finished == [] and active.n == 4 and loose.remaining == 1
    np.testing.assert_array_equal(loose.out.u[0], u[0])
    assert loose.out.iterations[0] == 1 and loose.out.residuals[0] == np.float32(0.05)
    keep, finished = active.advance(_rows(4, 0.5), _rows(4, 1.0), lambda mask: np.zeros((int(mask.sum()), 3)))
    assert finished == [capped] and active.n == 1  # capped reached max_iter=2; loose's other row goes on
    assert capped.out.iterations.tolist() == [2, 2, 2]
    keep, finished = active.advance(_rows(1, 0.01), _rows(1), lambda mask: np.ones((int(mask.sum()), 3)))
    assert finished == [loose] and active.n == 0 and loose.out.iterations.tolist() == [1, 3]


def test_nothing_stops_nothing_moves() -> None:
    active = ActiveSet(4, LATENT)
    active.admit(4, tol=1e-3, max_iter=10)
    keep, finished = active.advance(_rows(4, 1.0), _rows(4), lambda mask: pytest.fail("no row stopped"))
    assert keep is None and finished == [] and active.n == 4


def test_a_passed_deadline_stops_only_its_rows() -> None:
    active = ActiveSet(4, LATENT)
    late = active.admit(1, tol=0.0, max_iter=100, deadline=time.perf_counter() - 1)
    on_time = active.admit(1, tol=0.0, max_iter=100, deadline=math.inf)
    keep, finished = active.advance(_rows(2, 1.0), _rows(2), lambda mask: np.zeros((int(mask.sum()), 3)))
    assert finished == [late] and keep is not None and keep.tolist() == [False, True]
    assert active.works == [on_time]


def test_abandoned_work_leaves_at_the_next_iteration() -> None:
    active = ActiveSet(6, LATENT)
    gone = active.admit(2, tol=0.0, max_iter=1000, tag="gone")
    stays = active.admit(3, tol=0.0, max_iter=1000, tag="stays")
    active.advance(_rows(5, 1.0), _rows(5), lambda mask: pytest.fail("no row stopped"))
    active.abandon(gone)
    keep, finished = active.advance(_rows(5, 1.0), _rows(5), lambda mask: np.zeros((int(mask.sum()), 3)))
    assert finished == [gone] and gone.abandoned and keep is not None
    assert keep.tolist() == [False, False, True, True, True] and active.n == 3
    assert active.works == [stays] and gone.out.iterations.tolist() == [2, 2]
    keep, _ = active.advance(_rows(3, 1.0), _rows(3), lambda mask: pytest.fail("no row stopped"))
    assert keep is None  # the eviction check ran once; nothing else was abandoned


def test_capacity_is_enforced() -> None:
    active = ActiveSet(2, LATENT)
    active.admit(2, tol=0.1, max_iter=5)
    with pytest.raises(ValueError, match="capacity 2"):
        active.admit(1, tol=0.1, max_iter=5)


def _prepared(rows: int, tol: float, max_iter: int = 100, deadline: float = math.inf) -> Prepared:
    return Prepared(np.zeros((rows, 1), np.float32), tol, max_iter, "fixed_point", deadline)


def _policy(**kwargs: float) -> QueuePolicy[str]:
    # one iteration per decade of tolerance: tol 1e-1 needs 1, 1e-6 needs 6
    return QueuePolicy(lambda tol: max(1.0, -math.log10(tol)), capacity=8, max_queue=4, encode_rows=2, **kwargs)


def test_loose_requests_pass_tight_ones_but_not_forever() -> None:
    policy = _policy(slack=30.0)
    policy.iteration_s = 1e-3
    policy.push("tight", _prepared(2, 1e-6), now=0.0)  # virtual deadline 0 + 30 * 6 ms = 0.18 s
    policy.push("loose", _prepared(2, 1e-1), now=0.0)  # 0.03 s
    assert policy.take(lambda item: True) == (["loose"], 2)
    assert policy.take(lambda item: True) == (["tight"], 2)
    policy.push("waited", _prepared(2, 1e-6), now=0.0)  # 0.18 s
    policy.push("newcomer", _prepared(2, 1e-1), now=0.16)  # 0.19 s: arrived after the tight one's slack ran out
    assert policy.take(lambda item: True) == (["waited"], 2)
    assert policy.take(lambda item: True) == (["newcomer"], 2)
    assert policy.occupied == 8


def test_first_come_first_served_without_slack_and_a_deadline_caps_the_key() -> None:
    policy = _policy(slack=0.0)
    policy.push("first", _prepared(1, 1e-6), now=1.0)
    policy.push("second", _prepared(1, 1e-1), now=2.0)
    policy.push("urgent", _prepared(1, 1e-6, deadline=0.5), now=3.0)
    assert policy.take(lambda item: True) == (["urgent", "first"], 2)


def test_rooms_queue_limit_and_unwanted_requests() -> None:
    policy = _policy()
    for i in range(4):
        policy.push(f"r{i}", _prepared(3, 1e-3), now=float(i))
    with pytest.raises(QueueFull, match="4 requests are queued"):
        policy.push("r4", _prepared(1, 1e-3), now=5.0)
    assert policy.take(lambda item: item != "r0") == (["r1"], 3)  # r0 was given up on: no room taken
    assert policy.take(lambda item: True) == (["r2"], 3)
    assert not policy.head_fits()  # 6 of 8 rooms taken, r3 needs 3
    policy.release(3)
    assert policy.head_fits() and policy.take(lambda item: True) == (["r3"], 3)


def test_only_a_short_lone_input_in_an_idle_scheduler_runs_alone() -> None:
    policy = _policy()
    assert not policy.may_run_alone(_prepared(2, 1e-3))
    assert not policy.may_run_alone(_prepared(1, 1e-3, max_iter=ALONE_MAX_ITER + 1))
    assert not policy.may_run_alone(_prepared(1, 1e-3, deadline=10.0))
    assert policy.may_run_alone(_prepared(1, 1e-3)) and policy.occupied == 1
    assert not policy.may_run_alone(_prepared(1, 1e-3))  # the room is taken
    policy.release(1)
    policy.push("queued", _prepared(1, 1e-3), now=0.0)
    assert not policy.may_run_alone(_prepared(1, 1e-3))  # someone is waiting


def test_loose_single_inputs_take_the_fast_lane_while_the_scheduler_is_busy() -> None:
    policy = _policy()  # 1e-1 needs 1 iteration, 1e-4 needs 4, 1e-5 needs 5
    policy.push("queued", _prepared(2, 1e-6), now=0.0)
    policy.occupied = 6
    assert not policy.may_run_alone(_prepared(1, 1e-1))  # not idle: no lone run
    assert policy.fast_lane(_prepared(1, 1e-1)) and policy.occupied == 7  # but the fast lane, with a room
    assert policy.fast_lane(_prepared(1, 1e-4)) and policy.occupied == 8  # FAST_LANE_ITERATIONS: 4
    policy.occupied = 6
    assert not policy.fast_lane(_prepared(1, 1e-5))  # five iterations: the batch
    assert not policy.fast_lane(_prepared(2, 1e-1))  # several inputs: the batch
    assert not policy.fast_lane(_prepared(1, 1e-1, deadline=10.0))  # not plain: the batch
    assert not policy.fast_lane(_prepared(1, 1e-1, max_iter=ALONE_MAX_ITER + 1))
    policy.occupied = 8
    assert not policy.fast_lane(_prepared(1, 1e-1))  # no room free
    assert policy.occupied == 8


def _epochs(chooser: ModeChooser, now: float, rate: dict[str, float], load: int, seconds: float) -> float:
    """Answers at ``rate[mode]`` per second for ``seconds``, at ``load``; returns the time after."""
    step = 0.01
    for _ in range(round(seconds / step)):
        now += step
        chooser.answered(max(1, round(rate[chooser.mode] * step)), load, now)
    return now


def test_the_chooser_tries_every_mode_and_keeps_the_fastest_at_each_load() -> None:
    chooser = ModeChooser()
    assert chooser.mode == SHARED  # before any measurement
    at_8 = {SHARED: 1000.0, SOLO: 2000.0, INLINE: 1500.0}
    now = _epochs(chooser, 0.0, at_8, load=8, seconds=2.0)
    assert chooser.mode == SOLO and {m for (level, m) in chooser.rates if level == 3} == {SHARED, SOLO, INLINE}
    modes = set()
    for _ in range(20):  # it stays with the fastest while the figures are fresh
        now = _epochs(chooser, now, at_8, load=8, seconds=0.25)
        modes.add(chooser.mode)
    assert modes == {SOLO}
    # another load level has figures of its own: there the shared batch is faster
    at_64 = {SHARED: 4000.0, SOLO: 2000.0, INLINE: 1500.0}
    now = _epochs(chooser, now, at_64, load=64, seconds=2.0)
    assert chooser.mode == SHARED and (6, SHARED) in chooser.rates and chooser.rates[3, SOLO][0] > 1500
    # a figure older than STALE_S is measured again: the machine may have changed
    seen = set()
    for _ in range(round(ModeChooser.STALE_S / 0.25) + 8):
        now = _epochs(chooser, now, at_64, load=64, seconds=0.25)
        seen.add(chooser.mode)
    assert seen == {SHARED, SOLO, INLINE} and chooser.mode == SHARED


def test_an_idle_pause_is_not_measured() -> None:
    chooser = ModeChooser()
    chooser.answered(1, 1, 0.0)
    chooser.answered(1, 1, 5.0)  # five idle seconds: the epoch starts again here, nothing measured
    assert chooser.rates == {} and chooser.mode == SHARED


def test_only_plain_single_inputs_go_solo() -> None:
    policy = _policy()
    policy.chooser.mode = SOLO
    assert policy.goes_solo([_prepared(1, 1e-3), _prepared(1, 1e-6)])
    assert not policy.goes_solo([_prepared(1, 1e-3), _prepared(2, 1e-3)])  # several inputs: the shared batch
    assert not policy.goes_solo([_prepared(1, 1e-3, deadline=10.0)])  # a deadline: the step loop
    policy.chooser.mode = SHARED
    assert not policy.goes_solo([_prepared(1, 1e-3)])
