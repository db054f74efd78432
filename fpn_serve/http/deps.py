"""The dependencies through which routes receive the app's settings and loaded models (tests build
an app around any registry)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..batching.registry import ModelRegistry
from ..settings import Settings


def get_registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.registry
    return registry


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


Registry = Annotated[ModelRegistry, Depends(get_registry)]
AppSettings = Annotated[Settings, Depends(get_settings)]
