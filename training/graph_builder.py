"""One builder for the graphs composed from the exported Q, T and S (step.onnx, FPN.onnx, FPN1.onnx).

Every composition does the same around its own nodes: copy the source graphs' nodes and
initializers under a prefix (so that names of Q, T and S cannot collide), add a few shared
constants, declare its inputs and outputs, and assemble a model whose opsets and IR version cover
every source, checked by the full ONNX checker. ``GraphBuilder`` holds that; a composition only
says which nodes go where.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fpn_serve.contract import RESIDUAL_EPS

Shape = Sequence[int | str]

# name -> value of the constants the compositions share (the residual's axes depend on the latent)
EPS = "loop/eps"
AXES = "loop/axes"
ZERO = "loop/zero"
TRUE = "loop/true"


def prefixed(
    graph: onnx.GraphProto, prefix: str, keep: dict[str, str]
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The graph's nodes and initializers with every name prefixed, except those in ``keep`` (renamed)."""

    def rename(name: str) -> str:
        if not name:
            return name
        return keep.get(name, prefix + name)

    nodes = []
    for i, node in enumerate(graph.node):
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.name = f"{prefix}{i}/{node.name or node.op_type}"  # unique even where names were empty
        del new.input[:]
        new.input.extend(rename(i) for i in node.input)
        del new.output[:]
        new.output.extend(rename(o) for o in node.output)
        nodes.append(new)
    inits = []
    for init in graph.initializer:
        t = onnx.TensorProto()
        t.CopyFrom(init)
        t.name = rename(init.name)
        inits.append(t)
    return nodes, inits


def latent_dims(t: onnx.ModelProto) -> list[int]:
    """The latent's dimensions after the batch axis, read from T's first input ``u``."""
    return [d.dim_value for d in t.graph.input[0].type.tensor_type.shape.dim[1:]]


def value(name: str, dtype: int, shape: Shape) -> onnx.ValueInfoProto:
    """A tensor value info: ``dtype`` (a TensorProto type) of ``shape`` (ints, or names of dynamic axes)."""
    return helper.make_tensor_value_info(name, dtype, list(shape))


def typed(name: str, value_type: onnx.TypeProto) -> onnx.ValueInfoProto:
    """A value info named ``name`` of the type of a source graph's input or output."""
    return helper.make_value_info(name, value_type)


def batch_one(value_type: onnx.TypeProto) -> onnx.TypeProto:
    """``value_type`` with its leading (batch) dimension fixed at 1."""
    fixed = onnx.TypeProto()
    fixed.CopyFrom(value_type)
    dim = fixed.tensor_type.shape.dim[0]
    dim.ClearField("dim_param")
    dim.dim_value = 1
    return fixed


def residual_nodes(u_next: str, u: str, prefix: str, residual: str, step: str) -> list[onnx.NodeProto]:
    """Per-sample step ||u_next - u|| and residual step / (||u_next|| + eps) (see fpn_serve.contract)."""
    return [
        helper.make_node("Sub", [u_next, u], [prefix + "d"], name=prefix + "sub"),
        helper.make_node("ReduceL2", [prefix + "d", AXES], [step], keepdims=0, name=prefix + "step"),
        helper.make_node("ReduceL2", [u_next, AXES], [prefix + "norm"], keepdims=0, name=prefix + "norm"),
        helper.make_node("Add", [prefix + "norm", EPS], [prefix + "den"], name=prefix + "den"),
        helper.make_node("Div", [step, prefix + "den"], [residual], name=prefix + "res"),
    ]


class GraphBuilder:
    """Collects the initializers of one composed graph and assembles it from the source models.

    ``copy`` adds a source graph's nodes under a prefix and keeps its initializers; ``constant``
    and ``shared`` add the composition's own; ``build`` makes the model. Initializers keep the
    order in which they were added, so a composition writes the same graph on every run.
    """

    def __init__(self, *sources: onnx.ModelProto) -> None:
        self.sources = sources
        self.initializers: list[onnx.TensorProto] = []

    def copy(self, source: onnx.ModelProto, prefix: str, keep: dict[str, str]) -> list[onnx.NodeProto]:
        """``source``'s nodes, every name prefixed except those in ``keep`` (renamed); its initializers kept."""
        nodes, inits = prefixed(source.graph, prefix, keep)
        self.initializers.extend(inits)
        return nodes

    def constant(self, name: str, array: np.ndarray) -> None:
        self.initializers.append(numpy_helper.from_array(array, name))

    def shared(self, *names: str, latent_rank: int) -> None:
        """Add the named shared constants (AXES, ZERO, EPS, TRUE), in the order given."""
        arrays: dict[str, np.ndarray] = {
            AXES: np.arange(1, 1 + latent_rank, dtype=np.int64),
            ZERO: np.array([0], np.int64),
            EPS: np.array(RESIDUAL_EPS, np.float32),
            TRUE: np.array(True),
        }
        for name in names:
            self.constant(name, arrays[name])

    def build(
        self,
        name: str,
        nodes: list[onnx.NodeProto],
        inputs: list[onnx.ValueInfoProto],
        outputs: list[onnx.ValueInfoProto],
    ) -> onnx.ModelProto:
        """The checked model: opsets of every source (e.g. com.microsoft after quantization), their
        highest IR version."""
        graph = helper.make_graph(nodes, name, inputs, outputs, self.initializers)
        opsets = {o.domain: o for g in self.sources for o in g.opset_import}
        model = helper.make_model(graph, opset_imports=list(opsets.values()), producer_name="fpn-export")
        model.ir_version = max(g.ir_version for g in self.sources)
        onnx.checker.check_model(model, full_check=True)
        return model
