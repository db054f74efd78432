"""Tiny hand-built model folders (onnx.helper), for behaviour that a trained model cannot show."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save(graph: onnx.GraphProto, path: Path) -> str:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tensor(name: str, *dims: int | str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *dims])


def linear_model(folder: Path, scale: float, *, latent: int = 4, gamma: float | None = None) -> Path:
    """A model with input [1, 2, 2], z = flatten(x), T(u, z) = scale * u + z, S(u) = u @ W.

    With ``scale`` >= 1 T is not a contraction and the iteration diverges.
    """
    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.eye(latent, 3, dtype=np.float32), "W")
    a = numpy_helper.from_array(np.array(scale, np.float32), "a")
    eps = numpy_helper.from_array(np.array(1e-6, np.float32), "eps")
    shape = numpy_helper.from_array(np.array([-1, latent], np.int64), "shape")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    sha = {}
    sha["Q"] = _save(
        helper.make_graph(
            [helper.make_node("Reshape", ["x", "shape"], ["z"])],
            "Q",
            [_tensor("x", 1, 2, 2)],
            [_tensor("z", latent)],
            [shape],
        ),
        folder / "Q.onnx",
    )
    t_nodes = [helper.make_node("Mul", ["u", "a"], ["au"]), helper.make_node("Add", ["au", "z"], ["u_next"])]
    sha["T"] = _save(
        helper.make_graph(t_nodes, "T", [_tensor("u", latent), _tensor("z", latent)], [_tensor("u_next", latent)], [a]),
        folder / "T.onnx",
    )
    step_nodes = [
        *t_nodes,
        helper.make_node("Sub", ["u_next", "u"], ["d"]),
        helper.make_node("ReduceL2", ["d", "axes"], ["step_norm"], keepdims=0),
        helper.make_node("ReduceL2", ["u_next", "axes"], ["nn"], keepdims=0),
        helper.make_node("Add", ["nn", "eps"], ["den"]),
        helper.make_node("Div", ["step_norm", "den"], ["residual"]),
    ]
    sha["step"] = _save(
        helper.make_graph(
            step_nodes,
            "step",
            [_tensor("u", latent), _tensor("z", latent)],
            [_tensor("u_next", latent), _tensor("residual"), _tensor("step_norm")],
            [a, eps, axes],
        ),
        folder / "step.onnx",
    )
    sha["S"] = _save(
        helper.make_graph(
            [helper.make_node("MatMul", ["u", "W"], ["logits"])],
            "S",
            [_tensor("u", latent)],
            [_tensor("logits", 3)],
            [w],
        ),
        folder / "S.onnx",
    )
    manifest = {
        "format": "fpn-onnx/1",
        "name": folder.name,
        "graphs": {role: {"file": f"{role}.onnx", "sha256": digest} for role, digest in sha.items()},
        "input": {"shape": [1, 2, 2], "dtype": "float32", "layout": "NCHW", "scale": 1.0, "mean": [0.0], "std": [1.0]},
        "latent_shape": [latent],
        "labels": ["a", "b", "c"],
        "contraction": {"gamma": gamma if gamma is not None else abs(scale), "method": "by construction"},
        "solver": {"tol": 1e-4, "max_iter": 50},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder
