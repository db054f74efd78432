"""What the server serves and how it is doing: ``GET /models``, ``GET /healthz``, ``GET /metrics``.

``/models`` shows what a caller chooses from: per model the calibration table (tol -> mean
iterations, accuracy, latency, measured at export on the images its ``calibration.split`` names),
the same rows as targets (each accuracy's one-sided 95 % lower bound, which ``target_accuracy``
compares, and the p99 latency this server predicts from the costs it measured when it started,
which ``latency_budget_ms`` compares), whether the model certifies labels (``stop=certified`` and
``label_certified``), and the certified stop's row where the manifest's calibration has one.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from ..runtime.engine import Engine
from .deps import Registry

router = APIRouter()


class CalibrationRow(BaseModel):
    """One stopping rule as measured at export: what it costs and what it gets right."""

    tol: float | None = None  # None for the certified stop (it has no tolerance)
    mean_iterations: float
    accuracy: float
    latency_us_batch1: float | None = None  # one input alone, Q and S included


class TargetRow(BaseModel):
    tol: float
    max_iter: int
    accuracy: float
    accuracy_lower_bound: float  # one-sided 95 % (Wilson) over the calibration images
    mean_iterations: float
    p99_iterations: int
    predicted_p99_ms: float | None  # on this server, one input alone; None before costs are measured


class ModelInfo(BaseModel):
    name: str
    version: str
    input_shape: list[int]
    labels: list[str]
    gamma: float
    default_tol: float
    default_max_iter: int
    calibration: dict[str, Any]  # the manifest's calibration as it is
    tolerances: list[CalibrationRow]  # the table a caller picks tol from, loosest first
    certifies: bool  # stop=certified is accepted and label_certified can be true
    certified_stop: CalibrationRow | None = None  # stop=certified's row, where the calibration has one
    calibration_split: str  # the images the table was measured on
    targets: list[TargetRow]  # what target_accuracy and latency_budget_ms choose from, loosest first


def _row(raw: Any) -> CalibrationRow | None:
    if not isinstance(raw, dict):
        return None
    try:
        return CalibrationRow.model_validate(raw)
    except ValueError:  # a row this server cannot read: left out, the raw table still shows it
        return None


def model_info(engine: Engine) -> ModelInfo:
    manifest = engine.manifest
    calibration = manifest.calibration
    rows = [r for r in map(_row, calibration.get("tolerances") or []) if r is not None and r.tol is not None]
    return ModelInfo(
        name=engine.name,
        version=manifest.version,
        input_shape=list(manifest.input.shape),
        labels=list(manifest.labels),
        gamma=manifest.contraction.gamma,
        default_tol=manifest.solver.tol,
        default_max_iter=manifest.solver.max_iter,
        calibration=calibration,
        tolerances=sorted(rows, key=lambda r: -(r.tol or 0.0)),
        certifies=engine.rules.certifies,
        certified_stop=_row(calibration.get("certified_stop")) if engine.rules.certifies else None,
        calibration_split=engine.targets.split,
        targets=[TargetRow.model_validate(r) for r in engine.targets.table()],
    )


@router.get("/models", response_model=list[ModelInfo], summary="The models this server serves")
async def models(registry: Registry) -> list[ModelInfo]:
    return [model_info(e) for e in registry.engines.values()]


@router.get("/healthz", summary="Liveness: the process answers and its models are loaded")
async def healthz(registry: Registry) -> dict[str, Any]:
    return {"status": "ok", "models": list(registry.engines)}


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(registry: Registry) -> PlainTextResponse:
    return PlainTextResponse(
        registry.metrics.render(registry.schedulers, registry.sequences).decode(),
        media_type="text/plain; version=0.0.4",
    )
