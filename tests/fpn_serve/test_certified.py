"""Certified labels, the certified stop, traces and warm starts on the shipped model and real MNIST."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from fpn_serve import Engine, InputError
from fpn_serve.batching.scheduler import Scheduler
from fpn_serve.runtime.certificate import LabelCertifier

from .synthetic import linear_model


@pytest.fixture(scope="module")
def engine(shipped_model: Path) -> Engine:
    return Engine.load(shipped_model, device="cpu")


@pytest.fixture(scope="module")
def test_set(mnist_root: Path) -> tuple[np.ndarray, np.ndarray]:
    from training.data import load_split

    test = load_split("mnist", mnist_root, train=False)
    return test.normalise(test.images).numpy(), test.labels.numpy()


@pytest.fixture(scope="module")
def exact(engine: Engine, test_set: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The labels at tol=1e-10 of all 10,000 test digits (as near the exact fixed point as float32 gets)."""
    x, _ = test_set
    return np.concatenate(
        [engine.classify(x[i : i + 500], tol=1e-10, max_iter=1000).labels for i in range(0, len(x), 500)]
    )


def test_every_certified_label_is_the_exact_label(
    engine: Engine, test_set: tuple[np.ndarray, np.ndarray], exact: np.ndarray
) -> None:
    x, _ = test_set
    for tol in (1e-1, 1e-2, 1e-3, 1e-4):
        result = engine.classify(x, tol=tol)
        certified = result.certified
        np.testing.assert_array_equal(result.labels[certified], exact[certified])
        if tol == 1e-1:
            assert not certified.all()  # a loose tolerance leaves labels uncertified
        else:
            assert certified.any()


def test_the_certified_stop_is_exact_and_cheaper_than_tol_1e4(
    engine: Engine, test_set: tuple[np.ndarray, np.ndarray], exact: np.ndarray
) -> None:
    x, y = test_set
    stopped = [engine.classify(x[i : i + 1000], stop="certified") for i in range(0, len(x), 1000)]
    labels = np.concatenate([r.labels for r in stopped])
    certified = np.concatenate([r.certified for r in stopped])
    iterations = np.concatenate([r.iterations for r in stopped])
    reference = np.concatenate([engine.classify(x[i : i + 1000], tol=1e-4).iterations for i in range(0, len(x), 1000)])
    assert certified.mean() > 0.99  # the rest ran to max_iter uncertified
    np.testing.assert_array_equal(labels[certified], exact[certified])
    assert (labels == y).mean() == (exact == y).mean()  # the exact network's accuracy
    assert iterations.mean() <= 0.8 * reference.mean()  # at least 20 % fewer iterations than tol=1e-4


def test_the_certified_stop_stops_at_the_first_certified_iteration(
    engine: Engine, test_set: tuple[np.ndarray, np.ndarray]
) -> None:
    x = test_set[0][:64]
    stopped = engine.classify(x, stop="certified", trace=True)
    assert stopped.trace is not None
    for i, k in enumerate(stopped.iterations.tolist()):
        flags = stopped.trace.certified[i, :k]
        assert flags[-1] == bool(stopped.certified[i])
        assert not flags[:-1].any()  # not certified before the stop
    # the same answers from the shared batch and from the Anderson solver's active set
    scheduler = Scheduler(engine, max_active=64)
    scheduler.start()
    try:
        futures = [scheduler.submit(x[i : i + 2], stop="certified") for i in range(0, 64, 2)]
        got = np.concatenate([f.result(30).iterations for f in futures])
    finally:
        scheduler.stop()
    np.testing.assert_array_equal(got, stopped.iterations)
    anderson = engine.classify(x, stop="certified", solver="anderson")
    assert anderson.certified.mean() > 0.9


def test_a_trace_records_every_iteration(engine: Engine, test_set: tuple[np.ndarray, np.ndarray]) -> None:
    x = test_set[0][:8]
    traced = engine.classify(x, tol=1e-4, trace=True)
    plain = engine.classify(x, tol=1e-4)
    np.testing.assert_array_equal(traced.iterations, plain.iterations)  # tracing changes no answer
    np.testing.assert_array_equal(traced.labels, plain.labels)
    assert traced.trace is not None
    for k in (1, 2, 4):
        at_k = engine.classify(x, tol=0.0, max_iter=k)  # stopped after exactly k iterations
        for i in range(len(x)):
            if k <= traced.iterations[i]:
                assert traced.trace.residuals[i, k - 1] == at_k.residuals[i]
                assert traced.trace.labels[i, k - 1] == at_k.labels[i]
                assert traced.trace.certified[i, k - 1] == at_k.certified[i]
    for i, k in enumerate(traced.iterations.tolist()):
        assert traced.trace.residuals[i, k - 1] == traced.residuals[i]
        assert np.isnan(traced.trace.residuals[i, k:]).all()


def test_a_warm_start_changes_only_the_iterations(engine: Engine, test_set: tuple[np.ndarray, np.ndarray]) -> None:
    x = test_set[0][:32]
    cold = engine.classify(x, tol=1e-6, trace=True)  # the step loop keeps the final iterates
    assert cold.latents is not None
    warm = engine.classify(x, tol=1e-6, u0=cold.latents)
    np.testing.assert_array_equal(warm.labels, cold.labels)
    assert (warm.iterations <= 2).all() and cold.iterations.min() > 5
    shifted = engine.classify(np.roll(x, 1, axis=3), tol=1e-6, u0=cold.latents)  # the next frame of a stream
    fresh = engine.classify(np.roll(x, 1, axis=3), tol=1e-6)
    np.testing.assert_array_equal(shifted.labels, fresh.labels)
    assert shifted.iterations.mean() < fresh.iterations.mean()
    with pytest.raises(InputError, match=r"u0 must be a float array of shape \[32, 46\]"):
        engine.classify(x, u0=cold.latents[:3])


def test_a_model_without_a_certificate_never_certifies(tmp_path: Path) -> None:
    bare = Engine.load(linear_model(tmp_path / "m", scale=0.5, gamma=0.5), device="cpu")
    result = bare.classify(np.ones((2, 1, 2, 2), np.float32), tol=1e-6)
    assert not result.certified.any()
    with pytest.raises(InputError, match="stop=certified needs a model whose manifest certifies labels"):
        bare.classify(np.ones((2, 1, 2, 2), np.float32), stop="certified")


def test_the_certifier_is_exact_about_its_bound(engine: Engine) -> None:
    certifier = LabelCertifier(engine.manifest)
    pair = np.asarray(engine.manifest.certificate.pair_lipschitz)  # type: ignore[union-attr]
    logits = np.zeros((1, 10), np.float32)
    logits[0, 3] = 1.0  # top 3, every other logit 0: gap 1
    # the largest step whose bound still fits under the gap, by the stated formula
    need = (1.0 - 1e-4 * (1 + 1.0) - 1e-4 * 1.0) / (pair[3].max() * certifier.factor * (1 + 1e-3))
    assert certifier.certified(logits, np.array([need * 0.999], np.float32))[0]
    assert not certifier.certified(logits, np.array([need * 1.001], np.float32))[0]
    assert not certifier.certified(logits, np.array([np.inf], np.float32))[0]
    assert not certifier.certified(np.full((1, 10), np.nan, np.float32), np.zeros(1, np.float32))[0]
    many = certifier.certified(np.repeat(logits, 3, axis=0), np.array([need * 0.999, need * 1.001, 0.0], np.float32))
    assert many.tolist() == [True, False, True]


def test_scheduler_requests_keep_their_own_warm_starts_and_traces(
    engine: Engine, test_set: tuple[np.ndarray, np.ndarray]
) -> None:
    x = test_set[0][:16]
    cold = engine.classify(x, tol=1e-6, trace=True)
    scheduler = Scheduler(engine, max_active=32)
    scheduler.start()

    async def main() -> list[object]:
        calls = []
        for i in range(16):
            if i % 3 == 0:
                calls.append(scheduler.submit_async(engine.prepare(x[i : i + 1], 1e-6, u0=cold.latents[i : i + 1])))  # type: ignore[index]
            elif i % 3 == 1:
                calls.append(scheduler.submit_async(engine.prepare(x[i : i + 1], 1e-6, trace=True)))
            else:
                calls.append(scheduler.submit_async(x[i : i + 1], 1e-6))
        return list(await asyncio.gather(*calls))

    try:
        results = asyncio.run(main())
    finally:
        scheduler.stop()
    for i, got in enumerate(results):
        alone = engine.classify(
            x[i : i + 1],
            1e-6,
            u0=cold.latents[i : i + 1] if i % 3 == 0 else None,
            trace=i % 3 == 1,  # type: ignore[index]
        )
        np.testing.assert_array_equal(got.iterations, alone.iterations)  # type: ignore[attr-defined]
        np.testing.assert_array_equal(got.labels, alone.labels)  # type: ignore[attr-defined]
        if i % 3 == 1:
            np.testing.assert_array_equal(got.trace.residuals, alone.trace.residuals)  # type: ignore[attr-defined, union-attr]
        else:
            assert got.trace is None  # type: ignore[attr-defined]
