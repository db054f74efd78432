"""steps.onnx: k applications of T per run, each row frozen by its own rule inside the graph.

The loop through it must give what one step per run gives, to the bit: the same iterates,
residuals, steps and iteration counts, for rows with different tolerances and caps, in the
engine's own loop and in the scheduler's shared batch. Rows whose stop is decided on the host
every iteration (certified stop, trace, deadline) take one step per run.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from fpn_serve import Engine
from fpn_serve.batching import policy
from fpn_serve.batching.scheduler import Scheduler
from fpn_serve.runtime.active import ActiveSet
from fpn_serve.runtime.engine import MULTISTEP_ROWS, multistep


@pytest.fixture(scope="module")
def engine(shipped_model: Path) -> Engine:
    return Engine.load(shipped_model, device="cpu")


@pytest.fixture(scope="module")
def one_step(shipped_model: Path) -> Engine:
    """The same folder with the steps graph left out: one application of T per run."""
    e = Engine.load(shipped_model, device="cpu")
    e._steps = None  # the comparison needs the loop without it
    return e


@pytest.fixture(scope="module")
def digits(mnist_root: Path) -> np.ndarray:
    from training.data import load_split

    test = load_split("mnist", mnist_root, train=False, limit=256)
    return test.normalise(test.images).numpy()


def test_the_shipped_steps_graph_runs_four_applications(engine: Engine) -> None:
    runner = engine.new_runner(8)
    assert runner.multi and runner.k == 4


def test_the_steps_graph_runs_where_it_pays(engine: Engine) -> None:
    runner = engine.new_runner(128)
    active = ActiveSet(128, tuple(engine.manifest.latent_shape))
    active.admit(1, 1e-3, 50)
    assert not multistep(runner, active)  # one row alone would waste the applications after its stop
    active.admit(1, 1e-3, 50)
    assert multistep(runner, active)
    active.admit(MULTISTEP_ROWS - 2, 1e-3, 50)
    assert multistep(runner, active)
    active.admit(1, 1e-3, 50)
    assert not multistep(runner, active)  # a large batch: the masks cost more than they save
    small = ActiveSet(8, tuple(engine.manifest.latent_shape))
    small.admit(4, 1e-3, 50, certify=True)
    assert not multistep(runner, small)  # stops decided on the host


@pytest.mark.parametrize("rows", [48, 256])
@pytest.mark.parametrize(("tol", "max_iter"), [(1e-1, 100), (1e-4, 100), (1e-6, 100), (0.0, 7), (1e-4, 3)])
def test_the_loop_through_steps_equals_one_step_per_run(
    engine: Engine, one_step: Engine, digits: np.ndarray, tol: float, max_iter: int, rows: int
) -> None:
    """48 rows run through steps.onnx from the start, 256 once at most 64 remain."""
    z = engine.encode(digits[:rows])
    many, one = engine.solve(z, tol, max_iter), one_step.solve(z, tol, max_iter)
    np.testing.assert_array_equal(many.iterations, one.iterations)
    np.testing.assert_array_equal(many.u, one.u)
    np.testing.assert_array_equal(many.residuals, one.residuals)
    np.testing.assert_array_equal(many.steps, one.steps)
    # iteration counts that are not multiples of k: rows really stop inside a run
    assert len(set((one.iterations % 4).tolist())) > 1 or max_iter % 4


def test_rows_with_their_own_tolerances_and_caps_stop_where_each_would_alone(
    engine: Engine, digits: np.ndarray, shipped_model: Path
) -> None:
    """The graph itself, against step.onnx one row at a time, with a padding row (max_iter 0)."""
    n = 64
    z = engine.encode(digits[:n])
    tol = np.array([10.0 ** -(1 + i % 6) for i in range(n)], np.float32)
    caps = np.where(np.arange(n) % 5 == 0, 3, 40).astype(np.int32)
    caps[-1] = 0  # padding: never moves
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    steps = ort.InferenceSession(str(shipped_model / "steps.onnx"), options, providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(str(shipped_model / "step.onnx"), options, providers=["CPUExecutionProvider"])
    u = np.zeros_like(z)
    iterations = np.zeros(n, np.int32)
    limit = caps.copy()
    for _ in range(10):  # ten runs of four applications: every row has stopped
        u, r, _s, iterations = steps.run(
            None, {"u": u, "z": z, "tol": tol, "max_iter": limit, "iterations": iterations}
        )
        # the graph takes every row it is given as active: a row that met its tol is capped at its count
        limit = np.where(r <= tol, iterations, limit).astype(np.int32)
    for i in range(n):
        alone, count = np.zeros_like(z[i : i + 1]), 0
        while count < caps[i]:
            alone, res, _ = step.run(None, {"u": alone, "z": z[i : i + 1]})
            count += 1
            if res[0] <= tol[i]:
                break
        assert iterations[i] == count, i
        np.testing.assert_array_equal(u[i : i + 1], alone)
    assert iterations[-1] == 0 and not u[-1].any()


def test_host_decided_stops_take_one_step_per_run() -> None:
    active = ActiveSet(8, (4,))
    active.admit(2, 1e-3, 50)
    assert active.multistep
    certified = active.admit(1, 1e-3, 50, certify=True)
    assert not active.multistep
    active.abandon(certified)
    ones = np.ones(3, np.float32)
    current = lambda m: np.zeros((int(m.sum()), 4), np.float32)  # noqa: E731
    active.advance(ones, ones, current, lambda m, s: (np.zeros(int(m.sum()), int), np.zeros(int(m.sum()), bool)))
    assert active.multistep  # it left: the rest may run several steps per call again
    active.admit(1, 1e-3, 50, deadline=1e18)
    assert not active.multistep


def test_the_shared_batch_through_steps_answers_as_alone(engine: Engine, digits: np.ndarray) -> None:
    """Many callers at mixed tolerances in the shared batch (the chooser held there): each gets the
    iterations and logits its input gets alone, and the batch ran several applications per run."""
    tols = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6]
    scheduler = Scheduler(engine, max_active=64)
    scheduler.policy.chooser = _Held()
    runs = []
    real = scheduler._runner.steps

    def counted(*limits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        runs.append(len(limits[0]))
        return real(*limits)

    scheduler._runner.steps = counted  # type: ignore[method-assign]
    scheduler.start()
    results: dict[int, object] = {}
    try:

        def caller(c: int) -> None:
            for i in range(c, 96, 16):
                results[i] = scheduler.submit(digits[i : i + 1], tol=tols[i % 6]).result(30)

        threads = [threading.Thread(target=caller, args=(c,)) for c in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        scheduler.stop()
    assert len(results) == 96
    for i, got in results.items():
        alone = engine.classify(digits[i : i + 1], tol=tols[i % 6])
        assert got.iterations.tolist() == alone.iterations.tolist(), i  # type: ignore[attr-defined]
        np.testing.assert_array_equal(got.logits, alone.logits)  # type: ignore[attr-defined]
    assert runs and max(runs) > 1  # batches of several rows ran four applications per call


class _Held(policy.ModeChooser):
    """A chooser that keeps the shared batch."""

    def answered(self, count: int, load: int, now: float) -> None:
        self.mode = policy.SHARED
