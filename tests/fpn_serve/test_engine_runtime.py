"""The engine's runtime features: solvers, deadlines, error bounds, non-contractive models, the scheduler."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fpn_serve import Engine, InputError
from fpn_serve.batching.policy import expected_iterations
from fpn_serve.batching.scheduler import QueueFull, Scheduler
from fpn_serve.contract.manifest import load_manifest

from .synthetic import linear_model


@pytest.fixture(scope="module")
def engine(shipped_model: Path) -> Engine:
    return Engine.load(shipped_model, device="cpu")


@pytest.fixture(scope="module")
def digits(mnist_root: Path) -> np.ndarray:
    from training.data import load_split

    test = load_split("mnist", mnist_root, train=False, limit=256)
    return test.normalise(test.images).numpy()


def test_anderson_agrees_with_plain_iteration(engine: Engine, digits: np.ndarray) -> None:
    plain = engine.classify(digits, tol=1e-6, max_iter=500)
    anderson = engine.classify(digits, tol=1e-6, max_iter=500, solver="anderson")
    assert anderson.converged.all() and plain.converged.all()
    np.testing.assert_array_equal(anderson.labels, plain.labels)
    np.testing.assert_allclose(anderson.logits, plain.logits, atol=1e-3)


def test_error_bound_holds_against_a_long_solve(engine: Engine, digits: np.ndarray) -> None:
    z = engine.encode(digits)
    exact = engine.solve(z, 0.0, 1000).u  # to float precision
    for solver in ("fixed_point", "anderson"):
        for tol in (1e-1, 1e-2, 1e-3):
            out = engine.solve(z, tol, 100, solver=solver)
            dist = np.linalg.norm((out.u - exact).reshape(len(z), -1), axis=1)
            bound = out.steps * engine.manifest.contraction.gamma / (1 - engine.manifest.contraction.gamma)
            assert bool((dist <= bound * (1 + 1e-3) + 1e-5).all()), (solver, tol, float((dist - bound).max()))
            assert dist.max() > 0  # a loose tolerance really stops short of the fixed point


@pytest.fixture(scope="module")
def slow_engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """A model that never converges (T(u, z) = u + z), so only max_iter or a deadline stops it."""
    folder = linear_model(tmp_path_factory.mktemp("m") / "never", scale=1.0)
    return Engine.load(folder, device="cpu", max_iter_cap=10_000)  # long runs: above the default cap


def test_deadline_answers_with_the_current_iterate(slow_engine: Engine, engine: Engine, digits: np.ndarray) -> None:
    x = np.ones((8, 1, 2, 2), np.float32)
    per_iteration = _seconds_per_iteration(slow_engine, x)
    started = time.perf_counter()
    result = slow_engine.classify(x, tol=1e-9, max_iter=10_000, deadline_ms=5)
    elapsed = time.perf_counter() - started
    assert (result.iterations < 10_000).all() and (result.iterations >= 1).all()
    assert not result.converged.any()
    # the answer is the iterate reached: u_k = k * z for this model, so S(u_k) = k * [1, 1, 1]
    np.testing.assert_allclose(result.logits, result.iterations[:, None] * np.ones((8, 3)), rtol=1e-6)
    assert elapsed < 0.005 + 50 * per_iteration + 0.05  # one iteration past the deadline, plus Q, S, slack
    with pytest.raises(InputError, match="deadline_ms"):
        engine.classify(digits[:1], deadline_ms=-1)


def _seconds_per_iteration(engine: Engine, x: np.ndarray) -> float:
    started = time.perf_counter()
    engine.classify_fixed(x, 2000)
    return (time.perf_counter() - started) / 2000


def test_a_non_contractive_model_stops_at_max_iter(tmp_path: Path) -> None:
    engine = Engine.load(linear_model(tmp_path / "diverges", scale=1.5), device="cpu")
    x = np.ones((3, 1, 2, 2), np.float32)
    started = time.perf_counter()
    result = engine.classify(x, tol=1e-6, max_iter=40)
    assert time.perf_counter() - started < 5
    assert result.iterations.tolist() == [40, 40, 40]
    assert not result.converged.any()
    assert np.isinf(result.error_bounds).all()  # no certificate for gamma >= 1
    # and a contractive twin converges to the analytic fixed point z / (1 - a)
    twin = Engine.load(linear_model(tmp_path / "converges", scale=0.5), device="cpu")
    good = twin.classify(x, tol=1e-6, max_iter=200)
    assert good.converged.all()
    np.testing.assert_allclose(good.logits, np.full((3, 3), 2.0), rtol=1e-5)


def test_unknown_solver_is_refused(engine: Engine, digits: np.ndarray) -> None:
    with pytest.raises(InputError, match="unknown solver 'newton'; choose one of fixed_point, anderson"):
        engine.classify(digits[:1], solver="newton")


def test_scheduler_gives_each_caller_its_own_solo_answer(engine: Engine, digits: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    jobs = []
    for _ in range(48):
        n = int(rng.integers(1, 5))
        start = int(rng.integers(0, len(digits) - n))
        jobs.append((digits[start : start + n], float(10.0 ** -rng.integers(1, 7)), int(rng.integers(5, 60))))
    results: list[object] = [None] * len(jobs)
    scheduler = Scheduler(engine, max_active=32)
    scheduler.start()
    try:
        barrier = threading.Barrier(len(jobs))

        def call(i: int) -> None:
            x, tol, max_iter = jobs[i]
            barrier.wait()
            results[i] = scheduler.classify(x, tol, max_iter)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        scheduler.stop()
    assert scheduler.stats["max_active_seen"] > 4  # requests really shared the batch
    for (x, tol, max_iter), got in zip(jobs, results, strict=True):
        solo = engine.classify(x, tol, max_iter)
        assert got is not None
        np.testing.assert_array_equal(got.iterations, solo.iterations)  # type: ignore[attr-defined]
        np.testing.assert_array_equal(got.labels, solo.labels)  # type: ignore[attr-defined]
        np.testing.assert_allclose(got.logits, solo.logits, rtol=0, atol=1e-5)  # type: ignore[attr-defined]


def test_scheduler_bounds_its_queue_and_validates_before_queueing(engine: Engine, digits: np.ndarray) -> None:
    scheduler = Scheduler(engine, max_active=1, max_queue=2)
    with pytest.raises(QueueFull, match="not running"):
        scheduler.submit(digits[:1])
    scheduler.start()
    try:
        with pytest.raises(InputError, match="at most 1"):
            scheduler.submit(digits[:2])
        with pytest.raises(InputError, match="tol must be"):
            scheduler.submit(digits[:1], tol=5.0)
        futures = []

        def flood() -> None:
            for _ in range(50):  # one runs, two wait, then the queue is full
                futures.append(scheduler.submit(digits[:1], 1e-9, 1000))

        with pytest.raises(QueueFull, match="queued"):
            flood()
        assert all(f.result(30).iterations[0] >= 1 for f in futures)
    finally:
        scheduler.stop()


def test_scheduler_honours_each_requests_deadline(slow_engine: Engine) -> None:
    x = np.ones((6, 1, 2, 2), np.float32)
    scheduler = Scheduler(slow_engine, max_active=16)
    scheduler.start()
    try:
        slow = scheduler.submit(x[:4], 1e-9, 10_000)  # runs all 10,000 iterations
        quick = scheduler.submit(x[4:5], 1e-1, 1000)  # residual 1/k: done after 10 iterations
        bounded = scheduler.submit(x[5:6], 1e-9, 10_000, deadline_ms=20)
        assert quick.result(10).iterations.tolist() == [10]
        assert not bounded.result(10).converged.any() and bounded.result().iterations[0] < 10_000
        assert not slow.done()  # the long request did not hold the others back
        assert slow.result(60).iterations.tolist() == [10_000] * 4
    finally:
        scheduler.stop()


def test_default_max_iter_respects_a_lower_cap(shipped_model: Path, digits: np.ndarray) -> None:
    capped = Engine.load(shipped_model, device="cpu", max_iter_cap=5)
    result = capped.classify(digits[:8], tol=1e-9)  # the manifest's default max_iter is 100
    assert result.iterations.max() == 5


def _broken_t(*limits: np.ndarray) -> tuple[np.ndarray, ...]:
    raise RuntimeError("T failed")


def test_a_failing_stage_answers_its_callers_and_the_scheduler_goes_on(
    engine: Engine, digits: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler = Scheduler(engine, max_active=8)

    def broken_q(x: np.ndarray) -> np.ndarray:
        raise RuntimeError("Q failed")

    scheduler.start()
    try:
        with monkeypatch.context() as patch:
            patch.setattr(scheduler.engine, "encode", broken_q)
            futures = [scheduler.submit(digits[i : i + 2]) for i in range(0, 6, 2)]  # two inputs: the shared batch
            for f in futures:
                with pytest.raises(RuntimeError, match="Q failed"):
                    f.result(10)
        with monkeypatch.context() as patch:
            patch.setattr(scheduler._runner, "step", _broken_t)  # one application per run
            patch.setattr(scheduler._runner, "steps", _broken_t)  # several (steps.onnx)
            futures = [scheduler.submit(digits[i : i + 2]) for i in range(0, 6, 2)]
            for f in futures:
                with pytest.raises(RuntimeError, match="T failed"):
                    f.result(10)
        got = scheduler.classify(digits[:2], 1e-3)  # the faults are gone: served as before
        np.testing.assert_array_equal(got.iterations, engine.classify(digits[:2], 1e-3).iterations)
    finally:
        scheduler.stop()


def test_an_idle_scheduler_answers_a_lone_input_in_the_callers_thread(engine: Engine, digits: np.ndarray) -> None:
    scheduler = Scheduler(engine, max_active=8)
    scheduler.start()
    try:
        got = scheduler.classify(digits[5:6], 1e-4)
        assert scheduler.stats["alone"] == 1 and scheduler.stats["iterations"] == 0  # no shared batch involved
        solo = engine.classify(digits[5:6], 1e-4)
        for name in ("labels", "logits", "iterations", "residuals", "error_bounds"):
            np.testing.assert_array_equal(getattr(got, name), getattr(solo, name), err_msg=name)

        async def burst() -> list[object]:
            # the first runs on the loop; the second comes before the loop has turned: the shared batch
            first = scheduler.submit_async(digits[6:7], 1e-3)
            second = scheduler.submit_async(digits[7:8], 1e-3)
            return list(await asyncio.gather(first, second))

        first, second = asyncio.run(burst())
        assert scheduler.stats["alone"] == 2 and scheduler.stats["admitted"] == 3
        for i, result in ((6, first), (7, second)):
            np.testing.assert_array_equal(result.logits, engine.classify(digits[i : i + 1], 1e-3).logits)  # type: ignore[attr-defined]
    finally:
        scheduler.stop()


def test_a_loose_input_takes_the_fast_lane_past_a_busy_shared_batch(
    engine: Engine, digits: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the shared batch is held, a tol=1e-1 input is answered in its caller's thread (as it
    would be alone, to the bit) and a tol=1e-4 one waits for the batch."""
    scheduler = Scheduler(engine, max_active=8)
    release, stepping = threading.Event(), threading.Event()
    real_steps, real_step = scheduler._runner.steps, scheduler._runner.step

    def held(real: Any) -> Any:
        def run(*args: Any) -> Any:
            stepping.set()
            release.wait(30)
            return real(*args)

        return run

    monkeypatch.setattr(scheduler._runner, "steps", held(real_steps))
    monkeypatch.setattr(scheduler._runner, "step", held(real_step))
    scheduler.start()
    try:
        busy = scheduler.submit(digits[:2], 1e-4)  # two inputs: the shared batch, held at its first run
        assert stepping.wait(30)
        tight = scheduler.submit(digits[3:4], 1e-4)  # submit never runs in its caller's thread
        loose = scheduler.classify(digits[2:3], 1e-1)  # answered now, while the batch is held
        assert scheduler.stats["alone"] == 1 and not busy.done() and not tight.done()
        alone = engine.classify(digits[2:3], 1e-1)
        for name in ("labels", "logits", "iterations", "residuals"):
            np.testing.assert_array_equal(getattr(loose, name), getattr(alone, name), err_msg=name)
        release.set()
        np.testing.assert_array_equal(tight.result(30).logits, engine.classify(digits[3:4], 1e-4).logits)
        np.testing.assert_array_equal(busy.result(30).iterations, engine.classify(digits[:2], 1e-4).iterations)
        assert scheduler.policy.occupied == 0
    finally:
        release.set()
        scheduler.stop()


def test_on_an_event_loop_only_the_first_lone_answer_of_a_turn_comes_at_once(
    engine: Engine, digits: np.ndarray
) -> None:
    """Two loose inputs in one turn of a loop both run in the caller's thread (the first finds the
    scheduler idle, the second takes the fast lane); the first is answered at once, the second only
    after the loop has turned, so that callers answered this way still yield to the loop (a server
    must go on reading its sockets)."""
    scheduler = Scheduler(engine, max_active=8)
    scheduler.start()
    try:

        async def burst() -> tuple[tuple[bool, bool], list[Any]]:
            first = scheduler.submit_async(digits[0:1], 1e-1)
            second = scheduler.submit_async(digits[1:2], 1e-1)
            states = (first.done(), second.done())
            return states, list(await asyncio.gather(first, second))

        states, results = asyncio.run(burst())
        assert states == (True, False)
        assert scheduler.stats["alone"] == 2 and scheduler.stats["iterations"] == 0  # both ran alone
        for i, got in enumerate(results):
            np.testing.assert_array_equal(got.logits, engine.classify(digits[i : i + 1], 1e-1).logits)
    finally:
        scheduler.stop()


def test_expected_iterations_follow_the_calibration(engine: Engine, tmp_path: Path) -> None:
    expect = expected_iterations(engine.manifest)
    table = {row["tol"]: row["mean_iterations"] for row in engine.manifest.calibration["tolerances"]}
    for tol, mean in table.items():
        assert expect(tol) == pytest.approx(mean)
    assert expect(3e-4) == pytest.approx((table[1e-3] + table[1e-4]) / 2, rel=0.1)
    assert expect(1e-8) > expect(1e-6) > expect(1e-5) and expect(0.9) >= 1.0
    assert expect(0.0) == float("inf")
    bare = load_manifest(linear_model(tmp_path / "m", scale=0.5, gamma=0.5))
    assert not bare.calibration  # no calibration: from the certified factor, log(tol) / log(gamma)
    assert expected_iterations(bare)(1e-3) == pytest.approx(math.log(1e-3) / math.log(0.5))
    assert expected_iterations(bare)(0.9) == 1.0


def test_a_caller_giving_up_never_disturbs_the_others(engine: Engine, digits: np.ndarray) -> None:
    scheduler = Scheduler(engine, max_active=2)
    scheduler.start()
    try:
        running = scheduler.submit(digits[:1], 1e-9, 300)
        other = scheduler.submit(digits[1:2], 1e-9, 300)
        waiting = scheduler.submit(digits[2:3], 1e-9, 300)  # no room: it waits for the first two
        assert waiting.cancel()  # a timeout cancels like this
        deadline = time.monotonic() + 10
        while not running.running() and time.monotonic() < deadline:
            time.sleep(0.0005)
        assert not running.cancel()  # too late to cancel a running request: it finishes for nobody's harm
        np.testing.assert_array_equal(other.result(30).iterations, engine.classify(digits[1:2], 1e-9, 300).iterations)
        np.testing.assert_array_equal(running.result(30).iterations, engine.classify(digits[:1], 1e-9, 300).iterations)
        assert scheduler.stats["admitted"] == 2  # the cancelled request never ran
        assert scheduler.classify(digits[3:4], 1e-2).iterations[0] >= 1
    finally:
        scheduler.stop()


def test_async_callers_get_the_same_answers_and_may_give_up(engine: Engine, digits: np.ndarray) -> None:
    scheduler = Scheduler(engine, max_active=8)
    scheduler.start()

    async def main() -> list[object]:
        abandoned = scheduler.submit_async(digits[:1], 1e-9, 500)
        calls = [scheduler.submit_async(digits[i : i + 2], 1e-3, 50) for i in range(1, 9, 2)]
        abandoned.cancel()  # what a timeout does
        return list(await asyncio.gather(*calls))

    try:
        results = asyncio.run(main())
        for i, got in zip(range(1, 9, 2), results, strict=True):
            solo = engine.classify(digits[i : i + 2], 1e-3, 50)
            np.testing.assert_array_equal(got.iterations, solo.iterations)  # type: ignore[attr-defined]
            np.testing.assert_allclose(got.logits, solo.logits, rtol=0, atol=1e-5)  # type: ignore[attr-defined]
        assert scheduler.classify(digits[:1], 1e-2).iterations[0] >= 1  # still serving after the closed loop
    finally:
        scheduler.stop()


def test_submit_queues_even_when_idle_and_only_one_call_paths_run_alone(
    engine: Engine, slow_engine: Engine, digits: np.ndarray
) -> None:
    scheduler = Scheduler(engine, max_active=16)
    scheduler.start()
    try:
        futures = [scheduler.submit(digits[i : i + 1], 1e-4) for i in range(8)]  # a fan-out: never run inline
        for i, f in enumerate(futures):
            np.testing.assert_array_equal(f.result(30).logits, engine.classify(digits[i : i + 1], 1e-4).logits)
        assert scheduler.stats["alone"] == 0 and scheduler.stats["admitted"] == 8
    finally:
        scheduler.stop()
    # a folder without FPN1.onnx (and the CUDA engine) has no one-call path: lone inputs join the batch
    assert not slow_engine.single_graph
    other = Scheduler(slow_engine, max_active=4)
    other.start()
    try:
        assert other.classify(np.ones((1, 1, 2, 2), np.float32), 1e-1).iterations.tolist() == [10]
        assert other.stats["alone"] == 0 and other.stats["iterations"] == 10
    finally:
        other.stop()


def test_a_failure_while_a_lone_request_runs_keeps_the_room_count(
    engine: Engine, digits: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler = Scheduler(engine, max_active=4)
    release, started = threading.Event(), threading.Event()
    real_run = engine.run

    def held(*args: object, **kwargs: object) -> object:
        started.set()
        release.wait(30)
        return real_run(*args, **kwargs)  # type: ignore[arg-type]

    scheduler.start()
    try:
        with monkeypatch.context() as patch:
            patch.setattr(scheduler.engine, "run", held)
            lone = threading.Thread(target=scheduler.classify, args=(digits[:1], 1e-3))
            lone.start()
            assert started.wait(30)
            with monkeypatch.context() as patch_t:
                patch_t.setattr(scheduler._runner, "step", _broken_t)
                patch_t.setattr(scheduler._runner, "steps", _broken_t)
                failed = scheduler.submit(digits[1:3], 1e-3)
                with pytest.raises(RuntimeError, match="T failed"):
                    failed.result(30)
            release.set()
            lone.join(30)
        deadline = time.monotonic() + 10
        while scheduler.policy.occupied and time.monotonic() < deadline:
            time.sleep(0.001)
        assert scheduler.policy.occupied == 0  # neither the lone row nor the failed ones are counted twice
        futures = [scheduler.submit(digits[i : i + 1], 1e-3) for i in range(4, 12)]  # fill the room exactly
        assert all(f.result(30).iterations[0] >= 1 for f in futures)
    finally:
        scheduler.stop()


def test_a_request_its_caller_gave_up_on_is_never_admitted(slow_engine: Engine) -> None:
    scheduler = Scheduler(slow_engine, max_active=2)
    scheduler.start()
    x = np.ones((3, 1, 2, 2), np.float32)

    async def main() -> None:
        busy = scheduler.submit_async(x[:2], 1e-9, 3000)  # residual 1/k: holds the whole room for 3,000 iterations
        waiting = scheduler.submit_async(x[2:], 1e-1)
        waiting.set_exception(TimeoutError())  # what the server's timeout does to a future
        await busy
        with pytest.raises(TimeoutError):
            await waiting

    try:
        asyncio.run(main())
        assert scheduler.stats["admitted"] == 1
    finally:
        scheduler.stop()


def test_a_malformed_calibration_falls_back_instead_of_failing(engine: Engine) -> None:
    import dataclasses

    rows = [{"tol": 1e-2, "mean_iterations": 5.0}, {"tol": 1e-2, "mean_iterations": 6.0}, {"tol": None}, "x"]
    odd = dataclasses.replace(engine.manifest, calibration={"tolerances": rows})
    assert expected_iterations(odd)(1e-3) == pytest.approx(math.log(1e-3) / math.log(odd.contraction.gamma))
    rows.append({"tol": 1e-4, "mean_iterations": 10.0})
    assert expected_iterations(odd)(1e-3) == pytest.approx(8.0)  # between the two usable tolerances


def test_a_caller_that_leaves_frees_its_rows_at_the_next_iteration(slow_engine: Engine) -> None:
    """Abandoned work (a cancelled or timed-out asyncio future) leaves the shared batch at the next
    iteration; the scheduler's iterations are stepped one by one here, so 'next' is exact."""
    scheduler = Scheduler(slow_engine, max_active=8)
    step = scheduler._runner.step
    go, went = threading.Semaphore(0), threading.Semaphore(0)

    def one_at_a_time() -> tuple[np.ndarray, np.ndarray]:
        went.release()  # the previous iteration is over, its bookkeeping included
        go.acquire()
        return step()

    scheduler._runner.step = one_at_a_time  # type: ignore[method-assign]
    scheduler.start()
    x = np.ones((3, 1, 2, 2), np.float32)

    def iterate() -> None:
        go.release()
        assert went.acquire(timeout=10)

    async def main() -> tuple[int, int, object]:
        leaving = scheduler.submit_async(x[:2], 1e-9, 5000)  # never converges: would run 5,000 iterations
        staying = scheduler.submit_async(x[2:], 1e-9, 40)
        assert await asyncio.to_thread(went.acquire, timeout=10)  # the stepper waits at its first iteration
        while scheduler.active < 3:  # both joined the batch
            await asyncio.to_thread(iterate)
        for _ in range(5):
            await asyncio.to_thread(iterate)
        leaving.cancel()  # what the server does when the caller has gone
        await asyncio.sleep(0)  # the future's callbacks run on this loop
        before = scheduler.active
        await asyncio.to_thread(iterate)
        after = scheduler.active
        for _ in range(64):
            go.release()
        return before, after, await staying

    try:
        before, after, kept = asyncio.run(main())
        assert (before, after) == (3, 1)  # one iteration later only the other request's row is left
        assert scheduler.stats["evicted"] == 1 and scheduler.stats["answered"] == 1
        assert kept.iterations.tolist() == [40]  # type: ignore[attr-defined]
    finally:
        for _ in range(64):
            go.release()
        scheduler.stop()


def test_background_work_waits_for_a_quiet_scheduler(slow_engine: Engine) -> None:
    """``wait_quiet`` (where the server's cost measurement waits before each timed call) returns
    only once no request has arrived for ``quiet_s`` and nothing runs; while work runs it times out."""
    scheduler = Scheduler(slow_engine, max_active=8)
    scheduler.start()
    try:
        began = time.perf_counter()
        assert scheduler.wait_quiet(quiet_s=0.01, timeout_s=1.0)  # idle from the start
        assert time.perf_counter() - began < 0.5
        x = np.ones((1, 1, 2, 2), np.float32)
        busy = scheduler.submit(x, 1e-9, 10_000)  # never converges: runs 10,000 iterations (0.1 s and more)
        began = time.perf_counter()
        assert not scheduler.wait_quiet(quiet_s=0.01, timeout_s=0.05)  # its rows are still running
        assert time.perf_counter() - began >= 0.05
        assert not busy.done()
        busy.result(timeout=60)
        scheduler.submit(x, 1e-9, 1).result(timeout=10)  # a short one: answered, but just now
        began = time.perf_counter()
        assert scheduler.wait_quiet(quiet_s=0.15, timeout_s=5.0)
        assert time.perf_counter() - began >= 0.1  # it waited for the quiet moment after that arrival
    finally:
        scheduler.stop()


def test_answered_requests_leave_no_reference_cycles(engine: Engine, digits: np.ndarray) -> None:
    """A request answered through the shared batch is freed by reference counting alone: nothing it
    held (its input, its work, its result) waits for the garbage collector."""
    import gc

    scheduler = Scheduler(engine, max_active=32)
    scheduler.start()

    async def burst() -> list[object]:
        return list(await asyncio.gather(*(scheduler.submit_async(digits[i][None], 1e-4) for i in range(24))))

    try:
        asyncio.run(burst())  # warm: the event loop's own one-time objects
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            answers = asyncio.run(burst())
            answers += [f.result(timeout=30) for f in [scheduler.submit(digits[i][None], 1e-4) for i in range(8)]]
            del answers
            gc.collect()
            left = sorted({type(o).__name__ for o in gc.garbage} & {"Prepared", "_Request", "Work", "ClassifyResult"})
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert scheduler.stats["answered"] - scheduler.stats["alone"] > 0  # the shared batch answered some
        assert left == [], f"answered requests kept in reference cycles: {left}"
    finally:
        scheduler.stop()


def test_requests_sent_solo_are_answered_one_call_each_as_alone(engine: Engine, digits: np.ndarray) -> None:
    """While the chooser finds one engine call per input faster than the shared batch, the encoder
    answers the queued inputs one call each: the same answers as alone, no shared iteration."""
    from fpn_serve.batching.policy import SOLO

    scheduler = Scheduler(engine, max_active=32)
    chooser = scheduler.policy.chooser
    chooser.mode, chooser.EPOCH_S = SOLO, 1e9  # no epoch ends in this test: the mode stays
    scheduler.start()
    tols = [1e-1, 1e-3, 1e-6] * 8
    try:
        futures = [scheduler.submit(digits[i][None], tol) for i, tol in enumerate(tols)]
        got = [f.result(timeout=60) for f in futures]
        assert scheduler.stats["alone"] == len(futures) and scheduler.stats["iterations"] == 0
        for i, (tol, r) in enumerate(zip(tols, got, strict=True)):
            solo = engine.classify(digits[i][None], tol=tol)
            assert r.iterations.tolist() == solo.iterations.tolist() and r.labels.tolist() == solo.labels.tolist()
            np.testing.assert_array_equal(r.logits, solo.logits)
    finally:
        scheduler.stop()
