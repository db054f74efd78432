"""Graphs composed from the exported Q, T and S at the ONNX level, for any precision.

``build_step_model``: step.onnx, T with the per-sample residual fused in.
``build_steps_model``: steps.onnx, ``k`` applications of T in one run, each row frozen at its own stop.
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

Each composition names its own nodes and inputs; copying Q, T and S under prefixes, the shared
constants and assembling the checked model are ``training.graph_builder.GraphBuilder``'s.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph_builder import (
    AXES,
    EPS,
    TRUE,
    ZERO,
    GraphBuilder,
    batch_one,
    latent_dims,
    prefixed,
    residual_nodes,
    typed,
    value,
)

F32, I32, I64, BOOL = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64, TensorProto.BOOL

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


class _Fused:
    """Q, T and S copied into one builder for a fused loop: Q's nodes (x -> z), T's z-only nodes
    (run once before the loop, float32 T only), T's loop body (b_u -> b_un), S's nodes (u_final -> logits)."""

    def __init__(self, q: onnx.ModelProto, t: onnx.ModelProto, s: onnx.ModelProto) -> None:
        if any(n.op_type in ("Loop", "If", "Scan") for g in (q, t, s) for n in g.graph.node):
            raise ValueError("the graphs must not contain control flow of their own")
        self.builder = GraphBuilder(q, t, s)
        self.latent = latent_dims(t)
        self.x_type, self.logits_type = q.graph.input[0].type, s.graph.output[0].type
        self.q_nodes = self.builder.copy(q, "q/", {"x": "x", "z": "z"})
        t_nodes = self.builder.copy(t, "t/", {"u": "b_u", "z": "z", "u_next": "b_un"})
        self.s_nodes = self.builder.copy(s, "s/", {"u": "u_final", "logits": "logits"})
        self.t_once, self.t_body = _split_invariant(t_nodes, {"b_u"}) if _hoistable(t) else ([], t_nodes)

    def outer(self, loop: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
        """The outer graph's nodes: Q, T's z-only nodes, ``loop`` (the loop and what reads its outputs), S."""
        return [*self.q_nodes, *self.t_once, *loop, *self.s_nodes]


def build_step_model(t: onnx.ModelProto) -> onnx.ModelProto:
    """step.onnx: T followed by the per-sample residual, (u, z) -> (u_next, residual, step_norm)."""
    builder = GraphBuilder(t)
    t_nodes = builder.copy(t, "t/", {"u": "u", "z": "z", "u_next": "u_next"})
    builder.shared(AXES, EPS, latent_rank=len(latent_dims(t)))
    return builder.build(
        "step",
        [*t_nodes, *residual_nodes("u_next", "u", "r/", "residual", "step_norm")],
        [typed("u", t.graph.input[0].type), typed("z", t.graph.input[1].type)],
        [
            typed("u_next", t.graph.output[0].type),
            value("residual", F32, ["batch"]),
            value("step_norm", F32, ["batch"]),
        ],
    )


STEPS_K = 4  # applications of T per steps.onnx run: the shared batch's host work and syncs, divided by 4


def steps_exact(t: onnx.ModelProto) -> bool:
    """Whether k applications of T in one graph give what k runs of step.onnx give, to the bit: for
    float32 T. In fp16 ONNX Runtime drops casts between the applications inside one graph, so the
    iterates round differently, and an fp16 folder has no steps.onnx."""
    return _hoistable(t)


def _masked_application(j: int, *, last: bool) -> list[onnx.NodeProto]:
    """steps.onnx's nodes after the j-th copy of T (``s{j}/u`` -> ``s{j}/v``): the residual, the
    move of active rows only, their counts, and which rows stay active (the last one writes the
    graph's outputs)."""
    a, b = f"s{j}/", f"s{j + 1}/"
    u_out, r_out, s_out, it_out = (
        ("u_next", "residual", "step_norm", "iterations_next") if last else (b + "u", b + "r", b + "s", b + "it")
    )
    nodes = [
        *residual_nodes(a + "v", a + "u", a, a + "res", a + "step"),
        helper.make_node("Unsqueeze", [a + "act", AXES], [a + "act_u"], name=a + "act_u"),
        helper.make_node("Where", [a + "act_u", a + "v", a + "u"], [u_out], name=a + "u_out"),
        helper.make_node("Cast", [a + "act"], [a + "act_i"], to=I32, name=a + "act_i"),
        helper.make_node("Add", [a + "it", a + "act_i"], [it_out], name=a + "it_out"),
    ]
    if j:  # rows inactive from the start (padding) keep their first-step figures, which nobody reads
        nodes += [
            helper.make_node("Where", [a + "act", a + "res", a + "r"], [r_out], name=a + "r_out"),
            helper.make_node("Where", [a + "act", a + "step", a + "s"], [s_out], name=a + "s_out"),
        ]
    else:
        nodes += [
            helper.make_node("Identity", [a + "res"], [r_out], name=a + "r_out"),
            helper.make_node("Identity", [a + "step"], [s_out], name=a + "s_out"),
        ]
    if not last:  # still active: moved now, not within tol (NaN is not), below its cap
        nodes += [
            helper.make_node("LessOrEqual", [a + "res", "tol"], [a + "met"], name=a + "met"),
            helper.make_node("Not", [a + "met"], [a + "unmet"], name=a + "unmet"),
            helper.make_node("Less", [it_out, "max_iter"], [a + "below"], name=a + "below"),
            helper.make_node("And", [a + "act", a + "unmet"], [a + "go"], name=a + "go"),
            helper.make_node("And", [a + "go", a + "below"], [b + "act"], name=b + "act"),
        ]
    return nodes


def build_steps_model(t: onnx.ModelProto, k: int = STEPS_K) -> onnx.ModelProto:
    """steps.onnx: ``k`` masked applications of T, unrolled, with each row's stopping rule inside.

    Inputs ``u``, ``z`` [batch, *latent], ``tol`` (float32 [batch]), ``max_iter`` and ``iterations``
    (int32 [batch]: each row's cap and the applications it has had). A row given is active while
    its count is below its cap and, after each application, while its residual is not <= its tol
    (the active set's rule, NaN included; a row that has stopped is left out, or capped at its
    count); an application moves only active rows, so a row that stops
    at the j-th application leaves with that iterate, residual, step and count, exactly as in a
    loop of one step per run. Outputs ``u_next``, ``residual``, ``step_norm`` (float32 [batch]) and
    ``iterations_next``. A row with ``max_iter`` 0 never moves (padding). T's weights are stored once;
    the model's metadata ``fpn.steps`` says ``k``.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    if not steps_exact(t):
        raise ValueError("steps.onnx needs a float32 T (see steps_exact)")
    builder = GraphBuilder(t)
    latent = latent_dims(t)
    first = builder.copy(t, "t0/", {"u": "s0/u", "z": "z", "u_next": "s0/v"})
    once, body = _split_invariant(first, {"s0/u"})
    shared = {init.name: "t0/" + init.name for init in t.graph.initializer}
    shared |= {o.removeprefix("t0/"): o for node in once for o in node.output}
    nodes: list[onnx.NodeProto] = [
        *once,
        helper.make_node("Identity", ["u"], ["s0/u"], name="s0/u"),
        helper.make_node("Identity", ["iterations"], ["s0/it"], name="s0/it"),
        helper.make_node("Less", ["iterations", "max_iter"], ["s0/act"], name="s0/act"),
    ]
    for j in range(k):
        a = f"s{j}/"
        if j:
            copied, _ = prefixed(t.graph, f"t{j}/", shared | {"u": a + "u", "z": "z", "u_next": a + "v"})
            body = _split_invariant(copied, {a + "u"})[1]
        nodes += [*body, *_masked_application(j, last=j == k - 1)]
    builder.shared(AXES, EPS, latent_rank=len(latent))
    batch = ["batch"]
    model = builder.build(
        "steps",
        nodes,
        [
            typed("u", t.graph.input[0].type),
            typed("z", t.graph.input[1].type),
            value("tol", F32, batch),
            value("max_iter", I32, batch),
            value("iterations", I32, batch),
        ],
        [
            typed("u_next", t.graph.output[0].type),
            value("residual", F32, batch),
            value("step_norm", F32, batch),
            value("iterations_next", I32, batch),
        ],
    )
    helper.set_model_props(model, {"fpn.steps": str(k)})  # how many applications one run makes
    return model


def _batch_body(t_body: list[onnx.NodeProto], latent: list[int]) -> onnx.GraphProto:
    """FPN.onnx's loop body: T, the residual, and per-sample freezing of the carried state."""
    nodes = [
        *t_body,
        *residual_nodes("b_un", "b_u", "body/", "b_res", "b_step"),
        helper.make_node("Unsqueeze", ["b_active", AXES], ["b_act_u"], name="body/act_u"),
        helper.make_node("Where", ["b_act_u", "b_un", "b_u"], ["b_u_out"], name="body/u"),
        helper.make_node("Where", ["b_active", "b_res", "b_r"], ["b_r_out"], name="body/r"),
        helper.make_node("Where", ["b_active", "b_step", "b_s"], ["b_s_out"], name="body/s"),
        helper.make_node("Cast", ["b_active"], ["b_act_i"], to=I64, name="body/act_i"),
        helper.make_node("Add", ["b_it", "b_act_i"], ["b_it_out"], name="body/iters"),
        # a frozen sample keeps a residual <= tol, so the carried residual says who is still active
        helper.make_node("Greater", ["b_r_out", "tol"], ["b_active_out"], name="body/active"),
        helper.make_node("ReduceMax", ["b_r_out"], ["b_r_max"], keepdims=0, name="body/r_max"),
        helper.make_node("Greater", ["b_r_max", "tol"], ["b_cond_out"], name="body/cond"),
    ]
    carried: list[tuple[str, int, list[int | str]]] = [
        ("u", F32, ["batch", *latent]),
        ("r", F32, ["batch"]),
        ("s", F32, ["batch"]),
        ("it", I64, ["batch"]),
        ("active", BOOL, ["batch"]),
    ]
    return helper.make_graph(
        nodes,
        "fixed_point_body",
        [value("b_k", I64, []), value("b_cond", BOOL, []), *(value(f"b_{n}", d, sh) for n, d, sh in carried)],
        [value("b_cond_out", BOOL, []), *(value(f"b_{n}_out", d, sh) for n, d, sh in carried)],
    )


def _filled(name: str, shape: str, dtype: int, fill: float | int | bool) -> onnx.NodeProto:
    """``name`` = a tensor of the shape held in ``shape``, every element ``fill``."""
    return helper.make_node(
        "ConstantOfShape", [shape], [name], value=helper.make_tensor("v", dtype, [1], [fill]), name=name
    )


def build_loop_model(q: onnx.ModelProto, t: onnx.ModelProto, s: onnx.ModelProto) -> onnx.ModelProto:
    """Compose the three exported graphs into one model with an ONNX Loop (see the module doc)."""
    fused = _Fused(q, t, s)
    loop = [
        helper.make_node("Shape", ["z"], ["loop/zshape"], name="loop/zshape"),
        helper.make_node("Gather", ["loop/zshape", ZERO], ["loop/batch"], axis=0, name="loop/batch"),
        _filled("loop/u0", "loop/zshape", F32, 0.0),
        _filled("loop/inf", "loop/batch", F32, np.inf),
        _filled("loop/it0", "loop/batch", I64, 0),
        _filled("loop/act0", "loop/batch", BOOL, 1),
        helper.make_node(
            "Loop",
            ["max_iter", TRUE, "loop/u0", "loop/inf", "loop/inf", "loop/it0", "loop/act0"],
            ["u_final", "residual", "step_norm", "iterations", "loop/active"],
            body=_batch_body(fused.t_body, fused.latent),
            name="loop/fixed_point",
        ),
    ]
    fused.builder.shared(AXES, ZERO, EPS, TRUE, latent_rank=len(fused.latent))
    return fused.builder.build(
        "fpn",
        fused.outer(loop),
        [typed("x", fused.x_type), value("tol", F32, []), value("max_iter", I64, [])],
        [
            typed("logits", fused.logits_type),
            value("iterations", I64, ["batch"]),
            value("residual", F32, ["batch"]),
            value("step_norm", F32, ["batch"]),
        ],
    )


def build_single_loop_model(q: onnx.ModelProto, t: onnx.ModelProto, s: onnx.ModelProto) -> onnx.ModelProto:
    """FPN1.onnx: Q, the fixed-point Loop for one input, and S (see the module doc).

    Same inputs and outputs as FPN.onnx with the batch axis fixed at 1; ``max_iter`` must be >= 1.
    """
    fused = _Fused(q, t, s)
    latent = fused.latent
    body = helper.make_graph(
        [
            *fused.t_body,
            *residual_nodes("b_un", "b_u", "body/", "b_res", "b_step"),
            helper.make_node("Greater", ["b_res", "tol"], ["b_cond_out"], name="body/cond"),  # go on while > tol
        ],
        "fixed_point_body_1",
        [value("b_k", I64, []), value("b_cond", BOOL, []), value("b_u", F32, [1, *latent])],
        # carried: the iterate; scanned: the residual and step of every iteration
        [
            value("b_cond_out", BOOL, [1]),
            value("b_un", F32, [1, *latent]),
            value("b_res", F32, [1]),
            value("b_step", F32, [1]),
        ],
    )
    loop = [
        helper.make_node(
            "Loop",
            ["max_iter", TRUE, "loop/u0"],
            ["u_final", "loop/residuals", "loop/steps"],
            body=body,
            name="loop/fixed_point",
        ),
        helper.make_node("Shape", ["loop/residuals"], ["iterations"], start=0, end=1, name="loop/iterations"),
        helper.make_node("Gather", ["loop/residuals", "loop/last"], ["residual"], axis=0, name="loop/residual"),
        helper.make_node("Gather", ["loop/steps", "loop/last"], ["step_norm"], axis=0, name="loop/step"),
    ]
    fused.builder.shared(AXES, EPS, TRUE, latent_rank=len(latent))
    fused.builder.constant("loop/u0", np.zeros([1, *latent], np.float32))
    fused.builder.constant("loop/last", np.array(-1, np.int64))
    return fused.builder.build(
        "fpn1",
        fused.outer(loop),
        [typed("x", batch_one(fused.x_type)), value("tol", F32, []), value("max_iter", I64, [])],
        [
            typed("logits", batch_one(fused.logits_type)),
            value("iterations", I64, [1]),
            value("residual", F32, [1]),
            value("step_norm", F32, [1]),
        ],
    )


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
            return str(attr.s.decode())
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
