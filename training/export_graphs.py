"""The graphs of an exported model: Q, T and S from torch, then step.onnx, FPN.onnx and FPN1.onnx
composed from them (``training.loop_graph``), each stripped of what varies between runs, stamped
with its provenance and checked by the full ONNX checker.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from fpn_serve import __version__
from fpn_serve.contract import FORMAT

from .fpn import FPN
from .loop_graph import (
    build_loop_model,
    build_single_loop_model,
    build_step_model,
    build_steps_model,
    crop_unread_input,
    steps_exact,
)
from .precision import convert as convert_precision

GRAPH_FILES = {"fpn": "FPN.onnx", "fpn1": "FPN1.onnx"}  # other roles: ROLE.onnx
KEPT_METADATA = ("fpn.steps",)  # metadata a composition writes that the runtime reads


def graph_file(role: str) -> str:
    """The file name of the graph of ``role`` in a model folder."""
    return GRAPH_FILES.get(role, f"{role}.onnx")


class ExportError(RuntimeError):
    """The export cannot be completed; nothing was written."""


class _QGraph(nn.Module):
    def __init__(self, model: FPN) -> None:
        super().__init__()
        self.q = model.Q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z: torch.Tensor = self.q(x)
        return z


class _TGraph(nn.Module):
    """T with its spectrally normalised weights frozen into constants."""

    def __init__(self, model: FPN) -> None:
        super().__init__()
        self.t = model.T
        with torch.no_grad():
            weights = model.T.weights()
        self.count = len(weights)
        for i, w in enumerate(weights):
            self.register_buffer(f"w{i}", w.detach().clone())

    def forward(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        weights = tuple(getattr(self, f"w{i}") for i in range(self.count))
        return self.t.apply_for_export(weights, u, z)


class _SGraph(nn.Module):
    def __init__(self, model: FPN) -> None:
        super().__init__()
        self.s = model.S

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.s(u)
        return logits


def export_graph(
    module: nn.Module, args: tuple[torch.Tensor, ...], names: list[str], output: str, path: Path, opset: int
) -> None:
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    dynamic = {name: {0: batch} for name in names}
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module.eval(),
                args,
                str(path),
                input_names=names,
                output_names=[output],
                dynamic_shapes=dynamic,
                opset_version=opset,
                dynamo=True,
                external_data=False,
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx cannot export {path.stem} at opset {opset}: {str(exc).splitlines()[0]}") from exc


def strip_graph(graph: onnx.GraphProto) -> None:
    """Remove doc strings and node metadata (the exporter's stack traces, with this machine's file
    paths) from a graph and every subgraph inside it, such as a Loop body."""
    graph.doc_string = ""
    for node in graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
        for attr in node.attribute:
            if attr.HasField("g"):
                strip_graph(attr.g)
            for sub in attr.graphs:
                strip_graph(sub)


def finish_graph(path: Path, name: str, role: str, opset: int) -> None:
    """Strip what varies between runs, stamp provenance metadata, and run the full ONNX checker."""
    model = onnx.load(str(path))
    model.doc_string = ""
    strip_graph(model.graph)
    kept = {p.key: p.value for p in model.metadata_props if p.key in KEPT_METADATA}
    del model.metadata_props[:]
    meta = {"fpn.model": name, "fpn.role": role, "fpn.format": FORMAT, "fpn.opset": str(opset), **kept}
    onnx.helper.set_model_props(model, meta)
    model.producer_name, model.producer_version = "fpn-export", __version__
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def write_graphs(
    model: FPN,
    input_shape: tuple[int, ...],
    folder: Path,
    name: str,
    opset: int,
    precision: str,
    loop: bool,
    calibration: np.ndarray | None = None,
) -> list[str]:
    """Write Q, T, S (in ``precision``), step.onnx, steps.onnx (float32 T) and, with ``loop``, FPN.onnx
    and FPN1.onnx; return the roles. ``calibration``: normalised training inputs, for ``int8-static``."""
    latent = model.config.latent_dim
    x = torch.zeros(2, *input_shape)
    u = torch.zeros(2, latent)
    export_graph(_QGraph(model), (x,), ["x"], "z", folder / "Q.onnx", opset)
    onnx.save(crop_unread_input(onnx.load(str(folder / "Q.onnx"))), str(folder / "Q.onnx"))
    export_graph(_TGraph(model), (u, u.clone()), ["u", "z"], "u_next", folder / "T.onnx", opset)
    export_graph(_SGraph(model), (u,), ["u"], "logits", folder / "S.onnx", opset)
    convert_precision(folder, precision, calibration)
    q, t, s = (onnx.load(str(folder / f"{r}.onnx")) for r in ("Q", "T", "S"))
    onnx.save(build_step_model(t), str(folder / "step.onnx"))
    roles = ["Q", "T", "S", "step"]
    if steps_exact(t):
        onnx.save(build_steps_model(t), str(folder / "steps.onnx"))
        roles.append("steps")
    if loop:
        onnx.save(build_loop_model(q, t, s), str(folder / graph_file("fpn")))
        onnx.save(build_single_loop_model(q, t, s), str(folder / graph_file("fpn1")))
        roles += ["fpn", "fpn1"]
    for role in roles:
        finish_graph(folder / graph_file(role), name, role, opset)
    return roles
