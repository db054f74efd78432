"""GPU check and timings of the engine on the CUDA execution provider (run by benchmarks/gpu.sh).

1. Correctness: the CUDA engine against the CPU engine on the same inputs (labels, iterations,
   logits), for the single-graph path (fpn.onnx, an ONNX Loop) and the three-graph loop; and the
   scheduler on CUDA (its encoder and stepper threads, 256 concurrent callers with tolerances
   1e-1 .. 1e-6) against the CUDA engine's three-graph loop on each input alone.
2. Latency at batch 1 (median) and throughput at batch 1 .. 4096 for: a plain ``session.run``
   loop over T.onnx (numpy in and out, what a user writes), the engine's IOBinding loop
   (device-resident ping-pong buffers; four iterations per run of steps.onnx, one sync each), the
   single-graph Loop, and step.onnx and steps.onnx replayed as CUDA graphs (fixed batch, every
   buffer bound on the device).

Prints a table and writes benchmarks/results/gpu.json (or $OUT/gpu.json when OUT is set).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import onnxruntime as ort  # noqa: E402

if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels, where present

from fpn_serve import Engine  # noqa: E402
from fpn_serve.batching.scheduler import Scheduler  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import median_seconds  # noqa: E402  (benchmarks/engine.py)


def med(fn: Any, repeats: int, warmup: int = 5) -> float:
    return median_seconds(fn, repeats, warmup)


def inputs(n: int, seed: int = 0) -> np.ndarray:
    from PIL import Image

    from fpn_serve.contract.images import image_to_input

    rng = np.random.default_rng(seed)
    spec = Engine.load(REPO / "models" / "mnist", device="cpu").manifest.input
    digits = [image_to_input(Image.open(REPO / "examples" / f), spec) for f in ("seven.png", "two.png")]
    base = np.stack(digits)
    idx = rng.integers(0, len(base), n)
    return (base[idx] + 0.3 * rng.standard_normal((n, *spec.shape))).astype(np.float32)


def plain_loop(sess_t: ort.InferenceSession, z: np.ndarray, iters: int) -> np.ndarray:
    u = np.zeros_like(z)
    for _ in range(iters):
        u = sess_t.run(["u_next"], {"u": u, "z": z})[0]
    return u


def cuda_graph_step(model_dir: Path, z: np.ndarray, iters: int, graph: str = "step.onnx") -> tuple[float, np.ndarray]:
    """Replay ``graph`` (step.onnx, or steps.onnx: four iterations per run with each row's stop
    inside) as a CUDA graph for about ``iters`` iterations, the residuals copied to the host after
    each replay (what the stopping rule needs); seconds per iteration."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(
        str(model_dir / graph),
        so,
        providers=[("CUDAExecutionProvider", {"enable_cuda_graph": "1", "use_tf32": "0"}), "CPUExecutionProvider"],
    )
    per_run = int(sess.get_modelmeta().custom_metadata_map.get("fpn.steps", "1"))
    n = z.shape[0]
    u = [ort.OrtValue.ortvalue_from_numpy(np.zeros_like(z), "cuda", 0) for _ in range(2)]
    zz = ort.OrtValue.ortvalue_from_numpy(z, "cuda", 0)
    res = ort.OrtValue.ortvalue_from_shape_and_type([n], np.float32, "cuda", 0)
    step = ort.OrtValue.ortvalue_from_shape_and_type([n], np.float32, "cuda", 0)
    limits = {  # steps.onnx: tol 0 (never met), a cap it never reaches, counts from zero
        "tol": np.zeros(n, np.float32),
        "max_iter": np.full(n, 1 << 30, np.int32),
        "iterations": np.zeros(n, np.int32),
    }
    on_device = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in limits.items()}
    counted = ort.OrtValue.ortvalue_from_shape_and_type([n], np.int32, "cuda", 0)
    bindings = []
    for src in (0, 1):
        b = sess.io_binding()
        b.bind_ortvalue_input("u", u[src])
        b.bind_ortvalue_input("z", zz)
        b.bind_ortvalue_output("u_next", u[1 - src])
        b.bind_ortvalue_output("residual", res)
        b.bind_ortvalue_output("step_norm", step)
        if per_run > 1:
            for name, value in on_device.items():
                b.bind_ortvalue_input(name, value)
            b.bind_ortvalue_output("iterations_next", counted)
        bindings.append(b)
    # CUDA graphs replay one captured sequence: run with a fixed binding, copying back each time
    for _ in range(3):
        sess.run_with_iobinding(bindings[0])
    runs = max(1, iters // per_run)
    started = time.perf_counter()
    for _ in range(runs):
        sess.run_with_iobinding(bindings[0])
        res.numpy()  # the stopping rule needs the residuals on the host after every run
    per_iter = (time.perf_counter() - started) / (runs * per_run)
    return per_iter, u[1].numpy()


def check_scheduler(engine: Engine, n: int = 256) -> dict[str, Any]:
    """n concurrent one-input callers through the scheduler, each answer against the same input alone."""
    xs = inputs(n, seed=7)
    tols = [10.0 ** -(1 + i % 6) for i in range(n)]
    scheduler = Scheduler(engine, max_active=256)
    scheduler.start()

    async def everyone() -> list[Any]:
        return list(await asyncio.gather(*(scheduler.submit_async(xs[i : i + 1], tols[i]) for i in range(n))))

    try:
        asyncio.run(everyone())  # warm up
        started = time.perf_counter()
        shared = asyncio.run(everyone())
        elapsed = time.perf_counter() - started
    finally:
        scheduler.stop()
    alone = [engine.decode(engine.solve(engine.encode(xs[i : i + 1]), tols[i], 100), tols[i]) for i in range(n)]
    started = time.perf_counter()
    for i in range(n):
        engine.classify(xs[i : i + 1], tols[i])
    sequential = time.perf_counter() - started
    pairs = list(zip(shared, alone, strict=True))
    return {
        "callers": n,
        "iterations_equal": float(np.mean([a.iterations[0] == b.iterations[0] for a, b in pairs])),
        "labels_equal": float(np.mean([a.labels[0] == b.labels[0] for a, b in pairs])),
        "max_logit_gap": float(max(np.abs(a.logits - b.logits).max() for a, b in pairs)),
        "max_active_seen": scheduler.stats["max_active_seen"],
        "scheduler_requests_per_s": n / elapsed,
        "one_at_a_time_requests_per_s": n / sequential,
    }


def main() -> None:
    model_dir = REPO / "models" / "mnist"
    out_dir = Path(os.environ.get("OUT", REPO / "benchmarks" / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"python": platform.python_version(), "onnxruntime": ort.__version__}
    try:
        import torch

        report["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except ImportError:
        report["gpu"] = None
    print("onnxruntime", ort.__version__, ort.get_available_providers(), "gpu:", report["gpu"], flush=True)

    cpu = Engine.load(model_dir, device="cpu")
    gpu = Engine.load(model_dir, device=os.environ.get("FPN_GPU_DEVICE", "cuda"))  # cpu: a dry run
    print("engine device:", gpu.device, flush=True)

    # 1. correctness
    x = inputs(1024)
    checks = {}
    for name, run in {
        "single_graph": lambda e: e.classify(x, tol=1e-4),
        "three_graph": lambda e: e.decode(e.solve(e.encode(x), 1e-4, 100), 1e-4),
    }.items():
        a, b = run(cpu), run(gpu)
        checks[name] = {
            "labels_equal": float((a.labels == b.labels).mean()),
            "iterations_equal": float((a.iterations == b.iterations).mean()),
            "max_logit_gap": float(np.abs(a.logits - b.logits).max()),
        }
        print(name, checks[name], flush=True)
    report["correctness"] = checks
    report["scheduler"] = check_scheduler(gpu)
    print("scheduler", report["scheduler"], flush=True)

    # 2. latency at batch 1 and throughput at batch 1 .. 4096 (fixed 10 iterations)
    rows = []
    t_sess = gpu._t
    for batch in (1, 16, 256, 1024, 4096):
        xb = inputs(batch, seed=batch)
        z = gpu.encode(xb)
        reps = 200 if batch <= 16 else 30
        row: dict[str, Any] = {"batch": batch}
        row["plain_session_run_loop_ms"] = 1e3 * med(lambda z=z: plain_loop(t_sess, z, 10), reps)
        row["engine_iobinding_loop_ms"] = 1e3 * med(lambda z=z: gpu.solve(z, -1.0, 10), reps)
        row["single_graph_loop_ms"] = 1e3 * med(lambda xb=xb: gpu.classify(xb, tol=0.0, max_iter=10), reps)
        row["engine_classify_tol1e-4_ms"] = 1e3 * med(lambda xb=xb: gpu.classify(xb, tol=1e-4), reps)
        row["cpu_classify_tol1e-4_ms"] = 1e3 * med(lambda xb=xb: cpu.classify(xb, tol=1e-4), max(reps // 10, 3))
        for graph, key in (("step.onnx", "cuda_graph_step"), ("steps.onnx", "cuda_graph_steps")):
            try:
                per_iter, _ = cuda_graph_step(model_dir, z, 200, graph)
                row[f"{key}_us_per_iter"] = 1e6 * per_iter
            except Exception as exc:
                row[f"{key}_us_per_iter"] = f"failed: {exc}"[:200]
        row["throughput_classify_per_s"] = batch / (row["engine_classify_tol1e-4_ms"] / 1e3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    report["timings"] = rows
    (out_dir / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_dir / 'gpu.json'}")


if __name__ == "__main__":
    main()
