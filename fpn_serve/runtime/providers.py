"""Execution providers and session options: which hardware runs the graphs, chosen by what really
initialises, and the ONNX Runtime settings every session of the package uses.

A device is ``auto`` (CUDA when it really initialises, else the CPU), ``cpu``, ``cuda``, or any
other execution provider by its short name (``tensorrt``, ``openvino``, ``coreml``, ``nnapi``,
``qnn``, ``xnnpack``, ...) or full name (``XnnpackExecutionProvider``), with provider options as
``name:key=value,key=value`` (``openvino:device_type=CPU``, ``xnnpack:intra_op_num_threads=2``).
A provider is chosen only when a session on a probe graph keeps it; otherwise the graphs run on
the CPU and the log says why. ``cuda`` alone is strict: it raises rather than fall back.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..errors import ModelError

log = logging.getLogger("fpn_serve")

DEVICES = ("auto", "cpu", "cuda")  # and every name of EXECUTION_PROVIDERS
EXECUTION_PROVIDERS = {
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "dml": "DmlExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "acl": "ACLExecutionProvider",
    "armnn": "ArmNNExecutionProvider",
    "cann": "CANNExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
}
CPU = "CPUExecutionProvider"

# Q on the CPU runs in chunks of this many inputs: per input, a chunk of 8-16 MNIST digits costs
# about half of a batch of 256, whose activations (96 x 24 x 24 floats per digit) leave the caches
# (benchmarks/engine.py --parts q_precision measures it). The answers are the same to the bit.
Q_CHUNK = 16
BATCH_ROLES = ("Q", "fpn")  # the sessions that run a whole batch's convolutions; the rest are tiny


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


def session_threads(role: str, threads: int) -> int:
    """Intra-op threads for the session of ``role``: ``threads`` (0: ONNX Runtime's default) for
    the graphs that do a batch's work (Q, FPN.onnx); one for T, S, step.onnx and FPN1.onnx (one
    input: a second thread costs more in hand-offs than it saves)."""
    return threads if role in BATCH_ROLES else 1


class ChunkedSession(ort.InferenceSession):  # type: ignore[misc]  # onnxruntime ships no types
    """A session whose ``run`` splits a batch along axis 0 into chunks of ``chunk`` inputs (the size
    fastest per input) and concatenates the outputs. For single-input graphs of per-sample maps (Q)."""

    chunk = Q_CHUNK

    def run(self, output_names: Any, input_feed: Any, run_options: Any = None) -> Any:
        (name, x), *rest = input_feed.items()
        if rest or x.shape[0] <= self.chunk:
            return super().run(output_names, input_feed, run_options)
        run, step = super().run, self.chunk  # (a comprehension cannot call super() itself)
        parts = [run(output_names, {name: x[i : i + step]}, run_options) for i in range(0, len(x), step)]
        return [np.concatenate(outs) for outs in zip(*parts, strict=True)]


CHUNKED_PRECISIONS = ("fp32", "int8-static")


def open_session(path: Path, role: str, threads: int, providers: Sequence[Any], precision: str) -> ort.InferenceSession:
    """The session of graph ``role`` of a model folder, with its threads (``session_threads``); Q on
    the CPU alone runs in chunks (``ChunkedSession``)."""
    options = session_options(session_threads(role, threads))
    if precision == "fp16":
        # On the CPU ONNX Runtime runs fp16 graphs in float32 through casts it inserts. In T.onnx
        # and step.onnx a weight's cast folds into a constant whose MatMul is prepacked, and that
        # rounds differently from the same MatMul inside FPN.onnx's or FPN1.onnx's loop (cast at
        # run time): 4 of 96 digits changed iteration counts. Unpacked, every path agrees to the bit.
        options.add_session_config_entry("session.disable_prepacking", "1")
    # Chunks give the one-call answer only where Q's arithmetic does not depend on the batch: not for
    # dynamic int8 (activation ranges per call) nor fp16 (its casts, whose kernels differ by batch size).
    chunked = role == "Q" and list(providers) == [CPU] and precision in CHUNKED_PRECISIONS
    cls = ChunkedSession if chunked else ort.InferenceSession
    return cls(str(path), options, providers=list(providers))


# Exact float32 on CUDA: with TF32 matrix products the residual stalls near 1e-4 and a tight
# tolerance would run to max_iter; the models are small, so the exact arithmetic costs little.
CUDA_PROVIDER = ("CUDAExecutionProvider", {"use_tf32": "0"})


def parse_device(device: str) -> tuple[str, dict[str, str]]:
    """``name[:key=value,...]`` -> (the provider's full name or auto/cpu, its options); raises ModelError."""
    name, _, spec = device.partition(":")
    options: dict[str, str] = {}
    for item in filter(None, spec.split(",")):
        key, eq, val = item.partition("=")
        if not eq or not key:
            raise ModelError(f"device option {item!r} of {device!r} is not key=value")
        options[key.strip()] = val.strip()
    lowered = name.strip().lower()
    if lowered in ("auto", "cpu") and not options:
        return lowered, options
    full = EXECUTION_PROVIDERS.get(lowered) or next(
        (p for p in EXECUTION_PROVIDERS.values() if p.lower() == lowered), None
    )
    if full is None:
        valid = ", ".join([*DEVICES, *list(EXECUTION_PROVIDERS)[1:]])
        raise ModelError(f"unknown device {device!r}; choose one of {valid} (options as name:key=value,...)")
    return full, options


def choose_providers(device: str, probe_graph: Path) -> tuple[list[Any], str]:
    """Pick execution providers by what really initialises, not by what is listed; return them and why.

    ``onnxruntime-gpu`` lists CUDA even on a machine without a GPU, so CUDA is chosen only when
    the driver loads and a session on ``probe_graph`` keeps the CUDA provider; any other provider
    only when a session on ``probe_graph`` keeps it (else the CPU, with a warning that says why).
    Raises ModelError for an unknown device and for ``cuda`` that does not initialise.
    """
    name, options = parse_device(device)
    if name == "cpu":
        return [CPU], "cpu requested"
    if name == "auto" or name == CUDA_PROVIDER[0]:
        if options:
            raise ModelError(f"--device {device}: CUDA provider options are not supported; use cuda or auto")
        return _choose_cuda(strict=name != "auto", probe_graph=probe_graph)
    reason = _try_provider((name, options), probe_graph)
    if reason is None:
        return [(name, options) if options else name, CPU], f"{name} initialised"
    log.warning("--device %s: running on the CPU because %s", device, reason)
    return [CPU], reason


def _try_provider(provider: tuple[str, dict[str, str]], probe_graph: Path) -> str | None:
    """None when a session on ``probe_graph`` keeps ``provider``; else why not."""
    name, options = provider
    available = ort.get_available_providers()
    if name not in available:
        return f"this onnxruntime build has no {name} (it has {', '.join(available)})"
    try:
        sess = ort.InferenceSession(str(probe_graph), session_options(1), providers=[(name, options), CPU])
    except Exception as exc:
        return f"the {name} failed to initialise: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    if sess.get_providers()[0] != name:
        return f"the {name} did not initialise (ONNX Runtime kept {', '.join(sess.get_providers())})"
    return None


def _choose_cuda(strict: bool, probe_graph: Path) -> tuple[list[Any], str]:
    reason = ""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        reason = "this onnxruntime build has no CUDA provider"
    elif not _cuda_driver_present():
        reason = "no CUDA driver on this machine"
    else:
        try:
            providers: list[Any] = [CUDA_PROVIDER, CPU]
            sess = ort.InferenceSession(str(probe_graph), session_options(1), providers=providers)
            if sess.get_providers()[0] == "CUDAExecutionProvider":
                return providers, "CUDA initialised"
            reason = "the CUDA provider did not initialise"
        except Exception as exc:
            reason = f"the CUDA provider failed: {exc}"
    if strict:
        raise ModelError(f"--device cuda was requested but {reason}")
    return [CPU], reason
