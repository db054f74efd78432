"""The Open Inference Protocol's model repository extension, over HTTP (under the v2 router):

    POST /v2/repository/index                      [{"name", "version", "state", "reason"}, ...]
    POST /v2/repository/models/{name}/load         reload if served; 200 with an empty body
    POST /v2/repository/models/{name}/unload       200 with an empty body

The repository is the model folders or stores the server was started with, and a request names a
model, never a path (``ModelRegistry.load``). Loading and unloading run in a worker thread so the
event loop keeps answering; in-flight requests finish on the model they started on. Like every
route but health, these are behind the bearer token when one is set.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..errors import InputError
from .body import read_body
from .deps import Registry
from .errors import MalformedBody

router = APIRouter(prefix="/repository")


async def _options(request: Request, allowed: tuple[str, ...]) -> dict[str, Any]:
    """The body's JSON object (an empty body is ``{}``); InputError for keys other than ``allowed``."""
    body = await read_body(request.receive)
    if not body.strip():
        return {}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedBody(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InputError("the body must be a JSON object")
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise InputError(f"unknown fields {unknown}; allowed: {', '.join(allowed) or 'none'}")
    return doc


@router.post("/index", summary="v2 repository: the models of the store, READY or UNAVAILABLE")
async def index(request: Request, registry: Registry) -> JSONResponse:
    ready_only = (await _options(request, ("ready",))).get("ready", False)
    if not isinstance(ready_only, bool):
        raise InputError(f"'ready' must be true or false, got {ready_only!r}")
    models = []
    for m in await run_in_threadpool(registry.index):
        if ready_only and m.state != "READY":
            continue
        entry = {"name": m.name, "version": m.version, "state": m.state}
        if m.reason:
            entry["reason"] = m.reason
        models.append(entry)
    return JSONResponse(models)


def _no_parameters(options: dict[str, Any], allowed: tuple[str, ...]) -> None:
    params = options.get("parameters") or {}
    if not isinstance(params, dict):
        raise InputError("'parameters' must be an object")
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise InputError(f"parameters {unknown} are not supported: models load from the store's folders as they are")


@router.post("/models/{name}/load", summary="v2 repository: load or reload a model of the store")
async def load(request: Request, registry: Registry, name: str) -> Response:
    _no_parameters(await _options(request, ("parameters",)), ())
    await run_in_threadpool(registry.load, name)
    return Response(status_code=200)


@router.post("/models/{name}/unload", summary="v2 repository: stop serving a model")
async def unload(request: Request, registry: Registry, name: str) -> Response:
    _no_parameters(await _options(request, ("parameters",)), ("unload_dependents",))
    await run_in_threadpool(registry.unload, name)
    return Response(status_code=200)
