"""``POST /classify``: images or normalised inputs in, one prediction per input out.

The declared route reads every request form FastAPI can describe, and is what OpenAPI documents.
The common request (one small image, plain parameters) takes a lean path inside the route
(``LeanClassify``, parsers in ``lean.py``) that gives the same answers without FastAPI's
parameter, dependency and form machinery. Both share the body limit (middleware), the image
decoding, the model dispatch (``execute.run_model``), the answer and the error table.

The dial: ``stop`` (``tol``: stop at the residual tolerance; ``certified``: stop each input at its
first certified label), ``trace`` (every iteration's residual, label and certificate in the
answer) and Triton's sequence parameters (``sequence_id``, ``sequence_start``, ``sequence_end``:
a stream's next input starts from its last fixed point) are parsed, like every request
parameter, by ``batching.parameters``. Every prediction says whether its label is certified.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncGenerator
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..batching.parameters import MAX_DEADLINE_MS, MAX_TOL, RequestParameters, parse_parameters, prepare, remember
from ..batching.registry import ModelRegistry
from ..contract.images import images_to_batch
from ..errors import InputError, LimitExceeded
from ..runtime.engine import ClassifyResult, Engine
from ..runtime.request import Prepared
from . import lean
from .body import read_body, replay
from .deps import AppSettings, Registry
from .errors import ErrorResponse, MalformedBody, UnsupportedType
from .execute import run_model
from .jsonable import FastJSONResponse, json_floats

IMAGE_TYPES = ("image/png", "image/jpeg")
INLINE_DECODE_BYTES = 64 * 1024  # images up to this size decode on the event loop: cheaper than a thread hop
DIAL_TEXT = ("trace", "sequence_id", "sequence_start", "sequence_end")  # parsed from their text
ALLOWED_TYPES = ("multipart/form-data (field 'file')", *IMAGE_TYPES, "application/json")


# JSON has no inf or NaN: such a value is sent as null. error_bound is null for a model without a
# contraction certificate (gamma >= 1); a diverging iterate can overflow the others.


class Ranked(BaseModel):
    label: str
    index: int
    probability: float | None


class TraceStep(BaseModel):
    iteration: int  # k = 1 .. iterations: after the k-th application of T
    residual: float | None
    label: str  # the most probable class of S(u_k)
    certified: bool  # that label is provably the exact fixed point's


class Prediction(BaseModel):
    label: str
    index: int
    probabilities: list[float | None] | None = None  # every class, unless top_k was asked for
    top_k: list[Ranked] | None = None  # the k most probable classes, most probable first
    iterations: int
    residual: float | None
    converged: bool
    error_bound: float | None
    label_certified: bool  # the label is provably that of the exact fixed point
    trace: list[TraceStep] | None = None  # with trace=true: one step per iteration


class Chosen(BaseModel):
    by: Literal["target_accuracy", "latency_budget_ms"]
    requested: float
    accuracy_lower_bound: float  # one-sided 95 % bound on the chosen tolerance's calibrated accuracy
    predicted_p99_ms: float | None = None  # for a latency budget


class ClassifyResponse(BaseModel):
    model: str
    latency_ms: float
    tol: float
    max_iter: int
    stop: Literal["tol", "certified"]  # the stopping rule that was used
    chosen: Chosen | None = None  # present when a target chose tol and max_iter
    predictions: list[Prediction]


def _trace(result: ClassifyResult, row: int, iterations: int) -> list[dict[str, Any]]:
    """One row's trace, k = 1 .. iterations (JSON null for a non-finite residual)."""
    assert result.trace is not None
    names = result.names
    residuals = result.trace.residuals[row, :iterations].tolist()
    labels = result.trace.labels[row, :iterations].tolist()
    certified = result.trace.certified[row, :iterations].tolist()
    return [
        {"iteration": k, "residual": r if math.isfinite(r) else None, "label": names[c], "certified": ok}
        for k, (r, c, ok) in enumerate(zip(residuals, labels, certified, strict=True), start=1)
    ]


def answer(
    engine: Engine, result: ClassifyResult, started: float, request: Prepared, top_k: int | None = None
) -> JSONResponse:
    """The /classify answer (shape: ClassifyResponse), built directly: no second validation pass."""
    names = result.names
    predictions = []
    columns = zip(
        result.labels.tolist(),
        result.iterations.tolist(),
        result.residuals.tolist(),
        result.converged.tolist(),
        result.error_bounds.tolist(),
        result.certified.tolist(),
        strict=True,
    )
    probabilities = result.probabilities
    for i, (label, iterations, residual, converged, error_bound, certified) in enumerate(columns):
        probs = probabilities[i]
        pred: dict[str, Any] = {"label": names[label], "index": label}
        values = probs.tolist()
        if not all(map(math.isfinite, values)):
            values = json_floats(probs)
        if top_k:
            order = np.argsort(-probs, kind="stable")[:top_k].tolist()
            pred["top_k"] = [{"label": names[j], "index": j, "probability": values[j]} for j in order]
        else:
            pred["probabilities"] = values
        pred["iterations"] = iterations
        pred["residual"] = residual if math.isfinite(residual) else None
        pred["converged"] = converged
        pred["error_bound"] = error_bound if math.isfinite(error_bound) else None
        pred["label_certified"] = certified
        if result.trace is not None:
            pred["trace"] = _trace(result, i, iterations)
        predictions.append(pred)
    return FastJSONResponse(
        {
            "model": engine.name,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            "tol": request.tol,
            "max_iter": request.max_iter,
            "stop": request.stop,
            **({"chosen": request.choice.report()} if request.choice is not None else {}),
            "predictions": predictions,
        }
    )


async def solve(
    registry: ModelRegistry,
    engine: Engine,
    x: np.ndarray,
    params: RequestParameters,
    started: float,
    timeout_s: float,
    receive: Receive,
) -> tuple[Prepared, ClassifyResult]:
    """Prepare ``x`` under ``params`` (a sequence's input starts from its last fixed point), run it
    and keep a sequence's latents for its next input."""
    sequences = registry.sequences.get(engine.name)
    prepared = prepare(engine, x, params, started=started, sequences=sequences)
    result = await run_model(registry, engine, prepared, timeout_s, receive)
    remember(params, result, sequences)
    return prepared, result


def check_top_k(engine: Engine, top_k: int | None) -> None:
    classes = len(engine.manifest.labels)
    if top_k is not None and top_k > classes:
        raise InputError(f"top_k: must be from 1 to {classes} (got {top_k})")


async def multipart_files(headers: Headers, body: bytes, max_files: int) -> list[bytes]:
    """The contents of the multipart body's ``file`` parts."""

    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    try:
        form = await MultiPartParser(headers, stream(), max_files=max_files, max_fields=16).parse()
    except MultiPartException as exc:
        if "Too many files" in exc.message:
            raise LimitExceeded(f"more than {max_files} files in one request; at most {max_files} are allowed") from exc
        raise MalformedBody(f"malformed multipart body: {exc.message}") from exc
    try:
        files = [v for k, v in form.multi_items() if k == "file" and isinstance(v, UploadFile)]
        if not files:
            raise MalformedBody("the multipart body has no 'file' field; send the image as file=@digit.png")
        return [await f.read() for f in files]
    finally:
        await form.close()  # the uploads' spooled files


def json_inputs(body: bytes, engine: Engine, max_inputs: int) -> np.ndarray:
    """``{"inputs": [...]}`` as a float32 array [n, *input_shape]."""
    shape = list(engine.manifest.input.shape)
    want = f'{{"inputs": [...]}} with each input a nested list of shape {shape}'
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MalformedBody(f"the body is not valid JSON ({exc}); expected {want}") from exc
    except RecursionError as exc:
        raise MalformedBody(f"the JSON body is nested too deeply; expected {want}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise InputError(f"expected {want}")
    if len(doc["inputs"]) > max_inputs:
        raise LimitExceeded(f"{len(doc['inputs'])} inputs in one request; at most {max_inputs} are allowed")
    try:
        if b"true" in body or b"false" in body:  # cheap test first: walking every number costs
            _refuse_booleans(doc["inputs"])
        x = np.asarray(doc["inputs"], dtype=np.float32)
    except (ValueError, TypeError, RecursionError) as exc:
        raise InputError(f"inputs must be numbers in a regular nested list: {exc}; expected {want}") from exc
    if list(x.shape[1:]) != shape:
        raise InputError(f"inputs have shape {list(x.shape)}; expected [n, {', '.join(map(str, shape))}]")
    return x


def _refuse_booleans(value: Any) -> None:
    """JSON true/false would silently become 1.0/0.0: refuse them as non-numeric."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, bool):
            raise ValueError("inputs contain true/false; only numbers are allowed")
        if isinstance(item, list):
            stack.extend(item)


ROUTE: dict[str, Any] = {  # what OpenAPI documents of the route
    "response_model": ClassifyResponse,
    "response_model_exclude_none": True,
    "responses": {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 422, 503)},
    "summary": "Classify one or more images or normalised inputs",
    "openapi_extra": {
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
                },
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {
                    "schema": {"type": "object", "properties": {"inputs": {"type": "array", "items": {}}}}
                },
            },
            "required": True,
        }
    },
}


async def classify(
    request: Request,
    registry: Registry,
    settings: AppSettings,
    tol: Annotated[float | None, Query(gt=0, le=MAX_TOL, description="tolerance per sample; default: model's")] = None,
    max_iter: Annotated[int | None, Query(ge=1, description="iteration cap; default: the model's")] = None,
    model: Annotated[str | None, Query(max_length=64, description="model name; default: the first served")] = None,
    solver: Annotated[Literal["fixed_point", "anderson"], Query(description="forward solver")] = "fixed_point",
    deadline_ms: Annotated[
        float | None,
        Query(gt=0, le=MAX_DEADLINE_MS, description="answer with the current iterate once this many ms have passed"),
    ] = None,
    top_k: Annotated[
        int | None, Query(ge=1, description="answer the k most probable classes instead of all probabilities")
    ] = None,
    stop: Annotated[
        Literal["tol", "certified"],
        Query(description="tol: stop at the tolerance; certified: stop each input at its first certified label"),
    ] = "tol",
    trace: Annotated[
        bool, Query(description="true: every iteration's residual, label and certificate in the answer")
    ] = False,
    sequence_id: Annotated[
        str | None,
        Query(description="a stream's id (a positive integer or a string): its next input starts from its last state"),
    ] = None,
    target_accuracy: Annotated[
        float | None,
        Query(gt=0, le=1, description="instead of tol: the loosest calibrated tol whose accuracy reaches this"),
    ] = None,
    latency_budget_ms: Annotated[
        float | None,
        Query(
            gt=0, le=MAX_DEADLINE_MS, description="instead of tol: the tightest calibrated tol that fits this budget"
        ),
    ] = None,
    sequence_start: Annotated[bool, Query(description="true: the first input of the stream (a cold start)")] = False,
    sequence_end: Annotated[
        bool, Query(description="true: the last input of the stream (its state is dropped)")
    ] = False,
) -> JSONResponse:
    started = time.perf_counter()
    engine = registry.get(model)
    check_top_k(engine, top_k)
    text = request.query_params  # the flags as sent: the same words are valid on every protocol
    params = parse_parameters(
        {
            "tol": tol,
            "max_iter": max_iter,
            "deadline_ms": deadline_ms,
            "solver": solver,
            **{"stop": stop, "target_accuracy": target_accuracy, "latency_budget_ms": latency_budget_ms},
            **{name: text.get(name) for name in DIAL_TEXT},
        },
        from_text=True,
    )
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("multipart/form-data", "application/json", *IMAGE_TYPES):
        raise UnsupportedType(
            f"content type {content_type or '(none)'!r} is not accepted; send one of: {', '.join(ALLOWED_TYPES)}"
        )
    body = await read_body(request.receive)
    if not body:
        raise MalformedBody("the body is empty; send an image (multipart field 'file' or raw PNG/JPEG) or JSON inputs")
    spec, max_pixels = engine.manifest.input, settings.max_pixels
    if content_type == "application/json":
        x = json_inputs(body, engine, settings.max_inputs)
    else:
        blobs = (
            await multipart_files(request.headers, body, settings.max_inputs)
            if content_type == "multipart/form-data"
            else [body]
        )
        if sum(map(len, blobs)) <= INLINE_DECODE_BYTES:
            x = images_to_batch(blobs, spec, max_pixels=max_pixels)
        else:
            x = await run_in_threadpool(images_to_batch, blobs, spec, max_pixels=max_pixels)
    prepared, result = await solve(registry, engine, x, params, started, settings.request_timeout_s, request.receive)
    return answer(engine, result, started, prepared, top_k)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


class LeanClassify:
    """The ASGI app of the /classify route: the lean path where it applies, else ``general`` (the
    route's FastAPI app). It runs inside the route, so middleware, metrics by route and the error
    table are the same for both."""

    def __init__(self, general: ASGIApp) -> None:
        self.general = general

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        query = lean.parse_query(scope["query_string"])
        if query is None:
            await self.general(scope, receive, send)
            return
        state = scope["app"].state
        registry, settings = state.registry, state.settings
        engines = registry.engines
        engine = next(iter(engines.values())) if query.model is None else engines.get(query.model)
        if engine is None or (query.top_k is not None and query.top_k > len(engine.manifest.labels)):
            await self.general(scope, receive, send)
            return
        raw_type = _header(scope, b"content-type") or b""
        content_type = raw_type.split(b";")[0].strip().lower().decode("latin-1")
        boundary = None
        if content_type == "multipart/form-data":
            boundary = lean.multipart_boundary(raw_type)
        if boundary is None and content_type not in IMAGE_TYPES:
            await self.general(scope, receive, send)
            return
        body = await read_body(receive)
        blob = body if boundary is None else lean.single_file(body, boundary)
        if not blob or len(body) > INLINE_DECODE_BYTES:
            await self.general(scope, replay(body, receive), send)
            return
        x = images_to_batch([blob], engine.manifest.input, max_pixels=settings.max_pixels)
        timeout_s = settings.request_timeout_s
        if query.dial is None:  # the plain request: nothing to look up or keep
            prepared = engine.prepare(
                x, query.tol, query.max_iter, solver=query.solver, deadline_ms=query.deadline_ms, started=started
            )
            result = await run_model(registry, engine, prepared, timeout_s, receive)
        else:
            prepared, result = await solve(registry, engine, x, query.dial, started, timeout_s, receive)
        await answer(engine, result, started, prepared, query.top_k)(scope, receive, send)


def install(app: FastAPI) -> None:
    """Add /classify to ``app``, with the lean path in front of the declared route."""
    app.add_api_route("/classify", classify, methods=["POST"], **ROUTE)
    route = app.router.routes[-1]
    assert isinstance(route, APIRoute) and route.path == "/classify"
    route.app = LeanClassify(route.app)
