"""Execution providers and session options: which hardware runs the graphs, chosen by what really
initialises, and the ONNX Runtime settings every session of the package uses."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import onnxruntime as ort

from ..errors import ModelError

DEVICES = ("auto", "cpu", "cuda")


def _cuda_driver_present() -> bool:
    for lib in ("libcuda.so.1", "nvcuda.dll"):
        try:
            ctypes.CDLL(lib)
            return True
        except OSError:
            continue
    return False


def session_options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # Idle pool threads sleep instead of spinning: a server shares its cores with the HTTP loop.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


# Exact float32 on CUDA: with TF32 matrix products the residual stalls near 1e-4 and a tight
# tolerance would run to max_iter; the models are small, so the exact arithmetic costs little.
CUDA_PROVIDER = ("CUDAExecutionProvider", {"use_tf32": "0"})


def choose_providers(device: str, probe_graph: Path) -> tuple[list[Any], str]:
    """Pick execution providers by what really initialises, not by what is listed.

    ``onnxruntime-gpu`` lists CUDA even on a machine without a GPU, so CUDA is chosen only when
    the driver loads and a session on ``probe_graph`` keeps the CUDA provider.
    """
    if device not in DEVICES:
        raise ModelError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cpu":
        return ["CPUExecutionProvider"], "cpu requested"
    reason = ""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        reason = "this onnxruntime build has no CUDA provider"
    elif not _cuda_driver_present():
        reason = "no CUDA driver on this machine"
    else:
        try:
            providers: list[Any] = [CUDA_PROVIDER, "CPUExecutionProvider"]
            sess = ort.InferenceSession(str(probe_graph), session_options(1), providers=providers)
            if sess.get_providers()[0] == "CUDAExecutionProvider":
                return providers, "CUDA initialised"
            reason = "the CUDA provider did not initialise"
        except Exception as exc:
            reason = f"the CUDA provider failed: {exc}"
    if device == "cuda":
        raise ModelError(f"--device cuda was requested but {reason}")
    return ["CPUExecutionProvider"], reason
