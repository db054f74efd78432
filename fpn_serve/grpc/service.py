"""The ``inference.GRPCInferenceService`` calls, on the registry that HTTP serves from.

Every call runs on the server's asyncio loop (grpc.aio, the loop uvicorn runs). ModelInfer
validates through ``fpn_serve.oip`` and executes through batching's parameters, as the HTTP v2
route does; a fixed-point request joins its model's shared active batch (``submit_async``). The
wait for the answer is bounded by the call's remaining time (its deadline) and the server's
request timeout; when the caller cancels, or its deadline passes, grpc cancels the handler, and
with it the scheduler's future, so the request's rows leave the batch at the next iteration.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from .. import oip
from ..batching.registry import READY, ModelRegistry
from ..errors import FPNServeError, InputError
from ..runtime.engine import Engine
from ..runtime.request import Prepared
from ..runtime.result import ClassifyResult
from ..settings import Settings
from . import grpc_service_pb2 as pb
from . import grpc_service_pb2_grpc as pb_grpc
from .errors import INTERNAL_MESSAGE, TimedOut, code_of, trailers_of
from .wire import infer_response, input_tensors, model_metadata, parameters_of

log = logging.getLogger("fpn_serve")

EXTENSIONS = ("model_repository",)  # Triton's repository calls; the other calls are the protocol's core
_Reply = TypeVar("_Reply")
_Call = Callable[[Any, Any, Any], Awaitable[_Reply]]


def answers_errors(call: _Call[_Reply]) -> _Call[_Reply]:
    """Answer the call's domain errors with their status code (``errors.CODES``) and message; an
    unexpected failure is logged and answered INTERNAL without its details."""

    @functools.wraps(call)
    async def wrapped(self: Any, request: Any, context: Any) -> _Reply:
        try:
            return await call(self, request, context)
        except grpc.aio.AbortError:
            raise
        except FPNServeError as exc:
            failure: Exception = exc
            message = str(exc)
        except Exception as exc:
            log.exception("gRPC %s failed", call.__name__)
            failure, message = exc, INTERNAL_MESSAGE
        trailers = trailers_of(failure)
        if trailers:
            context.set_trailing_metadata(trailers)
        await context.abort(code_of(failure), message)
        raise AssertionError("context.abort returned")  # it always raises

    return wrapped


def _model_name(name: str) -> str:
    if not name:
        raise InputError("the request names no model; set its model name")
    return name


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The service's calls (method names as the protocol spells them)."""

    def __init__(self, registry: ModelRegistry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings

    @answers_errors
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @answers_errors
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.registry.ready())

    @answers_errors
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        engine = self.registry.get(_model_name(request.name), request.version or None)
        return pb.ModelReadyResponse(ready=self.registry.ready(engine.name))

    @answers_errors
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        doc = oip.server_metadata(EXTENSIONS)
        return pb.ServerMetadataResponse(name=doc["name"], version=doc["version"], extensions=doc["extensions"])

    @answers_errors
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        return model_metadata(self.registry.get(_model_name(request.name), request.version or None))

    @answers_errors
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        started = time.perf_counter()
        with self.registry.lease(_model_name(request.model_name), request.model_version or None) as engine:
            x = oip.validate_inputs(engine, input_tensors(request), self.settings.max_inputs)
            names = oip.validate_outputs([o.name for o in request.outputs] or None)
            params = parameters_of(request.parameters)
            run = functools.partial(self._run, engine, self._timeout(context))
            prepared, result = await oip.execute(self.registry, engine, x, params, run, started=started, from_text=True)
        return infer_response(request, engine, result, names, oip.answer_parameters(prepared))

    def _timeout(self, context: Any) -> float:
        """Seconds the call may wait for its answer: the server's request timeout, or less where
        the caller's deadline comes first."""
        timeout = self.settings.request_timeout_s
        remaining = context.time_remaining()
        return timeout if remaining is None else min(timeout, max(0.0, remaining))

    async def _run(self, engine: Engine, timeout_s: float, prepared: Prepared) -> ClassifyResult:
        """One prepared request: in the model's shared batch (fixed_point) or alone in a worker
        thread (the other solvers), within ``timeout_s``. A timeout or the caller's cancellation
        cancels the work it waits for; the scheduler then evicts the request's rows."""
        metrics = self.registry.metrics
        work: Awaitable[ClassifyResult]
        if prepared.solver == "fixed_point":
            work = self.registry.scheduler_for(engine).submit_async(prepared)
        else:
            work = asyncio.to_thread(engine.run, prepared)
        try:
            result = await asyncio.wait_for(work, timeout_s)
        except (TimeoutError, asyncio.TimeoutError) as exc:  # distinct types before Python 3.11
            metrics.observe_abandoned(engine.name, "timeout")
            raise TimedOut(
                f"the call took longer than {timeout_s:g} s (its deadline, or the server's request timeout "
                f"{self.settings.request_timeout_s:g} s); pass deadline_ms to bound the solve"
            ) from exc
        except asyncio.CancelledError:
            metrics.observe_abandoned(engine.name, "client_gone")
            raise
        metrics.observe_result(engine.name, result)
        return result

    @answers_errors
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        _one_repository(request.repository_name)
        entry = pb.RepositoryIndexResponse.ModelIndex
        states = [s for s in self.registry.index() if s.state == READY or not request.ready]
        return pb.RepositoryIndexResponse(
            models=[entry(name=s.name, version=s.version, state=s.state, reason=s.reason) for s in states]
        )

    @answers_errors
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        _one_repository(request.repository_name)
        unsupported = sorted(name for name in request.parameters if name == "config" or name.startswith("file:"))
        if unsupported:
            raise InputError(
                f"load parameters {unsupported} are not supported: a model loads from its folder in the "
                "repository as it is; send the load without them"
            )
        await asyncio.to_thread(self.registry.load, _model_name(request.model_name))
        return pb.RepositoryModelLoadResponse()

    @answers_errors
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        _one_repository(request.repository_name)  # unload_dependents: a model here has no dependents
        await asyncio.to_thread(self.registry.unload, _model_name(request.model_name))
        return pb.RepositoryModelUnloadResponse()


def _one_repository(name: str) -> None:
    if name:
        raise InputError(f"repository {name!r}: this server has one model repository; leave repository_name empty")
