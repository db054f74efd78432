"""The Open Inference Protocol (KServe v2) REST routes, so that existing v2 clients work unchanged.

    GET  /v2/health/live              GET /v2/models/{name}[/versions/{version}]
    GET  /v2/health/ready             GET /v2/models/{name}[/versions/{version}]/ready
    GET  /v2                          POST /v2/models/{name}[/versions/{version}]/infer

An infer request carries one input tensor (any name; ``FP32``, shape ``[N, *input_shape]``, data
flat in row-major order or nested) and optional request ``parameters`` ``tol``, ``max_iter``,
``deadline_ms``, ``solver``. The answer's outputs are named tensors: ``logits``,
``probabilities`` (FP32 [N, classes]), ``label`` (INT64 [N]), ``iterations`` (INT32 [N]),
``residual``, ``error_bound`` (FP32 [N]) and ``converged`` (BOOL [N]); a request's ``outputs``
list selects some of them. Errors are ``{"error": "<message>"}`` with a 4xx status, as the
protocol specifies (``errors.STATUS`` gives each its status on these routes).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .. import __version__
from ..errors import InputError, LimitExceeded
from ..runtime.engine import ClassifyResult, Engine
from .body import read_body
from .deps import AppSettings, Registry
from .errors import MalformedBody
from .execute import run_model
from .jsonable import json_floats

OUTPUTS = ("logits", "probabilities", "label", "iterations", "residual", "converged", "error_bound")
PARAMETERS = ("tol", "max_iter", "deadline_ms", "solver")


def _metadata(engine: Engine) -> dict[str, Any]:
    m = engine.manifest
    classes = len(m.labels)
    return {
        "name": m.name,
        "versions": [m.version],
        "platform": "onnxruntime_fixed_point",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, *m.input.shape]}],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, classes]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "iterations", "datatype": "INT32", "shape": [-1]},
            {"name": "residual", "datatype": "FP32", "shape": [-1]},
            {"name": "converged", "datatype": "BOOL", "shape": [-1]},
            {"name": "error_bound", "datatype": "FP32", "shape": [-1]},
        ],
        "parameters": {"labels": list(m.labels), "default_tol": m.solver.tol, "default_max_iter": m.solver.max_iter},
    }


def _parse_request(body: bytes, engine: Engine, max_inputs: int) -> tuple[np.ndarray, dict[str, Any], list[str], Any]:
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise MalformedBody(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InputError("the inference request must be a JSON object with an 'inputs' list")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InputError("'inputs' must hold exactly one tensor object {name, shape, datatype, data}")
    tensor = inputs[0]
    shape, datatype, data = tensor.get("shape"), tensor.get("datatype"), tensor.get("data")
    want = [-1, *engine.manifest.input.shape]
    if datatype != "FP32":
        raise InputError(f"input datatype {datatype!r} is not supported; send FP32")
    if (
        not isinstance(shape, list)
        or len(shape) != len(want)
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or shape[1:] != want[1:]
        or shape[0] < 1
    ):
        raise InputError(f"input shape {shape!r} does not match the model's [N, {', '.join(map(str, want[1:]))}]")
    if shape[0] > max_inputs:
        raise LimitExceeded(f"{shape[0]} inputs in one request; at most {max_inputs} are allowed")
    if not isinstance(data, list):
        raise InputError("input 'data' must be a list of numbers (flat row-major or nested)")
    try:
        arr = np.asarray(data, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise InputError(f"input 'data' must hold only numbers: {exc}") from exc
    if arr.size != math.prod(shape):
        raise InputError(f"input 'data' has {arr.size} elements; shape {shape} needs {math.prod(shape)}")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InputError("'parameters' must be an object")
    # other parameters (tritonclient adds binary_data_output, for one) are ignored, as the protocol allows
    params = {k: v for k, v in params.items() if k in PARAMETERS}
    requested = doc.get("outputs")
    names = list(OUTPUTS)
    if requested is not None:
        if not isinstance(requested, list) or not all(isinstance(o, dict) and "name" in o for o in requested):
            raise InputError("'outputs' must be a list of objects with a 'name'")
        names = [o["name"] for o in requested]
        bad = [n for n in names if n not in OUTPUTS]
        if bad:
            raise InputError(f"unknown outputs {bad}; available: {', '.join(OUTPUTS)}")
    return arr.reshape(shape), params, names, doc.get("id")


def _tensors(result: ClassifyResult, names: list[str]) -> list[dict[str, Any]]:
    table = {
        "logits": ("FP32", result.logits),
        "probabilities": ("FP32", result.probabilities),
        "label": ("INT64", result.labels),
        "iterations": ("INT32", result.iterations),
        "residual": ("FP32", result.residuals),
        "converged": ("BOOL", result.converged),
        "error_bound": ("FP32", result.error_bounds),
    }
    out = []
    for name in names:
        datatype, value = table[name]
        data = value.ravel().tolist() if datatype != "FP32" or np.isfinite(value).all() else json_floats(value)
        out.append({"name": name, "datatype": datatype, "shape": list(value.shape), "data": data})
    return out


router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (v2)"])


@router.get("/health/live", summary="v2 liveness")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="v2 readiness: every model loaded")
async def ready(registry: Registry) -> JSONResponse:
    ok = registry.ready()
    return JSONResponse(status_code=200 if ok else 503, content={"ready": ok})


@router.get("", summary="v2 server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "fpn-serve", "version": __version__, "extensions": []}


@router.get("/models/{name}", summary="v2 model metadata")
@router.get("/models/{name}/versions/{version}", summary="v2 model metadata (one version)")
async def model_metadata(registry: Registry, name: str, version: str | None = None) -> JSONResponse:
    return JSONResponse(_metadata(registry.get(name, version)))


@router.get("/models/{name}/ready", summary="v2 model readiness")
@router.get("/models/{name}/versions/{version}/ready", summary="v2 model readiness (one version)")
async def model_ready(registry: Registry, name: str, version: str | None = None) -> JSONResponse:
    engine = registry.get(name, version)
    ok = registry.ready(engine.name)
    return JSONResponse(status_code=200 if ok else 503, content={"name": engine.name, "ready": ok})


@router.post("/models/{name}/infer", summary="v2 inference")
@router.post("/models/{name}/versions/{version}/infer", summary="v2 inference (one version)")
async def infer(
    request: Request, registry: Registry, settings: AppSettings, name: str, version: str | None = None
) -> JSONResponse:
    started = time.perf_counter()
    engine = registry.get(name, version)
    body = await read_body(request.receive)
    x, params, names, request_id = _parse_request(body, engine, settings.max_inputs)
    tol = params.get("tol")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol <= 1):
        # as on /classify, a request's tol is positive (the runtime would take 0: run max_iter)
        raise InputError(f"parameter tol must be a number with 0 < tol <= 1, got {tol!r}")
    prepared = engine.prepare(
        x,
        tol,
        params.get("max_iter"),
        solver=params.get("solver", "fixed_point"),
        deadline_ms=params.get("deadline_ms"),
        started=started,
    )
    result = await run_model(registry, engine, prepared, settings.request_timeout_s, request.receive)
    answer: dict[str, Any] = {
        "model_name": engine.name,
        "model_version": engine.manifest.version,
        "outputs": _tensors(result, names),
    }
    if request_id is not None:
        answer["id"] = request_id
    return JSONResponse(answer)
