"""What the server serves and how it is doing: ``GET /models``, ``GET /healthz``, ``GET /metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from .deps import Registry

router = APIRouter()


class ModelInfo(BaseModel):
    name: str
    version: str
    input_shape: list[int]
    labels: list[str]
    gamma: float
    default_tol: float
    default_max_iter: int
    calibration: dict[str, Any]


@router.get("/models", response_model=list[ModelInfo], summary="The models this server serves")
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


@router.get("/healthz", summary="Liveness: the process answers and its models are loaded")
async def healthz(registry: Registry) -> dict[str, Any]:
    return {"status": "ok", "models": list(registry.engines)}


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(registry: Registry) -> PlainTextResponse:
    return PlainTextResponse(
        registry.metrics.render(registry.schedulers).decode(), media_type="text/plain; version=0.0.4"
    )
