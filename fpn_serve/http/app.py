"""The HTTP service: ``POST /classify``, ``GET /models``, ``GET /healthz``.

Models are loaded in the lifespan (never at import) into a registry that routes receive through
a dependency, so tests can build an app around any model folder. Every bad request is answered
with a 4xx JSON body ``{"detail": "<what was wrong and what is allowed>"}``. The common
``/classify`` request (one small image, plain parameters) takes a lean path inside the route
(``LeanClassify``, parsers in ``lean.py``) that gives the same answers as the declared route.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from . import lean
from ..runtime.engine import ClassifyResult, Engine
from ..errors import FPNServeError, InputError
from ..batching.metrics import Metrics
from ..contract.images import DEFAULT_MAX_PIXELS, images_to_batch
from ..batching.scheduler import QueueFull, Scheduler
from ..settings import Settings
from ..contract.store import discover

log = logging.getLogger("fpn_serve")

IMAGE_TYPES = ("image/png", "image/jpeg")
INLINE_DECODE_BYTES = 64 * 1024
ALLOWED_TYPES = ("multipart/form-data (field 'file')", *IMAGE_TYPES, "application/json")


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one server process."""

    model_paths: tuple[Path, ...]
    device: str = "auto"
    max_iter_cap: int = 1000
    max_body_bytes: int = 4 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_inputs: int = 256
    max_queue: int = 1024  # requests waiting for the active batch; beyond it: 503
    request_timeout_s: float = 30.0
    token: str | None = None  # bearer token required on every route but the health routes
    threads: int = 0  # ONNX Runtime threads for Q; 0: one fewer than the usable CPUs (see serving_threads)

    @classmethod
    def from_settings(cls, settings: Settings, model_paths: tuple[Path, ...]) -> ServerConfig:
        return cls(
            model_paths=model_paths,
            device=settings.device,
            max_iter_cap=settings.max_iter_cap,
            max_body_bytes=settings.max_body_bytes,
            max_pixels=settings.max_pixels,
            max_inputs=settings.max_inputs,
            max_queue=settings.max_queue,
            request_timeout_s=settings.request_timeout_s,
            threads=settings.threads,
            token=(settings.token.get_secret_value() or None) if settings.token is not None else None,  # "" = unset
        )


@dataclass
class ModelRegistry:
    """The loaded engines by name, each with its scheduler; the first one is the default."""

    engines: dict[str, Engine] = field(default_factory=dict)
    schedulers: dict[str, Scheduler] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=Metrics)
    draining: bool = False  # set on shutdown: readiness turns false while in-flight work finishes

    def get(self, name: str | None) -> Engine:
        if name is None:
            return next(iter(self.engines.values()))
        engine = self.engines.get(name)
        if engine is None:
            raise HTTPException(404, f"unknown model {name!r}; available: {', '.join(self.engines)}")
        return engine

    def start(self, config: ServerConfig) -> None:
        for name, engine in self.engines.items():
            if name not in self.schedulers:
                sched = Scheduler(engine, max_active=config.max_inputs, max_queue=config.max_queue)
                sched.start()
                self.schedulers[name] = sched

    def stop(self) -> None:
        for sched in self.schedulers.values():
            sched.stop()
        self.schedulers.clear()


def get_registry(request: Request) -> ModelRegistry:
    """The dependency through which routes receive the loaded models."""
    reg: ModelRegistry = request.app.state.registry
    return reg


Registry = Annotated[ModelRegistry, Depends(get_registry)]


def serving_threads(threads: int) -> int:
    """ONNX Runtime's threads for Q in a server: ``threads``, or for 0 one fewer than the CPUs this
    process may run on (at least one), so that Q's threads never crowd out the HTTP event loop."""
    if threads > 0:
        return threads
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, usable - 1)


def load_registry(config: ServerConfig) -> ModelRegistry:
    registry = ModelRegistry()
    threads = serving_threads(config.threads)
    for folder in discover(list(config.model_paths)):
        engine = Engine.load(folder, device=config.device, max_iter_cap=config.max_iter_cap, threads=threads)
        if engine.name in registry.engines:
            raise FPNServeError(f"two model folders are named {engine.name!r}; names must be unique")
        registry.engines[engine.name] = engine
        log.info("serving model %s from %s", engine.name, folder)
    return registry


# ---------------------------------------------------------------------------------------------
# Response models (they also document the API in OpenAPI)


# JSON has no inf or NaN: such a value is sent as null. error_bound is null for a model without a
# contraction certificate (gamma >= 1); a diverging iterate can overflow the others.


class Ranked(BaseModel):
    label: str
    index: int
    probability: float | None


class Prediction(BaseModel):
    label: str
    index: int
    probabilities: list[float | None] | None = None  # every class, unless top_k was asked for
    top_k: list[Ranked] | None = None  # the k most probable classes, most probable first
    iterations: int
    residual: float | None
    converged: bool
    error_bound: float | None


class ClassifyResponse(BaseModel):
    model: str
    latency_ms: float
    tol: float
    max_iter: int
    predictions: list[Prediction]


class ModelInfo(BaseModel):
    name: str
    version: str
    input_shape: list[int]
    labels: list[str]
    gamma: float
    default_tol: float
    default_max_iter: int
    calibration: dict[str, Any]


class ErrorResponse(BaseModel):
    detail: str


# ---------------------------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """Read the body, stopping with 413 as soon as it passes ``limit`` bytes."""
    return await receive_body(request.receive, request.headers.get("content-length"), limit)


async def receive_body(receive: Receive, declared: str | None, limit: int) -> bytes:
    """Read a body from an ASGI receive channel: 413 at once when the declared length is over
    ``limit``, and as soon as the bytes read pass it."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the body is {declared} bytes; at most {limit} are allowed")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"the body is over {limit} bytes, the most allowed")
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()


async def _multipart_files(request: Request, body: bytes, max_files: int) -> list[bytes]:
    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=max_files, max_fields=16).parse()
    except MultiPartException as exc:
        if "Too many files" in exc.message:
            raise HTTPException(
                413, f"more than {max_files} files in one request; at most {max_files} are allowed"
            ) from exc
        raise HTTPException(400, f"malformed multipart body: {exc.message}") from exc
    try:
        files = [v for k, v in form.multi_items() if k == "file" and isinstance(v, UploadFile)]
        if not files:
            raise HTTPException(400, "the multipart body has no 'file' field; send the image as file=@digit.png")
        return [await f.read() for f in files]
    finally:
        await form.close()  # the uploads' spooled files


def _json_inputs(body: bytes, engine: Engine, max_inputs: int) -> np.ndarray:
    shape = list(engine.manifest.input.shape)
    want = f'{{"inputs": [...]}} with each input a nested list of shape {shape}'
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HTTPException(400, f"the body is not valid JSON ({exc}); expected {want}") from exc
    except RecursionError as exc:
        raise HTTPException(400, f"the JSON body is nested too deeply; expected {want}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise HTTPException(422, f"expected {want}")
    if len(doc["inputs"]) > max_inputs:
        raise HTTPException(413, f"{len(doc['inputs'])} inputs in one request; at most {max_inputs} are allowed")
    try:
        if b"true" in body or b"false" in body:  # cheap test first: walking every number costs
            _refuse_booleans(doc["inputs"])
        x = np.asarray(doc["inputs"], dtype=np.float32)
    except (ValueError, TypeError, RecursionError) as exc:
        raise HTTPException(422, f"inputs must be numbers in a regular nested list: {exc}; expected {want}") from exc
    if list(x.shape[1:]) != shape:
        raise HTTPException(422, f"inputs have shape {list(x.shape)}; expected [n, {', '.join(map(str, shape))}]")
    return x


async def within(work: Any, seconds: float) -> Any:
    """Await ``work`` for at most ``seconds``; 504 after that (use deadline_ms for anytime answers)."""
    try:
        return await asyncio.wait_for(work, seconds)
    except (TimeoutError, asyncio.TimeoutError) as exc:  # distinct types before Python 3.11
        raise HTTPException(504, f"the request took longer than {seconds:g} s; pass deadline_ms to bound it") from exc


class _TimedOut(Exception):
    pass


def _time_out(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(_TimedOut())


async def future_within(future: asyncio.Future[Any], seconds: float) -> Any:
    """``within`` for a future that nobody else awaits: one timer instead of wait_for's wrapping."""
    timer = future.get_loop().call_later(seconds, _time_out, future)
    try:
        return await future
    except _TimedOut:
        raise HTTPException(504, f"the request took longer than {seconds:g} s; pass deadline_ms to bound it") from None
    finally:
        timer.cancel()


class GuardAndCount:
    """Pure ASGI middleware: the bearer-token check and the request metrics, without the extra task
    and stream that ``@app.middleware("http")`` puts around every request."""

    def __init__(self, app: Any, token: str | None, open_paths: set[str]) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode() if token is not None else None
        self.open_paths = open_paths

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.expected is not None and scope["path"] not in self.open_paths:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                key = "error" if scope["path"].startswith("/v2") else "detail"
                response = JSONResponse(
                    status_code=401,
                    content={key: "this server needs 'Authorization: Bearer <token>' on every route but health"},
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            reg = getattr(scope.get("app").state, "registry", None) if scope.get("app") else None
            if reg is not None:
                path = getattr(scope.get("route"), "path", "unmatched")
                reg.metrics.observe_request(path, status, time.perf_counter() - started)


async def run_model(
    registry: ModelRegistry,
    engine: Engine,
    x: np.ndarray,
    tol: float | None,
    max_iter: int | None,
    solver: str,
    deadline_ms: float | None,
    config: ServerConfig,
) -> ClassifyResult:
    """Answer one request: plain fixed-point requests share the model's active batch (the
    scheduler), other solvers run on their own in a worker thread; both within the timeout."""
    if solver == "fixed_point":
        future = registry.schedulers[engine.name].submit_async(x, tol, max_iter, deadline_ms=deadline_ms)
        result: ClassifyResult = await future_within(future, config.request_timeout_s)
    else:
        result = await within(
            run_in_threadpool(engine.classify, x, tol, max_iter, solver=solver, deadline_ms=deadline_ms),
            config.request_timeout_s,
        )
    registry.metrics.observe_result(engine.name, result)
    return result


def _refuse_booleans(value: Any) -> None:
    """JSON true/false would silently become 1.0/0.0: refuse them as non-numeric."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, bool):
            raise ValueError("inputs contain true/false; only numbers are allowed")
        if isinstance(item, list):
            stack.extend(item)


def json_floats(values: np.ndarray) -> list[float | None]:
    """The values as JSON numbers, with null for inf and NaN (which JSON cannot hold)."""
    return [v if math.isfinite(v) else None for v in values.ravel().tolist()]


def _response(
    engine: Engine, result: ClassifyResult, started: float, tol: float, max_iter: int, top_k: int | None = None
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
        strict=True,
    )
    finite = bool(np.isfinite(result.probabilities).all())
    for i, (label, iterations, residual, converged, error_bound) in enumerate(columns):
        probs = result.probabilities[i]
        pred: dict[str, Any] = {"label": names[label], "index": label}
        values = probs.tolist() if finite else json_floats(probs)
        if top_k:
            order = np.argsort(-probs, kind="stable")[:top_k].tolist()
            pred["top_k"] = [{"label": names[j], "index": j, "probability": values[j]} for j in order]
        else:
            pred["probabilities"] = values
        pred["iterations"] = iterations
        pred["residual"] = residual if math.isfinite(residual) else None
        pred["converged"] = converged
        pred["error_bound"] = error_bound if math.isfinite(error_bound) else None
        predictions.append(pred)
    return JSONResponse(
        {
            "model": engine.name,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            "tol": tol,
            "max_iter": max_iter,
            "predictions": predictions,
        }
    )


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive channel that first gives back the body already read, then the real channel."""
    given = False

    async def again() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


class LeanClassify:
    """The ASGI app of the /classify route: the lean path where it applies, else ``general`` (the
    route's FastAPI app). It runs inside the route, so middleware, metrics by route and exception
    handlers are the same for both."""

    def __init__(self, general: ASGIApp, config: ServerConfig) -> None:
        self.general = general
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        config = self.config
        query = lean.parse_query(scope["query_string"])
        if query is None:
            await self.general(scope, receive, send)
            return
        registry = scope["app"].state.registry
        engines = registry.engines
        engine = next(iter(engines.values())) if query.model is None else engines.get(query.model)
        if (
            engine is None
            or (query.top_k is not None and query.top_k > len(engine.manifest.labels))
            or (query.max_iter is not None and query.max_iter > config.max_iter_cap)
        ):
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
        declared = _header(scope, b"content-length")
        body = await receive_body(
            receive, declared.decode("latin-1") if declared is not None else None, config.max_body_bytes
        )
        blob = body if boundary is None else lean.single_file(body, boundary)
        if not blob or len(body) > INLINE_DECODE_BYTES:
            await self.general(scope, _replay(body, receive), send)
            return
        tol, max_iter = engine.resolve(query.tol, query.max_iter)
        x = images_to_batch([blob], engine.manifest.input, max_pixels=config.max_pixels)
        deadline_ms = query.deadline_ms
        if deadline_ms is not None:  # the deadline counts from the request's arrival
            deadline_ms = max(deadline_ms - (time.perf_counter() - started) * 1000, 1e-3)
        result = await run_model(registry, engine, x, tol, max_iter, query.solver, deadline_ms, config)
        await _response(engine, result, started, tol, max_iter, query.top_k)(scope, receive, send)


def create_app(config: ServerConfig, registry: ModelRegistry | None = None) -> FastAPI:
    """Build the app. Models load in the lifespan unless a ready ``registry`` is given (tests)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reg = registry if registry is not None else await run_in_threadpool(load_registry, config)
        reg.start(config)
        app.state.registry = reg
        try:
            yield
        finally:
            reg.stop()

    app = FastAPI(
        responses={401: {"model": ErrorResponse, "description": "missing or wrong bearer token"}},
        title="fpn-serve",
        version=__version__,
        description="Fixed Point Network classifiers with a per-request tolerance: a looser `tol` "
        "stops the fixed-point iteration earlier and answers faster.",
        lifespan=lifespan,
    )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
            parts.append(f"{where}: {err.get('msg')} (got {err.get('input')!r})")
        return JSONResponse(status_code=422, content={"detail": "; ".join(parts)})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # the Open Inference Protocol's error shape on its routes, FastAPI's everywhere else
        key = "error" if request.url.path.startswith("/v2") else "detail"
        return JSONResponse(status_code=exc.status_code, content={key: exc.detail}, headers=exc.headers)

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": str(exc)})

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # the client hung up before its body arrived: nobody to answer, nothing went wrong here
        return Response(status_code=499)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse(
            status_code=503, content={"detail": str(exc)}, headers={"Retry-After": str(max(1, round(exc.retry_after)))}
        )

    @app.post(
        "/classify",
        response_model=ClassifyResponse,
        response_model_exclude_none=True,
        responses={code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 422, 503)},
        summary="Classify one or more images or normalised inputs",
        openapi_extra={
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
    )
    async def classify(
        request: Request,
        registry: Registry,
        tol: Annotated[
            float | None, Query(gt=0, le=1, description="per-sample residual tolerance; default: the model's")
        ] = None,
        max_iter: Annotated[int | None, Query(ge=1, description="iteration cap; default: the model's")] = None,
        model: Annotated[str | None, Query(max_length=64, description="model name; default: the first served")] = None,
        solver: Annotated[Literal["fixed_point", "anderson"], Query(description="forward solver")] = "fixed_point",
        deadline_ms: Annotated[
            float | None,
            Query(gt=0, le=60_000, description="answer with the current iterate once this many ms have passed"),
        ] = None,
        top_k: Annotated[
            int | None, Query(ge=1, description="answer the k most probable classes instead of all probabilities")
        ] = None,
    ) -> JSONResponse:
        started = time.perf_counter()
        engine = registry.get(model)
        if top_k is not None and top_k > len(engine.manifest.labels):
            raise HTTPException(422, f"top_k: must be from 1 to {len(engine.manifest.labels)} (got {top_k})")
        if max_iter is not None and max_iter > config.max_iter_cap:
            raise HTTPException(422, f"max_iter: must be from 1 to {config.max_iter_cap} (got {max_iter})")
        tol_used, max_iter_used = engine.resolve(tol, max_iter)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in ("multipart/form-data", "application/json", *IMAGE_TYPES):
            raise HTTPException(
                415,
                f"content type {content_type or '(none)'!r} is not accepted; send one of: {', '.join(ALLOWED_TYPES)}",
            )
        body = await read_body(request, config.max_body_bytes)
        if not body:
            raise HTTPException(
                400, "the body is empty; send an image (multipart field 'file' or raw PNG/JPEG) or JSON inputs"
            )
        if content_type == "application/json":
            x = _json_inputs(body, engine, config.max_inputs)
        else:
            blobs = (
                await _multipart_files(request, body, config.max_inputs)
                if content_type == "multipart/form-data"
                else [body]
            )
            if sum(map(len, blobs)) <= INLINE_DECODE_BYTES:  # a few small images: cheaper than a thread hop
                x = images_to_batch(blobs, engine.manifest.input, max_pixels=config.max_pixels)
            else:
                x = await run_in_threadpool(images_to_batch, blobs, engine.manifest.input, max_pixels=config.max_pixels)
        if deadline_ms is not None:  # the deadline counts from the request's arrival
            deadline_ms = max(deadline_ms - (time.perf_counter() - started) * 1000, 1e-3)
        result = await run_model(registry, engine, x, tol_used, max_iter_used, solver, deadline_ms, config)
        return _response(engine, result, started, tol_used, max_iter_used, top_k)

    # The common request takes the lean path; the declared route above answers everything else
    # and is what OpenAPI documents.
    route = next(r for r in app.router.routes if isinstance(r, APIRoute) and r.path == "/classify")
    route.app = LeanClassify(route.app, config)

    @app.get("/models", response_model=list[ModelInfo], summary="The models this server serves")
    async def models(registry: Registry) -> list[ModelInfo]:
        return [
            ModelInfo(
                name=e.name,
                version=e.manifest.version,
                input_shape=list(e.manifest.input.shape),
                labels=list(e.manifest.labels),
                gamma=e.manifest.contraction.gamma,
                default_tol=e.manifest.solver.tol,
                default_max_iter=e.manifest.solver.max_iter,
                calibration=e.manifest.calibration,
            )
            for e in registry.engines.values()
        ]

    open_paths = {"/healthz", "/v2/health/live", "/v2/health/ready"}

    app.add_middleware(GuardAndCount, token=config.token, open_paths=open_paths)

    static = Path(__file__).resolve().parent / "static"
    app.mount("/static", StaticFiles(directory=static), name="static")

    @app.get("/", include_in_schema=False)
    async def demo() -> FileResponse:
        """The demo page: draw a digit, move the tolerance, watch the answer (no external resources)."""
        return FileResponse(static / "index.html")

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics(registry: Registry) -> PlainTextResponse:
        return PlainTextResponse(
            registry.metrics.render(registry.schedulers).decode(), media_type="text/plain; version=0.0.4"
        )

    from .v2 import build_router  # the v2 routes need this module's dependency and settings

    app.include_router(build_router(config))

    @app.get("/healthz", summary="Liveness: the process answers and its models are loaded")
    async def healthz(registry: Registry) -> dict[str, Any]:
        return {"status": "ok", "models": list(registry.engines)}

    return app
