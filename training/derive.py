"""A lower-precision variant of an exported model folder, built from the folder's own graphs.

``derive_folder`` quantizes the folder's Q.onnx (``training.precision``), copies T.onnx and
S.onnx unchanged, composes step.onnx, FPN.onnx and FPN1.onnx from the new Q with
``training.loop_graph``'s builders, and writes a manifest whose graphs carry new sha256s while its
contraction, certificate, solver defaults and provenance are the source's: T and S are the same
nodes and weights (restamped with the new model's name), so the certificate still holds.
``fpn-export --from-model`` runs it, then measures the accuracy and the calibration table through
``fpn_serve``.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from fpn_serve.contract import load_manifest, sha256_file

from .export_graphs import finish_graph, graph_file
from .export_manifest import write_manifest
from .loop_graph import build_loop_model, build_single_loop_model, build_step_model, build_steps_model, steps_exact
from .precision import convert

DERIVABLE = ("int8", "int8-static")


def source_manifest(src: Path) -> dict[str, Any]:
    """The source folder's manifest as a document, after the serving side validated it (sha256s)."""
    load_manifest(src)
    document: dict[str, Any] = json.loads((src / "manifest.json").read_text())
    if document.get("precision", {}).get("name", "fp32") != "fp32":
        raise ValueError(f"{src} holds {document['precision']['name']} graphs; derive from an fp32 folder")
    return document


def normalised(images: np.ndarray, document: dict[str, Any]) -> np.ndarray:
    """Raw pixels [n, C, H, W] -> the model's inputs, by the manifest's ``x = (p * scale - mean) / std``."""
    spec = document["input"]
    mean = np.asarray(spec["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec["std"], np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((images.astype(np.float32) * np.float32(spec["scale"]) - mean) / std, np.float32)


def derive_folder(src: Path, folder: Path, name: str, precision: str, calibration: np.ndarray | None) -> dict[str, Any]:
    """Write ``precision``'s variant of the fp32 folder ``src`` into ``folder``; return its manifest."""
    if precision not in DERIVABLE:
        raise ValueError(f"a folder can be derived in {', '.join(DERIVABLE)}, not {precision!r}")
    document = source_manifest(src)
    for role in ("Q", "T", "S"):
        shutil.copyfile(src / document["graphs"][role]["file"], folder / f"{role}.onnx")
    convert(folder, precision, calibration)
    opset = int(document.get("opset", 18))
    q, t, s = (onnx.load(str(folder / f"{r}.onnx")) for r in ("Q", "T", "S"))
    composed = {"step": build_step_model(t)}
    if steps_exact(t):
        composed["steps"] = build_steps_model(t)
    if "fpn" in document["graphs"]:
        composed["fpn"] = build_loop_model(q, t, s)
    if "fpn1" in document["graphs"]:
        composed["fpn1"] = build_single_loop_model(q, t, s)
    for role, model in composed.items():
        onnx.save(model, str(folder / graph_file(role)))
    roles = ["Q", "T", "S", *composed]
    for role in roles:  # T and S keep their nodes and weights; only the stamp names the new model
        finish_graph(folder / graph_file(role), name, role, opset)
    manifest = copy.deepcopy(document)
    manifest["name"] = name
    manifest["graphs"] = {
        role: {"file": graph_file(role), "sha256": sha256_file(folder / graph_file(role))} for role in roles
    }
    manifest["precision"] = {"name": precision, "derived_from": document["name"], "source_sha256": _sources(document)}
    manifest["calibration"] = {}
    manifest.pop("parity", None)  # measured against torch on the fp32 graphs; not these
    write_manifest(folder, manifest)
    return manifest


def _sources(document: dict[str, Any]) -> dict[str, str]:
    return {role: document["graphs"][role]["sha256"] for role in ("Q", "T", "S")}
