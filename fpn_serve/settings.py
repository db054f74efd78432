"""Server settings: one object, read from ``FPN_SERVE_*`` environment variables; CLI flags override.

FPN_SERVE_HOST=0.0.0.0 FPN_SERVE_TOKEN=s3cret fpn-serve models/
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .contract.images import DEFAULT_MAX_PIXELS
from .errors import ModelError
from .runtime.providers import parse_device
from .runtime.request import DEFAULT_MAX_ITER_CAP


class Settings(BaseSettings):
    """Every setting of ``fpn-serve``; the environment variable is ``FPN_SERVE_`` + the upper-case name."""

    model_config = SettingsConfigDict(env_prefix="FPN_SERVE_", frozen=True)

    host: str = Field(default="127.0.0.1", description="address to listen on (0.0.0.0 for every interface)")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port")
    grpc_port: int = Field(
        default=8001, ge=0, le=65535, description="TCP port of the gRPC endpoint (Open Inference Protocol); 0: no gRPC"
    )
    device: str = Field(
        default="auto",
        description="auto (CUDA when it really initialises), cpu, cuda, or an ONNX Runtime execution provider "
        "(tensorrt, openvino, coreml, nnapi, qnn, xnnpack, ...) as name[:key=value,...]; one that does not "
        "initialise falls back to the CPU with a log line saying why",
    )
    max_iter_cap: int = Field(default=DEFAULT_MAX_ITER_CAP, ge=1, description="largest max_iter a request may ask for")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1, description="largest request body")
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1, description="largest image (width x height) decoded")
    max_inputs: int = Field(default=256, ge=1, description="most inputs (images or JSON inputs) per request")
    max_queue: int = Field(default=1024, ge=1, description="requests waiting for the active batch before 503")
    threads: int = Field(
        default=0,
        ge=0,
        description="ONNX Runtime threads for each model's encoder Q; 0: one fewer than the CPUs this process "
        "may use (the HTTP loop keeps one)",
    )
    max_sequences: int = Field(
        default=1024, ge=1, description="live sequences (sequence_id) whose last fixed point each model keeps"
    )
    sequence_idle_s: float = Field(
        default=60.0, gt=0, description="a sequence without an input for this long is forgotten"
    )
    request_timeout_s: float = Field(default=30.0, gt=0, description="longest a request may take before 504")
    drain_s: float = Field(
        default=1.0, ge=0, description="on SIGTERM/SIGINT, report not-ready this long before closing"
    )
    token: SecretStr | None = Field(default=None, description="bearer token required on every route but health")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="log verbosity"
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        try:
            parse_device(value)
        except ModelError as exc:
            raise ValueError(str(exc)) from None
        return value

    @property
    def bearer_token(self) -> str | None:
        """The token that requests must present, or None; an empty FPN_SERVE_TOKEN means none."""
        return (self.token.get_secret_value() or None) if self.token is not None else None


@lru_cache
def get_settings() -> Settings:
    return Settings()
