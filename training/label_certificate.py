"""The manifest's label certificate, read off the exported S graph.

When S is affine (``logits = u W^T + b``: one Gemm, or a MatMul with an optional Add of a
constant), a logit difference ``l_i - l_j`` moves by at most ``||W_i - W_j||_2`` per unit of
``||u - u'||_2``. That table, computed in float64 from the graph's own weights and rounded up, is
what ``fpn_serve`` needs to certify labels (``fpn_serve.runtime.certificate``). For any other S
no table is written, and the model's labels are never certified.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

METHOD = (
    "S is affine (logits = u W^T + b): pair_lipschitz[i][j] = ||W_i - W_j||_2 of S.onnx's weight, "
    "in float64, rounded up"
)


def _weight(s: onnx.ModelProto) -> np.ndarray | None:
    """W [classes, latent] of an affine S graph, or None for any other graph."""
    consts = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in s.graph.initializer}
    nodes = [n for n in s.graph.node if n.op_type not in ("Identity", "Flatten")]
    if len(s.graph.input) != 1 or not nodes or len(nodes) > 2:
        return None
    first = nodes[0]
    if first.op_type == "Gemm" and len(nodes) == 1:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in first.attribute}
        w = consts.get(first.input[1])
        if w is None or attrs.get("transA", 0) or w.ndim != 2:
            return None
        w = w * float(attrs.get("alpha", 1.0))
        return w if attrs.get("transB", 0) else w.T
    if first.op_type == "MatMul" and first.input[1] in consts:
        if len(nodes) == 2 and not (nodes[1].op_type == "Add" and any(i in consts for i in nodes[1].input)):
            return None
        w = consts[first.input[1]]
        return w.T if w.ndim == 2 else None
    return None


def label_certificate(s: onnx.ModelProto) -> dict[str, Any] | None:
    """The manifest's ``certificate`` object for S, or None where S is not affine."""
    w = _weight(s)
    if w is None:
        return None
    pair = np.linalg.norm(w[:, None, :] - w[None, :, :], axis=2)
    up = np.nextafter(pair, np.inf)  # a float64 rounding above the exact norm
    table = [[0.0 if i == j else float(up[i, j]) for j in range(len(up))] for i in range(len(up))]
    return {"method": METHOD, "pair_lipschitz": table}
