from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from fpn_serve import ClassifyResult, Engine, InputError, ModelError


@pytest.fixture(scope="module")
def engine(shipped_model: Path) -> Engine:
    return Engine.load(shipped_model, device="cpu")


@pytest.fixture(scope="module")
def digits(mnist_root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The first 2,000 real MNIST test images, normalised by the manifest, and their labels."""
    from training.data import load_split

    test = load_split("mnist", mnist_root, train=False, limit=2000)
    return test.normalise(test.images).numpy(), test.labels.numpy()


def test_shipped_model_is_accurate_on_real_digits(engine: Engine, digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    result = engine.classify(x)
    assert (result.labels == y).mean() >= 0.99
    assert result.converged.mean() >= 0.99
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert result.names[int(result.labels[0])] == str(y[0])


def test_each_sample_gets_exactly_its_solo_iterations(engine: Engine, digits: tuple[np.ndarray, np.ndarray]) -> None:
    x = digits[0][:64]
    batch = engine.classify(x, tol=1e-6, max_iter=200)
    assert len(set(batch.iterations.tolist())) > 1  # the batch really mixes easy and hard inputs
    for i in range(0, 64, 7):
        solo = engine.classify(x[i : i + 1], tol=1e-6, max_iter=200)
        assert int(solo.iterations[0]) == int(batch.iterations[i])
        np.testing.assert_array_equal(solo.logits[0], batch.logits[i])


def test_looser_tolerance_never_costs_more_iterations(engine: Engine, digits: tuple[np.ndarray, np.ndarray]) -> None:
    x = digits[0][:500]
    loose, tight = engine.classify(x, tol=1e-1), engine.classify(x, tol=1e-6)
    assert bool((loose.iterations <= tight.iterations).all())
    assert loose.iterations.mean() < tight.iterations.mean()
    assert bool((tight.residuals[tight.converged] <= 1e-6).all())


def test_iteration_cap_is_honoured(engine: Engine, digits: tuple[np.ndarray, np.ndarray]) -> None:
    result = engine.classify(digits[0][:32], tol=1e-9, max_iter=3)
    assert result.iterations.tolist() == [3] * 32
    assert not result.converged.any()
    fixed = engine.classify_fixed(digits[0][:4], 5)
    assert fixed.iterations.tolist() == [5] * 4


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.zeros((2, 28, 28), np.float32), r"shape \[2, 28, 28\]; expected \[batch, 1, 28, 28\]"),
        (np.zeros((0, 1, 28, 28), np.float32), "batch >= 1"),
        (np.zeros((1, 1, 28, 28), np.int64), "floating point"),
        (np.full((1, 1, 28, 28), np.nan, np.float32), "NaN or infinite"),
        ([[0.0]], "must be a numpy array"),
    ],
)
def test_bad_inputs_are_refused_with_what_is_allowed(engine: Engine, x: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        engine.classify(x)


@pytest.mark.parametrize(
    ("tol", "max_iter"), [(-1e-3, None), (2.0, None), (float("nan"), None), (None, 0), (None, 10**6)]
)
def test_bad_parameters_are_refused(engine: Engine, tol: float | None, max_iter: int | None) -> None:
    with pytest.raises(InputError, match="tol must be|max_iter must be"):
        engine.classify(np.zeros((1, 1, 28, 28), np.float32), tol=tol, max_iter=max_iter)


def test_single_graph_loop_matches_the_three_graph_loop(engine: Engine, digits: tuple[np.ndarray, np.ndarray]) -> None:
    x = digits[0][:256]
    assert "fpn" in engine.manifest.graphs  # the shipped model carries fpn.onnx
    for tol in (1e-1, 1e-4, 1e-6):
        single = engine.classify(x, tol=tol, max_iter=100)  # one ONNX Runtime call (Loop)
        three = engine.decode(engine.solve(engine.encode(x), tol, 100), tol)  # Python loop over T
        np.testing.assert_array_equal(single.iterations, three.iterations)
        np.testing.assert_allclose(single.logits, three.logits, rtol=0, atol=1e-5)
        np.testing.assert_allclose(single.error_bounds, three.error_bounds, rtol=1e-4, atol=1e-7)


def test_one_input_runs_fpn1_and_answers_as_the_three_graph_loop_to_the_bit(
    engine: Engine, digits: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "fpn1" in engine.manifest.graphs  # the shipped model carries FPN1.onnx
    session = engine._single.session  # type: ignore[union-attr]
    calls = []
    run = session.run_with_iobinding
    monkeypatch.setattr(session, "run_with_iobinding", lambda *a: calls.append(1) or run(*a))
    x = digits[0][:48]
    for tol, max_iter in [(1e-1, 100), (1e-4, 100), (1e-6, 100), (1e-9, 3), (0.0, 5)]:
        for i in range(0, len(x), 3):
            one = x[i : i + 1]
            single = engine.classify(one, tol=tol, max_iter=max_iter)
            three = engine.decode(engine.solve(engine.encode(one), tol, max_iter), tol)
            for field in ("labels", "iterations", "residuals", "converged", "error_bounds", "logits", "probabilities"):
                np.testing.assert_array_equal(getattr(single, field), getattr(three, field), err_msg=field)
    assert len(calls) == 5 * 16  # every call above went through FPN1.onnx
    assert single.iterations.tolist() == [5] and not single.converged[0]  # tol=0: max_iter decides


def test_concurrent_callers_of_fpn1_each_get_their_own_answer(
    engine: Engine, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x = digits[0][:64]
    tols = [10.0 ** -(1 + i % 6) for i in range(len(x))]
    alone = [engine.classify(x[i : i + 1], tol=tols[i]) for i in range(len(x))]
    got: list[list[tuple[int, ClassifyResult]]] = [[] for _ in range(8)]

    def caller(c: int) -> None:  # each thread binds its own buffers; they must never mix
        for _ in range(5):
            for i in range(c, len(x), 8):
                got[c].append((i, engine.classify(x[i : i + 1], tol=tols[i])))

    threads = [threading.Thread(target=caller, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(len(g) for g in got) == 5 * len(x)
    for answers in got:
        for i, result in answers:
            np.testing.assert_array_equal(result.logits, alone[i].logits)
            np.testing.assert_array_equal(result.iterations, alone[i].iterations)
            np.testing.assert_array_equal(result.residuals, alone[i].residuals)


def test_a_folder_without_fpn1_loads_and_answers_the_same(
    engine: Engine, digits: tuple[np.ndarray, np.ndarray], shipped_model: Path, tmp_path: Path
) -> None:
    older = tmp_path / "mnist"
    shutil.copytree(shipped_model, older)
    manifest = json.loads((older / "manifest.json").read_text())
    del manifest["graphs"]["fpn1"]
    (older / "manifest.json").write_text(json.dumps(manifest))
    (older / "FPN1.onnx").unlink()
    without = Engine.load(older, device="cpu")
    for i in range(8):
        one = digits[0][i : i + 1]
        a, b = without.classify(one, tol=1e-4), engine.classify(one, tol=1e-4)
        np.testing.assert_array_equal(a.logits, b.logits)
        np.testing.assert_array_equal(a.iterations, b.iterations)
        np.testing.assert_array_equal(a.error_bounds, b.error_bounds)


def test_an_fpn1_graph_with_the_wrong_signature_is_refused(shipped_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    shutil.copytree(shipped_model, folder)
    shutil.copyfile(folder / "step.onnx", folder / "FPN1.onnx")  # a valid graph, but not a loop over one input
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["graphs"]["fpn1"]["sha256"] = hashlib.sha256((folder / "FPN1.onnx").read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=r"graph fpn1 has inputs \['u', 'z'\]"):
        Engine.load(folder, device="cpu")


def test_probabilities_are_computed_when_first_read(engine: Engine, digits: tuple[np.ndarray, np.ndarray]) -> None:
    x = digits[0][:5]
    result = engine.classify(x, tol=1e-3)
    assert "_probabilities" not in vars(result) or vars(result)["_probabilities"] is None  # no softmax yet
    probabilities = result.probabilities
    assert probabilities is result.probabilities and probabilities.dtype == np.float32
    expected = np.exp(result.logits.astype(np.float64) - result.logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probabilities, expected / expected.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-9)
    for i in range(len(x)):  # one input alone (FPN1.onnx) gives the very numbers of the batch (FPN.onnx)
        np.testing.assert_array_equal(engine.classify(x[i : i + 1], tol=1e-3).probabilities, probabilities[i : i + 1])
