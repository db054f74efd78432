"""int8-static: the rewrite that keeps Q's Relus, the quantized Q against fp32, and the shipped
models/mnist-int8 (accuracy on all test digits, the unchanged T and S, its ORT-format graphs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fpn_serve import Engine, load_manifest
from training.precision import calibration_sample, float_stem, quantize_q_static, relu_before_pool

REPO = Path(__file__).resolve().parents[2]
FP32, INT8 = REPO / "models" / "mnist", REPO / "models" / "mnist-int8"


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    out: np.ndarray = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["z"], {"x": x}
    )[0]
    return out


@pytest.fixture(scope="module")
def digits(mnist_root: Path) -> tuple[np.ndarray, np.ndarray]:
    from training.data import load_split

    train = load_split("mnist", mnist_root, train=True)
    test = load_split("mnist", mnist_root, train=False, limit=1000)
    return calibration_sample(train.normalise(train.images).numpy(), 512), test.normalise(test.images).numpy()


def test_relu_moves_before_the_pool_and_q_is_the_same_to_the_bit() -> None:
    q = onnx.load(str(FP32 / "Q.onnx"))
    stem = float_stem(q)
    assert [n.op_type for n in q.graph.node if n.name in stem] == ["Conv", "MaxPool", "Relu"]
    moved = relu_before_pool(q, set(stem))
    ops = [n.op_type for n in moved.graph.node]
    assert ops[ops.index("Conv", 2) : ops.index("Conv", 2) + 3] == ["Conv", "Relu", "MaxPool"]
    x = np.random.default_rng(0).standard_normal((32, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(_run(moved, x), _run(q, x))


def test_static_q_is_close_to_fp32_and_runs_int8_kernels(digits: tuple[np.ndarray, np.ndarray]) -> None:
    calibration, x = digits
    q = onnx.load(str(FP32 / "Q.onnx"))
    quantized = quantize_q_static(q, calibration)
    ops = {n.op_type for n in quantized.graph.node}
    assert {"QLinearConv", "QGemm"} <= ops
    z, ref = _run(quantized, x), _run(q, x)
    assert np.linalg.norm(z - ref) / np.linalg.norm(ref) < 0.03
    assert (z >= 0).all()  # Q ends in a Relu: its quantized form must keep it


@pytest.mark.slow
def test_the_shipped_int8_model_is_within_a_tenth_of_a_point_on_every_test_digit(mnist_root: Path) -> None:
    from training.data import load_split

    test = load_split("mnist", mnist_root, train=False)
    x, y = test.normalise(test.images).numpy(), test.labels.numpy()
    assert len(y) == 10_000
    fp32, int8 = Engine.load(FP32, device="cpu"), Engine.load(INT8, device="cpu")
    assert int8.manifest.precision_name == "int8-static"
    a32 = float((fp32.classify(x).labels == y).mean())
    a8 = float((int8.classify(x).labels == y).mean())
    assert abs(a8 - a32) <= 0.001 + 1e-12, (a8, a32)
    assert int8.manifest.precision["accuracy"] == pytest.approx(a8)
    # T and S unchanged: the certified stop still certifies, at the labels of the tol stop
    certified = int8.classify(x[:500], stop="certified")
    assert certified.certified.mean() > 0.95
    assert (certified.labels == int8.classify(x[:500]).labels).mean() > 0.99


def test_int8_keeps_t_s_the_contraction_and_the_certificate() -> None:
    src, dst = (json.loads((d / "manifest.json").read_text()) for d in (FP32, INT8))
    assert dst["contraction"] == src["contraction"] and dst["certificate"] == src["certificate"]
    assert dst["solver"] == src["solver"]
    load_manifest(INT8)  # sha256 of every graph
    for role in ("T", "S"):
        a, b = (onnx.load(str(d / f"{role}.onnx")).graph for d in (FP32, INT8))
        assert [n.SerializeToString() for n in a.node] == [n.SerializeToString() for n in b.node]
        assert [i.SerializeToString() for i in a.initializer] == [i.SerializeToString() for i in b.initializer]


def test_the_ort_format_graphs_load_and_answer_as_the_onnx_ones() -> None:
    from training.ort_format import OPERATORS_FILE, sample_feeds

    manifest = json.loads((INT8 / "manifest.json").read_text())
    ops = (INT8 / OPERATORS_FILE).read_text()
    assert "QLinearConv" in ops and "Loop" in ops
    for ref in manifest["graphs"].values():
        onnx_path = INT8 / ref["file"]
        ort_path = onnx_path.with_suffix(".ort")
        reference = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        converted = ort.InferenceSession(str(ort_path), providers=["CPUExecutionProvider"])
        feeds = sample_feeds(reference, 3)
        for a, b in zip(reference.run(None, feeds), converted.run(None, feeds), strict=True):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
