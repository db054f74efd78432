"""The export pipeline's parts that need no training: the staging folder and the graph builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fpn_serve.contract import RESIDUAL_EPS
from training.export import ExportError, scratch_folder, staging_folder
from training.graph_builder import GraphBuilder, value
from training.loop_graph import build_loop_model, build_step_model


def test_a_staged_folder_replaces_the_output_only_when_the_block_finishes(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def failing_export() -> None:
        with staging_folder(out) as staging:
            (staging / "manifest.json").write_text("{}")
            raise ValueError("a check failed")

    with pytest.raises(ValueError, match="a check failed"):
        failing_export()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the staging folder is gone
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # and the old model untouched
    with staging_folder(out) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".model.")
        (staging / "manifest.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert [p.name for p in out.iterdir()] == ["manifest.json"]


def test_a_scratch_folder_is_removed_whatever_happens(tmp_path: Path) -> None:
    with scratch_folder(tmp_path / "m", "fp32.") as scratch:
        assert scratch.is_dir() and scratch.name.startswith(".m.fp32.")
    with pytest.raises(KeyError), scratch_folder(tmp_path / "m") as scratch:
        raise KeyError("x")
    assert list(tmp_path.iterdir()) == []
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(ExportError, match="cannot write into"), scratch_folder(blocked / "m"):
        pass


def _linear_t(w: np.ndarray) -> onnx.ModelProto:
    """T(u, z) = relu(u W + z), batch dynamic."""
    n = w.shape[0]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["u", "W"], ["uw"]),
            helper.make_node("Add", ["uw", "z"], ["pre"]),
            helper.make_node("Relu", ["pre"], ["u_next"]),
        ],
        "T",
        [value("u", TensorProto.FLOAT, ["batch", n]), value("z", TensorProto.FLOAT, ["batch", n])],
        [value("u_next", TensorProto.FLOAT, ["batch", n])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # as torch.onnx writes at opset 18
    return model


def test_the_step_graph_is_t_and_the_contracts_residual() -> None:
    rng = np.random.default_rng(0)
    w = (0.3 * rng.standard_normal((5, 5))).astype(np.float32)
    u, z = rng.standard_normal((2, 3, 5)).astype(np.float32)
    step = build_step_model(_linear_t(w))
    assert {i.name for i in step.graph.initializer} == {"t/W", "loop/axes", "loop/eps"}
    session = ort.InferenceSession(step.SerializeToString(), providers=["CPUExecutionProvider"])
    u_next, residual, step_norm = session.run(None, {"u": u, "z": z})
    want = np.maximum(u @ w + z, 0)
    np.testing.assert_allclose(u_next, want, rtol=1e-6)
    norm = np.linalg.norm(want - u, axis=1)
    np.testing.assert_allclose(step_norm, norm, rtol=1e-5)
    np.testing.assert_allclose(residual, norm / (np.linalg.norm(want, axis=1) + RESIDUAL_EPS), rtol=1e-5)


def test_the_builder_keeps_names_apart_and_covers_every_sources_opsets() -> None:
    t = _linear_t(np.eye(4, dtype=np.float32))
    other = _linear_t(np.eye(4, dtype=np.float32))
    other.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    other.ir_version = t.ir_version + 1
    builder = GraphBuilder(t, other)
    first = builder.copy(t, "a/", {"u": "u", "z": "z", "u_next": "v"})
    second = builder.copy(other, "b/", {"u": "v", "z": "z", "u_next": "out"})
    assert [n.name for n in first] == ["a/0/MatMul", "a/1/Add", "a/2/Relu"]
    assert first[0].input[:] == ["u", "a/W"] and second[0].input[:] == ["v", "b/W"]
    model = builder.build(
        "two",
        [*first, *second],
        [value("u", TensorProto.FLOAT, ["batch", 4]), value("z", TensorProto.FLOAT, ["batch", 4])],
        [value("out", TensorProto.FLOAT, ["batch", 4])],
    )
    assert [i.name for i in model.graph.initializer] == ["a/W", "b/W"]
    assert {o.domain for o in model.opset_import} == {"", "com.microsoft"}
    assert model.ir_version == other.ir_version


def test_a_fused_loop_refuses_graphs_with_control_flow_of_their_own() -> None:
    t = _linear_t(np.eye(2, dtype=np.float32))
    looped = onnx.ModelProto()
    looped.CopyFrom(t)
    looped.graph.node.append(helper.make_node("Loop", ["m", "c"], ["o"], body=helper.make_graph([], "b", [], [])))
    with pytest.raises(ValueError, match="control flow"):
        build_loop_model(t, looped, t)
