"""The manifest an export writes (see DESIGN.md, "The manifest"): built from the checkpoint and the
graphs, validated by the serving side's own parser before it is written.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx
import torch

from fpn_serve import __version__
from fpn_serve.contract import FORMAT, RESIDUAL, Manifest, sha256_file

from .config import TrainConfig
from .data import DatasetSpec, dataset_spec
from .export_graphs import ExportError, graph_file
from .fpn import FPN

# The polarity of each dataset's images: light strokes on a dark background (MNIST's digits,
# Fashion-MNIST's garments), or natural photographs (SVHN, CIFAR-10) taken as they are. The server
# inverts an uploaded image whose border is mostly light only for the first kind.
DARK_BACKGROUND = {"mnist": True, "fashion-mnist": True, "svhn": False, "cifar10": False}


def dark_background(dataset: str) -> bool:
    """Whether ``dataset``'s images are light on a dark background; raise ExportError for one not known."""
    try:
        return DARK_BACKGROUND[dataset]
    except KeyError:
        known = ", ".join(sorted(DARK_BACKGROUND))
        raise ExportError(f"no image polarity is known for dataset {dataset!r}; known: {known}") from None


def stored_spec(cfg: TrainConfig, payload: dict[str, Any]) -> DatasetSpec:
    """The data spec (normalisation, labels) the checkpoint was trained with; older checkpoints
    name only their dataset."""
    saved = payload.get("dataset_spec")
    if not isinstance(saved, dict):
        return dataset_spec(cfg.dataset)
    c, h, w = (int(v) for v in saved["input_shape"])
    return DatasetSpec(
        name=str(saved["name"]),
        input_shape=(c, h, w),
        mean=tuple(float(v) for v in saved["mean"]),
        std=tuple(float(v) for v in saved["std"]),
        labels=tuple(str(v) for v in saved["labels"]),
        scale=float(saved["scale"]),
    )


def build_manifest(
    name: str,
    model: FPN,
    cfg: TrainConfig,
    payload: dict[str, Any],
    folder: Path,
    tol: float,
    max_iter: int,
    opset: int,
    roles: list[str],
    precision: str,
) -> dict[str, Any]:
    """The manifest of a model folder written from ``model``; its calibration and parity come later."""
    spec = stored_spec(cfg, payload)
    metrics = payload.get("metrics", {})
    return {
        "format": FORMAT,
        "name": name,
        "version": "1",
        "graphs": {
            role: {"file": graph_file(role), "sha256": sha256_file(folder / graph_file(role))} for role in roles
        },
        "input": {
            "shape": list(spec.input_shape),
            "dtype": "float32",
            "layout": "NCHW",
            "scale": spec.scale,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "dark_background": dark_background(cfg.dataset),
        },
        "latent_shape": [model.config.latent_dim],
        "labels": list(spec.labels),
        "contraction": {
            "gamma": model.T.lipschitz_bound(),
            "method": f"architectural bound of {type(model.T).__name__}: gamma times the spectral norms on "
            "T's u-path (each <= 1 by exact spectral normalisation); activations 1-Lipschitz",
        },
        "solver": {"tol": tol, "max_iter": max_iter, "residual": RESIDUAL, "start": "u = 0"},
        "opset": opset,
        "precision": {"name": precision},
        "provenance": {
            "dataset": cfg.dataset,
            "architecture": model.config.arch,
            "parameters": model.num_parameters(),
            "backprop": cfg.backprop,
            "epochs": payload.get("epoch"),
            "train_config": asdict(cfg),
            "model_config": asdict(model.config),
            "checkpoint_test_accuracy": metrics.get("test_accuracy"),
            "exporter": f"fpn-export {__version__}, torch {torch.__version__}, onnx {onnx.__version__}",
        },
        "calibration": {},
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write ``folder/manifest.json`` after the serving side's parser accepted it."""
    Manifest.from_dict(manifest)  # the serving side must accept what we write
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
