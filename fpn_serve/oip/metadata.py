"""Server and model metadata of the Open Inference Protocol (the same documents on every protocol)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .. import __version__
from ..runtime.engine import Engine
from .tensors import OUTPUTS, output_datatype, output_shape
from .validate import INPUT_DATATYPE, INPUT_NAME, input_shape

SERVER_NAME = "fpn-serve"
PLATFORM = "onnxruntime_fixed_point"


def server_metadata(extensions: Iterable[str]) -> dict[str, Any]:
    """``{"name", "version", "extensions"}``; each protocol lists the extensions it implements."""
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(extensions)}


def model_metadata(engine: Engine) -> dict[str, Any]:
    """``{"name", "versions", "platform", "inputs", "outputs", "parameters"}`` of a loaded model;
    tensors as ``{"name", "datatype", "shape"}`` with -1 for the batch axis."""
    m = engine.manifest
    classes = len(m.labels)
    return {
        "name": m.name,
        "versions": [m.version],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": INPUT_DATATYPE, "shape": input_shape(engine)}],
        "outputs": [
            {"name": name, "datatype": output_datatype(name), "shape": output_shape(name, classes)} for name in OUTPUTS
        ],
        "parameters": {"labels": list(m.labels), "default_tol": m.solver.tol, "default_max_iter": m.solver.max_iter},
    }
