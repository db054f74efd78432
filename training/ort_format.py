"""ORT-format copies of a model folder's graphs, for ONNX Runtime's reduced (mobile) builds.

``write_ort`` converts every ``.onnx`` graph of a folder into a ``.ort`` file beside it, with
ONNX Runtime's own converter (fixed optimizations, without the x86-only NCHWc layout, so the
files run on ARM as well), and writes ``required_operators.config``, the operator list that a
reduced build takes (``--include_ops_by_config``). Each ``.ort`` file is then loaded and compared
with its ``.onnx`` on the same inputs; a disagreement is an export error.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from fpn_serve.contract import sha256_file

from .export_graphs import ExportError

OPERATORS_FILE = "required_operators.config"
ORT_ATOL = 1e-5


def write_ort(folder: Path) -> dict[str, Any]:
    """Write ``X.ort`` for every ``X.onnx`` in ``folder`` and the operator configuration; check each;
    return the manifest's ``ort`` record (files with their sha256, the converter's settings)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    graphs = sorted(folder.glob("*.onnx"))
    # the converter logs every file it writes (on the root logger and its own, with this folder's path)
    loggers = [logging.getLogger(), logging.getLogger("ort_format_model.utils")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            convert_onnx_models_to_ort(folder, optimization_styles=[OptimizationStyle.Fixed])
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot convert the graphs to the ORT format: {exc}") from exc
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    config = folder / OPERATORS_FILE
    # the converter's first lines name the folder it ran in: keep only the operator list
    config.write_text("".join(line for line in config.read_text().splitlines(True) if not line.startswith("#")))
    for graph in graphs:
        compare_ort(graph, graph.with_suffix(".ort"))
    return {
        "files": {g.with_suffix(".ort").name: sha256_file(g.with_suffix(".ort")) for g in graphs},
        "operators": {"file": OPERATORS_FILE, "sha256": sha256_file(config)},
        "optimization": "fixed (ONNX Runtime's basic, extended and layout passes, without NCHWc)",
        "onnxruntime": ort.__version__,
    }


def compare_ort(onnx_path: Path, ort_path: Path, batch: int = 4) -> float:
    """Run ``onnx_path`` and ``ort_path`` on the same inputs; return the largest output gap, or raise
    ExportError when they disagree by more than ORT_ATOL (or the .ort file does not load)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        reference = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        converted = ort.InferenceSession(str(ort_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"{ort_path.name} does not load in ONNX Runtime: {exc}") from exc
    feeds = sample_feeds(reference, batch)
    gap = 0.0
    for a, b in zip(reference.run(None, feeds), converted.run(None, feeds), strict=True):
        if a.shape != b.shape:
            raise ExportError(f"{ort_path.name} answers shape {b.shape}; {onnx_path.name} answers {a.shape}")
        gap = max(gap, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0)))
    if gap > ORT_ATOL:
        raise ExportError(f"{ort_path.name} differs from {onnx_path.name} by {gap:.3g} (allowed {ORT_ATOL})")
    return gap


def sample_feeds(session: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    """Inputs for any graph of a model folder: random float tensors (batch ``batch``, or 1 where the
    axis is fixed), tol 1e-4 and max_iter 20 for the looped graphs (a scalar, or one per row for
    steps.onnx, whose rows start at zero iterations)."""
    rng = np.random.default_rng(0)
    integer = {"tensor(int32)": np.int32, "tensor(int64)": np.int64}
    fill = {"tol": 1e-4, "max_iter": 20, "iterations": 0}
    feeds: dict[str, np.ndarray] = {}
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) else batch for d in arg.shape]
        if arg.name in fill:
            feeds[arg.name] = np.full(shape, fill[arg.name], integer.get(arg.type, np.float32))
        else:
            feeds[arg.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds
