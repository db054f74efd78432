"""The HTTP service: ``create_app`` puts the routes, the error table and the middleware together.

Models are loaded in the lifespan (never at import) into a registry that routes receive through a
dependency, so tests can build an app around any registry. Routes live by resource: ``classify``
(with its lean path), ``v2`` (the Open Inference Protocol), ``meta`` (models, health, metrics) and
``demo``; ``errors`` answers every failure from one table.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..batching.registry import ModelRegistry, load_registry
from ..settings import Settings
from . import classify, demo, errors, meta, v2
from .middleware import BearerAuth, BodyLimit, RequestMetrics

OPEN_PATHS = frozenset({"/healthz", "/v2/health/live", "/v2/health/ready"})  # no token needed


def load_models(settings: Settings, model_paths: Sequence[Path]) -> ModelRegistry:
    """The registry of the model folders (or stores) at ``model_paths``, loaded as ``settings`` say."""
    return load_registry(
        model_paths, device=settings.device, max_iter_cap=settings.max_iter_cap, threads=settings.threads
    )


def create_app(settings: Settings, model_paths: Sequence[Path] = (), registry: ModelRegistry | None = None) -> FastAPI:
    """Build the app. Models load in the lifespan from ``model_paths`` unless a loaded ``registry``
    is given; either way the lifespan starts its schedulers and stops them at the end."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reg = registry if registry is not None else await run_in_threadpool(load_models, settings, model_paths)
        reg.start(
            max_active=settings.max_inputs,
            max_queue=settings.max_queue,
            max_sequences=settings.max_sequences,
            sequence_idle_s=settings.sequence_idle_s,
        )
        app.state.registry = reg
        try:
            yield
        finally:
            reg.stop()

    app = FastAPI(
        responses={401: {"model": errors.ErrorResponse, "description": "missing or wrong bearer token"}},
        title="fpn-serve",
        version=__version__,
        description="Fixed Point Network classifiers with a per-request tolerance: a looser `tol` "
        "stops the fixed-point iteration earlier and answers faster.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    errors.install(app)
    classify.install(app)
    app.include_router(meta.router)
    app.include_router(v2.router)
    demo.install(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)  # innermost; raised inside the route
    app.add_middleware(RequestMetrics)
    if settings.bearer_token is not None:  # outermost; without a token there is nothing to check
        app.add_middleware(BearerAuth, token=settings.bearer_token, open_paths=OPEN_PATHS)
    return app
