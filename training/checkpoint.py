"""Checkpoints: weights plus the typed config that rebuilds the model, loadable with weights_only."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig, TrainConfig, model_config_from_dict, train_config_from_dict
from .errors import CheckpointError
from .fpn import FPN

__all__ = ["FORMAT", "CheckpointError", "load_checkpoint", "save_checkpoint"]

FORMAT = "fpn-checkpoint/1"


def _cpu(obj: Any) -> Any:
    """Tensors moved to the CPU, so a checkpoint written on a GPU loads anywhere."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def save_checkpoint(path: Path, model: FPN, cfg: TrainConfig, extra: dict[str, Any] | None = None) -> None:
    """Write atomically (temporary file, then rename), so an interrupted run keeps the last one."""
    payload: dict[str, Any] = {
        "format": FORMAT,
        "model_config": asdict(model.config),
        "train_config": asdict(cfg),
        "num_parameters": model.num_parameters(),
        "state_dict": model.state_dict(),
    }
    payload.update(extra or {})
    tmp = path.with_name(path.name + ".tmp")
    torch.save(_cpu(payload), tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path | str) -> tuple[FPN, TrainConfig, dict[str, Any]]:
    """Rebuild the model from a checkpoint alone; raise CheckpointError with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}): is it truncated or not a checkpoint?"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an fpn-train checkpoint (expected format {FORMAT})")
    try:
        model_cfg: ModelConfig = model_config_from_dict(payload["model_config"])
        train_cfg = train_config_from_dict(payload["train_config"])
        model = FPN(model_cfg)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} does not rebuild its model: {exc}") from exc
    model.eval()
    return model, train_cfg, payload
