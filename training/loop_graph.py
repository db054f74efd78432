"""Graphs composed from the exported Q, T and S at the ONNX level, for any precision.

``build_step_model``: step.onnx, T with the per-sample residual fused in.
``build_loop_model``: FPN.onnx, Q, the whole fixed-point iteration (an ONNX Loop) and S in one graph.
``build_single_loop_model``: FPN1.onnx, the same for exactly one input, with a lean loop body.

Inputs ``x`` [batch, *input_shape], ``tol`` (float scalar) and ``max_iter`` (int64 scalar);
outputs ``logits``, ``iterations`` (int64 [batch]), ``residual`` and ``step_norm`` (float [batch]).
The loop body is the exported T graph itself (less its nodes that depend on z alone, which run
once before the loop), followed by the per-sample residual; a sample whose
residual is <= tol is frozen (its iterate, residual and iteration count stop changing) and the
loop ends when every sample is frozen or after max_iter iterations. That is exactly the
per-sample contract of the three-graph loop, in one ONNX Runtime call for runtimes (and batch
sizes) that prefer it.

With one input there is nothing to freeze: the loop simply stops when the residual is <= tol, so
FPN1.onnx's body is T, the residual and one comparison (no Where, ReduceMax or counter, and nothing
carried but the iterate); the iteration count and the last residual come from the loop's scan
outputs. Its batch axis is fixed at 1. Every node of Q, T, S and the residual is the same as in
the three-graph loop, so its answers are the same to the bit.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fpn_serve.contract import RESIDUAL_EPS


def _prefixed(
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


_FLOAT_OPS = {"MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Neg", "Relu", "LeakyRelu", "Tanh", "Sigmoid"}
_FLOAT_OPS |= {"Transpose", "Reshape", "Identity", "Constant"}


def _hoistable(t: onnx.ModelProto) -> bool:
    """Whether T is plain float32 arithmetic, where a term computed once before the loop is the same
    to the bit as the same term inside step.onnx. Not in fp16 or int8 graphs: there ONNX Runtime
    casts to float32 and back, and the casts it can drop inside one graph remain at a loop boundary."""
    fp32 = all(i.type.tensor_type.elem_type == TensorProto.FLOAT for i in t.graph.input)
    return fp32 and all(node.op_type in _FLOAT_OPS for node in t.graph.node)


def _split_invariant(
    nodes: list[onnx.NodeProto], varying: set[str]
) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
    """Split T's nodes (in order) into those that depend on no loop-varying value, computed once before
    the loop, and the rest, the loop body. With T = ReLU(u W' + z W), z W is computed once."""
    varying = set(varying)
    hoisted, body = [], []
    for node in nodes:
        if any(name in varying for name in node.input):
            body.append(node)
            varying.update(node.output)
        else:
            hoisted.append(node)
    return hoisted, body


def _residual_nodes(u_next: str, u: str, prefix: str, residual: str, step: str) -> list[onnx.NodeProto]:
    """Per-sample step ||u_next - u|| and residual step / (||u_next|| + eps) (see fpn_serve.runtime.solvers)."""
    return [
        helper.make_node("Sub", [u_next, u], [prefix + "d"], name=prefix + "sub"),
        helper.make_node("ReduceL2", [prefix + "d", "loop/axes"], [step], keepdims=0, name=prefix + "step"),
        helper.make_node("ReduceL2", [u_next, "loop/axes"], [prefix + "norm"], keepdims=0, name=prefix + "norm"),
        helper.make_node("Add", [prefix + "norm", "loop/eps"], [prefix + "den"], name=prefix + "den"),
        helper.make_node("Div", [step, prefix + "den"], [residual], name=prefix + "res"),
    ]


def _constants(latent_rank: int) -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array(np.arange(1, 1 + latent_rank, dtype=np.int64), "loop/axes"),
        numpy_helper.from_array(np.array([0], np.int64), "loop/zero"),
        numpy_helper.from_array(np.array(RESIDUAL_EPS, np.float32), "loop/eps"),
        numpy_helper.from_array(np.array(True), "loop/true"),
    ]


def build_step_model(t: onnx.ModelProto) -> onnx.ModelProto:
    """step.onnx: T followed by the per-sample residual, (u, z) -> (u_next, residual, step_norm)."""
    latent = [d.dim_value for d in t.graph.input[0].type.tensor_type.shape.dim[1:]]
    t_nodes, t_inits = _prefixed(t.graph, "t/", {"u": "u", "z": "z", "u_next": "u_next"})
    f32 = TensorProto.FLOAT
    consts = _constants(len(latent))
    graph = helper.make_graph(
        [*t_nodes, *_residual_nodes("u_next", "u", "r/", "residual", "step_norm")],
        "step",
        [helper.make_value_info("u", t.graph.input[0].type), helper.make_value_info("z", t.graph.input[1].type)],
        [
            helper.make_value_info("u_next", t.graph.output[0].type),
            helper.make_tensor_value_info("residual", f32, ["batch"]),
            helper.make_tensor_value_info("step_norm", f32, ["batch"]),
        ],
        [*t_inits, consts[0], consts[2]],
    )
    model = helper.make_model(graph, opset_imports=list(t.opset_import), producer_name="fpn-export")
    model.ir_version = t.ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def build_loop_model(q: onnx.ModelProto, t: onnx.ModelProto, s: onnx.ModelProto) -> onnx.ModelProto:
    """Compose the three exported graphs into one model with an ONNX Loop (see the module doc)."""
    if any(n.op_type in ("Loop", "If", "Scan") for g in (q, t, s) for n in g.graph.node):
        raise ValueError("the graphs must not contain control flow of their own")
    latent = [d.dim_value for d in t.graph.input[0].type.tensor_type.shape.dim[1:]]
    axes = list(range(1, 1 + len(latent)))
    f32, i64, b = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL

    q_nodes, q_inits = _prefixed(q.graph, "q/", {"x": "x", "z": "z"})
    t_nodes, t_inits = _prefixed(t.graph, "t/", {"u": "b_u", "z": "z", "u_next": "b_un"})
    s_nodes, s_inits = _prefixed(s.graph, "s/", {"u": "u_final", "logits": "logits"})
    t_once, t_nodes = _split_invariant(t_nodes, {"b_u"}) if _hoistable(t) else ([], t_nodes)

    def vi(name: str, dtype: int, shape: list[int | str]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, dtype, shape)

    body_nodes = [
        *t_nodes,
        *_residual_nodes("b_un", "b_u", "body/", "b_res", "b_step"),
        helper.make_node("Unsqueeze", ["b_active", "loop/axes"], ["b_act_u"], name="body/act_u"),
        helper.make_node("Where", ["b_act_u", "b_un", "b_u"], ["b_u_out"], name="body/u"),
        helper.make_node("Where", ["b_active", "b_res", "b_r"], ["b_r_out"], name="body/r"),
        helper.make_node("Where", ["b_active", "b_step", "b_s"], ["b_s_out"], name="body/s"),
        helper.make_node("Cast", ["b_active"], ["b_act_i"], to=i64, name="body/act_i"),
        helper.make_node("Add", ["b_it", "b_act_i"], ["b_it_out"], name="body/iters"),
        # a frozen sample keeps a residual <= tol, so the carried residual says who is still active
        helper.make_node("Greater", ["b_r_out", "tol"], ["b_active_out"], name="body/active"),
        helper.make_node("ReduceMax", ["b_r_out"], ["b_r_max"], keepdims=0, name="body/r_max"),
        helper.make_node("Greater", ["b_r_max", "tol"], ["b_cond_out"], name="body/cond"),
    ]
    body = helper.make_graph(
        body_nodes,
        "fixed_point_body",
        [
            vi("b_k", i64, []),
            vi("b_cond", b, []),
            vi("b_u", f32, ["batch", *latent]),
            vi("b_r", f32, ["batch"]),
            vi("b_s", f32, ["batch"]),
            vi("b_it", i64, ["batch"]),
            vi("b_active", b, ["batch"]),
        ],
        [
            vi("b_cond_out", b, []),
            vi("b_u_out", f32, ["batch", *latent]),
            vi("b_r_out", f32, ["batch"]),
            vi("b_s_out", f32, ["batch"]),
            vi("b_it_out", i64, ["batch"]),
            vi("b_active_out", b, ["batch"]),
        ],
    )
    outer_nodes = [
        *q_nodes,
        *t_once,
        helper.make_node("Shape", ["z"], ["loop/zshape"], name="loop/zshape"),
        helper.make_node("Gather", ["loop/zshape", "loop/zero"], ["loop/batch"], axis=0, name="loop/batch"),
        helper.make_node(
            "ConstantOfShape",
            ["loop/zshape"],
            ["loop/u0"],
            value=helper.make_tensor("v", f32, [1], [0.0]),
            name="loop/u0",
        ),
        helper.make_node(
            "ConstantOfShape",
            ["loop/batch"],
            ["loop/inf"],
            value=helper.make_tensor("v", f32, [1], [np.inf]),
            name="loop/inf",
        ),
        helper.make_node(
            "ConstantOfShape",
            ["loop/batch"],
            ["loop/it0"],
            value=helper.make_tensor("v", i64, [1], [0]),
            name="loop/it0",
        ),
        helper.make_node(
            "ConstantOfShape",
            ["loop/batch"],
            ["loop/act0"],
            value=helper.make_tensor("v", b, [1], [1]),
            name="loop/act0",
        ),
        helper.make_node(
            "Loop",
            ["max_iter", "loop/true", "loop/u0", "loop/inf", "loop/inf", "loop/it0", "loop/act0"],
            ["u_final", "residual", "step_norm", "iterations", "loop/active"],
            body=body,
            name="loop/fixed_point",
        ),
        *s_nodes,
    ]
    constants = _constants(len(axes))
    x_type = q.graph.input[0].type
    logits_type = s.graph.output[0].type
    graph = helper.make_graph(
        outer_nodes,
        "fpn",
        [
            helper.make_value_info("x", x_type),
            vi("tol", f32, []),
            vi("max_iter", i64, []),
        ],
        [
            helper.make_value_info("logits", logits_type),
            vi("iterations", i64, ["batch"]),
            vi("residual", f32, ["batch"]),
            vi("step_norm", f32, ["batch"]),
        ],
        [*q_inits, *t_inits, *s_inits, *constants],
    )
    opsets = {o.domain: o for g in (q, t, s) for o in g.opset_import}  # e.g. com.microsoft after quantization
    model = helper.make_model(graph, opset_imports=list(opsets.values()), producer_name="fpn-export")
    model.ir_version = max(q.ir_version, t.ir_version, s.ir_version)
    onnx.checker.check_model(model, full_check=True)
    return model


def _batch_one(value_type: onnx.TypeProto) -> onnx.TypeProto:
    """``value_type`` with its leading (batch) dimension fixed at 1."""
    fixed = onnx.TypeProto()
    fixed.CopyFrom(value_type)
    dim = fixed.tensor_type.shape.dim[0]
    dim.ClearField("dim_param")
    dim.dim_value = 1
    return fixed


def build_single_loop_model(q: onnx.ModelProto, t: onnx.ModelProto, s: onnx.ModelProto) -> onnx.ModelProto:
    """FPN1.onnx: Q, the fixed-point Loop for one input, and S (see the module doc).

    Same inputs and outputs as FPN.onnx with the batch axis fixed at 1; ``max_iter`` must be >= 1.
    """
    if any(n.op_type in ("Loop", "If", "Scan") for g in (q, t, s) for n in g.graph.node):
        raise ValueError("the graphs must not contain control flow of their own")
    latent = [d.dim_value for d in t.graph.input[0].type.tensor_type.shape.dim[1:]]
    f32, i64, b = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL

    q_nodes, q_inits = _prefixed(q.graph, "q/", {"x": "x", "z": "z"})
    t_nodes, t_inits = _prefixed(t.graph, "t/", {"u": "b_u", "z": "z", "u_next": "b_un"})
    s_nodes, s_inits = _prefixed(s.graph, "s/", {"u": "u_final", "logits": "logits"})
    t_once, t_nodes = _split_invariant(t_nodes, {"b_u"}) if _hoistable(t) else ([], t_nodes)

    def vi(name: str, dtype: int, shape: list[int]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, dtype, shape)

    body = helper.make_graph(
        [
            *t_nodes,
            *_residual_nodes("b_un", "b_u", "body/", "b_res", "b_step"),
            helper.make_node("Greater", ["b_res", "tol"], ["b_cond_out"], name="body/cond"),  # go on while > tol
        ],
        "fixed_point_body_1",
        [vi("b_k", i64, []), vi("b_cond", b, []), vi("b_u", f32, [1, *latent])],
        # carried: the iterate; scanned: the residual and step of every iteration
        [vi("b_cond_out", b, [1]), vi("b_un", f32, [1, *latent]), vi("b_res", f32, [1]), vi("b_step", f32, [1])],
    )
    outer_nodes = [
        *q_nodes,
        *t_once,
        helper.make_node(
            "Loop",
            ["max_iter", "loop/true", "loop/u0"],
            ["u_final", "loop/residuals", "loop/steps"],
            body=body,
            name="loop/fixed_point",
        ),
        helper.make_node("Shape", ["loop/residuals"], ["iterations"], start=0, end=1, name="loop/iterations"),
        helper.make_node("Gather", ["loop/residuals", "loop/last"], ["residual"], axis=0, name="loop/residual"),
        helper.make_node("Gather", ["loop/steps", "loop/last"], ["step_norm"], axis=0, name="loop/step"),
        *s_nodes,
    ]
    axes, _, eps, true = _constants(len(latent))
    constants = [
        axes,
        eps,
        true,
        numpy_helper.from_array(np.zeros([1, *latent], np.float32), "loop/u0"),
        numpy_helper.from_array(np.array(-1, np.int64), "loop/last"),
    ]
    graph = helper.make_graph(
        outer_nodes,
        "fpn1",
        [helper.make_value_info("x", _batch_one(q.graph.input[0].type)), vi("tol", f32, []), vi("max_iter", i64, [])],
        [
            helper.make_value_info("logits", _batch_one(s.graph.output[0].type)),
            vi("iterations", i64, [1]),
            vi("residual", f32, [1]),
            vi("step_norm", f32, [1]),
        ],
        [*q_inits, *t_inits, *s_inits, *constants],
    )
    opsets = {o.domain: o for g in (q, t, s) for o in g.opset_import}
    model = helper.make_model(graph, opset_imports=list(opsets.values()), producer_name="fpn-export")
    model.ir_version = max(q.ir_version, t.ir_version, s.ir_version)
    onnx.checker.check_model(model, full_check=True)
    return model


_ELEMENTWISE = {"Relu", "LeakyRelu", "Elu", "Selu", "Sigmoid", "Tanh", "HardSigmoid", "Softplus", "Gelu", "Identity"}


def _ints(node: onnx.NodeProto, name: str, default: list[int]) -> list[int]:
    for attr in node.attribute:
        if attr.name == name:
            return list(attr.ints)
    return default


def _int(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _string(node: onnx.NodeProto, name: str, default: str) -> str:
    for attr in node.attribute:
        if attr.name == name:
            return attr.s.decode()
    return default


def crop_unread_input(q: onnx.ModelProto) -> onnx.ModelProto:
    """Q with its input cropped to the rows and columns that reach its output.

    A floor-mode pooling whose windows do not tile its input never reads the last rows or columns;
    through the unpadded stride-1 convolutions and elementwise activations before it, neither are
    some of the input's (MNIST's 28 x 28 through two 3 x 3 convolutions and 2 x 2 poolings reads
    26 x 26). One Slice on the input then spares every layer that work. Each remaining output is
    computed from the same numbers in the same order, so the answers are the same to the bit.
    Graphs of any other form come back unchanged.
    """
    graph = q.graph
    if len(graph.input) != 1:
        return q
    dims = graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not all(d.HasField("dim_value") for d in dims[2:]):
        return q
    height, width = dims[2].dim_value, dims[3].dim_value
    inits = {i.name: i for i in graph.initializer}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    chain: list[tuple[int, int, int, int]] = []  # per spatial layer: kernel h, kernel w, stride h, stride w
    current, h, w = graph.input[0].name, height, width
    while len(users.get(current, [])) == 1 and current not in {o.name for o in graph.output}:
        node = users[current][0]
        if node.input[0] != current:
            break
        auto_pad = _string(node, "auto_pad", "NOTSET")
        if node.op_type == "Conv":
            if node.input[1] not in inits or auto_pad not in ("NOTSET", "VALID"):
                break
            kh, kw = list(inits[node.input[1]].dims[2:4])
            if _ints(node, "strides", [1, 1]) != [1, 1] or any(_ints(node, "pads", [0] * 4)):
                break
            if _ints(node, "dilations", [1, 1]) != [1, 1]:
                break
            chain.append((kh, kw, 1, 1))
            h, w = h - kh + 1, w - kw + 1
        elif node.op_type == "MaxPool" and len(node.output) == 1:
            kh, kw = _ints(node, "kernel_shape", [])
            sh, sw = _ints(node, "strides", [1, 1])
            if auto_pad not in ("NOTSET", "VALID") or any(_ints(node, "pads", [0] * 4)):
                break
            if _int(node, "ceil_mode", 0) != 0 or _ints(node, "dilations", [1, 1]) != [1, 1]:
                break
            chain.append((kh, kw, sh, sw))
            h, w = (h - kh) // sh + 1, (w - kw) // sw + 1
        elif node.op_type not in _ELEMENTWISE:
            break
        current = node.output[0]
    need_h, need_w = h, w  # every row and column of the last tensor of the chain is read
    for kh, kw, sh, sw in reversed(chain):
        need_h, need_w = (need_h - 1) * sh + kh, (need_w - 1) * sw + kw
    if (need_h, need_w) == (height, width) or not chain:
        return q
    cropped = onnx.ModelProto()
    cropped.CopyFrom(q)
    g = cropped.graph
    x = g.input[0].name
    g.initializer.extend(
        [
            numpy_helper.from_array(np.array([0, 0], np.int64), "crop/starts"),
            numpy_helper.from_array(np.array([need_h, need_w], np.int64), "crop/ends"),
            numpy_helper.from_array(np.array([2, 3], np.int64), "crop/axes"),
        ]
    )
    for node in g.node:
        node.input[:] = ["crop/x" if name == x else name for name in node.input]
    g.node.insert(0, helper.make_node("Slice", [x, "crop/starts", "crop/ends", "crop/axes"], ["crop/x"], name="crop"))
    del g.value_info[:]  # the intermediate shapes changed; ONNX Runtime infers them again
    onnx.checker.check_model(cropped, full_check=True)
    return cropped
