"""The Open Inference Protocol (KServe v2) REST routes, so that existing v2 clients work unchanged.

    GET  /v2/health/live              GET /v2/models/{name}[/versions/{version}]
    GET  /v2/health/ready             GET /v2/models/{name}[/versions/{version}]/ready
    GET  /v2                          POST /v2/models/{name}[/versions/{version}]/infer
    POST /v2/repository/...           (the model repository extension, ``repository.py``)

An infer request carries the model's one input ``x`` (``FP32``, shape ``[N, *input_shape]``): as
JSON data (flat in row-major order, or nested) or as raw bytes after the JSON header (Triton's
binary tensor data extension, ``binary.py``); and optional request ``parameters`` (``tol``,
``max_iter``, ``deadline_ms``, ``solver``, ``stop``, ``trace``, Triton's sequence parameters).
It is validated strictly (``fpn_serve.oip``): an unknown, duplicate or missing input, another
datatype or shape, data of the wrong length or an unknown output is a 400 that says what the
model expects. The answer's outputs are named tensors: ``logits``, ``probabilities`` (FP32
[N, classes]), ``label`` (INT64 [N]), ``iterations`` (INT32 [N]), ``residual``, ``error_bound``
(FP32 [N]), ``converged`` and ``label_certified`` (BOOL [N]); a request's ``outputs`` list
selects some of them, each in JSON or binary. Errors are ``{"error": "<message>"}`` with a 4xx
status, as the protocol specifies (``errors.STATUS`` gives each its status on these routes).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from .. import oip
from ..batching.registry import ModelRegistry
from ..runtime.request import Prepared
from ..runtime.result import ClassifyResult
from ..settings import Settings
from . import binary, repository
from .body import read_body
from .deps import AppSettings, Registry
from .execute import run_model

EXTENSIONS = ("binary_tensor_data", "model_repository")


async def _infer(
    registry: ModelRegistry, settings: Settings, name: str, version: str | None, scope: Scope, receive: Receive
) -> Response:
    """One inference request, from its path parameters, headers and body to its answer."""
    started = time.perf_counter()
    header_length = encoding = None
    for key, value in scope["headers"]:
        if key == b"inference-header-content-length":
            header_length = value.decode("latin-1")
        elif key == b"content-encoding":
            encoding = value.decode("latin-1")
    with registry.lease(name, version) as engine:  # a model unloaded meanwhile finishes this request
        body = binary.parse_body(await read_body(receive), header_length, encoding)
        x = oip.validate_inputs(engine, body.inputs, settings.max_inputs)
        names = oip.validate_outputs(body.outputs)

        async def run(prepared: Prepared) -> ClassifyResult:
            return await run_model(registry, engine, prepared, settings.request_timeout_s, receive)

        prepared, result = await oip.execute(registry, engine, x, body.parameters, run, started=started)
    return binary.answer(
        engine.name, engine.manifest.version, body.id, result, names, body.binary, oip.answer_parameters(prepared)
    )


class _LeanInfer:
    """The ASGI app that answers the infer routes, without FastAPI's dependency and parameter
    machinery (the request needs none of it: ``_infer`` reads and checks everything itself). It
    runs inside the router, so the middleware and the error table are those of every route; the
    declared route below documents it in OpenAPI and answers the same way."""

    def __init__(self, path: str) -> None:
        self.path = path  # the route's path, for the request metrics by route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self
        state = scope["app"].state
        params = scope["path_params"]
        response = await _infer(state.registry, state.settings, params["name"], params.get("version"), scope, receive)
        await response(scope, receive, send)


router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (v2)"])
for _path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
    # first of the v2 routes: matched first, before the declared ones; Starlette calls an ASGI app as an endpoint
    router.add_route(_path, _LeanInfer(_path), methods=["POST"], include_in_schema=False)  # type: ignore[arg-type]


router.include_router(repository.router)


@router.get("/health/live", summary="v2 liveness")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="v2 readiness: every model loaded")
async def ready(registry: Registry) -> JSONResponse:
    ok = registry.ready()
    return JSONResponse(status_code=200 if ok else 503, content={"ready": ok})


@router.get("", summary="v2 server metadata")
async def server_metadata() -> dict[str, Any]:
    return oip.server_metadata(EXTENSIONS)


@router.get("/models/{name}", summary="v2 model metadata")
@router.get("/models/{name}/versions/{version}", summary="v2 model metadata (one version)")
async def model_metadata(registry: Registry, name: str, version: str | None = None) -> JSONResponse:
    return JSONResponse(oip.model_metadata(registry.get(name, version)))


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
) -> Response:
    """JSON, or Triton's binary tensor data (a JSON header of ``Inference-Header-Content-Length``
    bytes, then the raw inputs); answered the same way (see the module's docstring)."""
    return await _infer(registry, settings, name, version, request.scope, request.receive)
