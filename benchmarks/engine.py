"""Engine benchmarks: the batch-1 answer by path, per-iteration cost, engine against a torch eager loop,
the scheduler under load.

    python benchmarks/engine.py                     # all parts, shipped model, CPU
    python benchmarks/engine.py --parts iteration   # one part
    python benchmarks/engine.py --quick             # fewer repeats (a smoke run)
    python benchmarks/engine.py --parts q_precision # Q in fp32 and int8-static, chunks, loop threads

Prints a table per part and writes ``benchmarks/results/engine.json`` and
``benchmarks/results/tolerance_curve.png``. Every comparison is measured side by side in one run;
figures are medians. Needs the ``train`` extra (torch, matplotlib) and MNIST under ``--data-root``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fpn_serve import Engine  # noqa: E402
from fpn_serve.batching.scheduler import Scheduler  # noqa: E402
from fpn_serve.runtime.providers import Q_CHUNK, open_session  # noqa: E402

TOLS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def load_digits(data_root: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    from training.data import load_split

    test = load_split("mnist", data_root, train=False, limit=n)
    return test.normalise(test.images).numpy(), test.labels.numpy()


# ------------------------------------------------------------------------------------------------
# torch eager reference over the very weights of the ONNX graphs


def torch_model_from_onnx(model_dir: Path) -> Any:
    """Rebuild the mnist_conv FPN in torch with the initializers of Q.onnx, T.onnx and S.onnx."""
    import onnx
    import torch
    from onnx import numpy_helper

    from training.config import ModelConfig
    from training.fpn import FPN

    def weights(name: str) -> dict[str, torch.Tensor]:
        graph = onnx.load(str(model_dir / name)).graph
        return {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}

    gamma = json.loads((model_dir / "manifest.json").read_text())["provenance"]["model_config"]["gamma"]
    model = FPN(ModelConfig(gamma=gamma)).eval()
    q = {k.removeprefix("q."): v for k, v in weights("Q.onnx").items() if k.startswith("q.")}
    model.Q.load_state_dict(q)
    t_graph = onnx.load(str(model_dir / "T.onnx")).graph
    (w_name,) = [n.input[1] for n in t_graph.node if n.op_type == "MatMul" and n.input[0] == "z"]
    w_t = weights("T.onnx")[w_name]  # W^T, folded by the exporter (the other matrix is gamma W^T)
    model.T.linear.raw.data.copy_(w_t.T)  # ||W|| <= 1: the normalisation is a no-op
    model.S.load_state_dict({"weight": weights("S.onnx")["s.weight"]})
    return model


def torch_eager_classify(model: Any, x: Any, tol: float, max_iter: int) -> Any:
    """The loop a user writes by hand: iterate the whole batch until every residual is <= tol."""
    import torch

    with torch.inference_mode():
        z = model.Q(x)
        w = model.T.weights()
        u = torch.zeros_like(z)
        for _ in range(max_iter):
            u_next = model.T.apply_with(w, u, z)
            res = (u_next - u).norm(dim=1) / (u_next.norm(dim=1) + 1e-6)
            u = u_next
            if bool((res <= tol).all()):
                break
        return model.S(u).softmax(dim=1)


# ------------------------------------------------------------------------------------------------


def bench_batch1(engine: Engine, x_all: np.ndarray, repeats: int, tol: float = 1e-4) -> dict[str, Any]:
    """One input at ``tol``: ``classify`` call after call over 64 test digits (the latency a caller
    sees), then by path, interleaved call by call over the same digits: ``classify`` (FPN1.onnx
    where the folder has it), the FPN1.onnx call alone (``classify`` less validation and the report),
    ``classify`` on the same folder without FPN1.onnx (FPN.onnx, the path before), the three-graph loop
    (Q, the fused step in a Python loop, S), the engine's Q session alone, and Q.onnx alone on one
    thread (as FPN1.onnx runs it)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        older = Path(tmp) / engine.name
        shutil.copytree(engine.model_dir, older)
        manifest = json.loads((older / "manifest.json").read_text())
        if "fpn1" in manifest["graphs"]:
            (older / manifest["graphs"].pop("fpn1")["file"]).unlink()
        (older / "manifest.json").write_text(json.dumps(manifest))
        without = Engine.load(older, device=engine.device)
    xs = [x_all[i : i + 1] for i in range(min(64, len(x_all)))]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    q_one_thread = ort.InferenceSession(str(engine.model_dir / "Q.onnx"), options, providers=["CPUExecutionProvider"])
    prepared = {id(x): engine.prepare(x, tol) for x in xs}  # requests validated once, as a server does
    paths: dict[str, Callable[[np.ndarray], object]] = {
        "classify_ms": lambda x: engine.classify(x, tol=tol),
        "classify_without_fpn1_ms": lambda x: without.classify(x, tol=tol),
        "three_graph_loop_ms": lambda x: engine.decode(engine.solve(engine.encode(x), tol, 100), tol),
        "Q_alone_ms": engine.encode,
        "Q_one_thread_ms": lambda x: q_one_thread.run(["z"], {"x": x}),
    }
    paths["run_prepared_ms"] = lambda x: engine.run(prepared[id(x)])  # FPN1.onnx where the folder has it
    times: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(repeats + 200):
        x = xs[r % len(xs)]
        for name, fn in paths.items():
            t = time.perf_counter()
            fn(x)
            if r >= 200:  # the first rounds warm up
                times[name].append(time.perf_counter() - t)
    # the latency a caller sees: classify alone, call after call over the same digits
    alone = []
    for r in range(repeats + 200):
        x = xs[r % len(xs)]
        t = time.perf_counter()
        engine.classify(x, tol=tol)
        alone.append(time.perf_counter() - t)
    iterations = [int(engine.classify(x, tol=tol).iterations[0]) for x in xs]
    return {
        "tol": tol,
        "inputs": len(xs),
        "mean_iterations": float(np.mean(iterations)),
        "classify_alone_ms": 1e3 * statistics.median(alone[200:]),
        "classify_alone_p90_ms": 1e3 * float(np.percentile(alone[200:], 90)),
        **{name: 1e3 * statistics.median(v) for name, v in times.items()},
    }


def bench_iteration(engine: Engine, x_all: np.ndarray, repeats: int) -> list[dict[str, Any]]:
    """Per-iteration cost of the engine's loop against a bare ``session.run`` of T.onnx."""
    rows = []
    import onnxruntime as ort

    # the bare session, as a user of T.onnx would run it
    t_sess = ort.InferenceSession(str(engine.model_dir / "T.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 32, 256):
        x = x_all[:batch]
        z = engine.encode(x)
        u = np.zeros_like(z)
        bare = median_seconds(lambda u=u, z=z: t_sess.run(["u_next"], {"u": u, "z": z}), repeats)
        long = median_seconds(lambda z=z: engine.solve(z, -1.0, 201), max(repeats // 20, 20), 3)
        short = median_seconds(lambda z=z: engine.solve(z, -1.0, 1), repeats, 20)
        per_iter = (long - short) / 200
        rows.append(
            {
                "batch": batch,
                "bare_T_run_us": bare * 1e6,
                "engine_per_iteration_us": per_iter * 1e6,
                "overhead_pct": 100 * (per_iter / bare - 1),
            }
        )
    return rows


def bench_vs_torch(engine: Engine, x_all: np.ndarray, repeats: int) -> list[dict[str, Any]]:
    import torch

    model = torch_model_from_onnx(engine.model_dir)
    rows = []
    for batch in (1, 256):
        x = x_all[:batch]
        xt = torch.from_numpy(x)
        ours = engine.classify(x, tol=1e-4, max_iter=100)
        ref = torch_eager_classify(model, xt, 1e-4, 100).numpy()
        agree = float((ref.argmax(1) == ours.labels).mean())
        reps = repeats if batch == 1 else max(repeats // 20, 20)
        t_engine = median_seconds(lambda x=x: engine.classify(x, tol=1e-4, max_iter=100), reps)
        t_torch = median_seconds(lambda xt=xt: torch_eager_classify(model, xt, 1e-4, 100), reps)
        rows.append(
            {
                "batch": batch,
                "tol": 1e-4,
                "engine_ms": t_engine * 1e3,
                "torch_eager_ms": t_torch * 1e3,
                "speedup": t_torch / t_engine,
                "label_agreement": agree,
                "engine_mean_iterations": float(ours.iterations.mean()),
            }
        )
    return rows


def _load(
    call: Callable[[np.ndarray, float], Awaitable[object]], x_all: np.ndarray, callers: int, per_caller: int
) -> dict[str, Any]:
    """``callers`` coroutines on one event loop, as the HTTP server's requests are, each send
    ``per_caller`` one-input requests back to back with tolerances cycling 1e-1..1e-6, and yield to
    the loop between requests as a caller on the network does."""
    latencies: dict[float, list[float]] = {t: [] for t in TOLS}

    async def caller(cid: int) -> None:
        for i in range(per_caller):
            tol = TOLS[(cid + i) % len(TOLS)]
            x = x_all[(cid * per_caller + i) % len(x_all)][None]
            t = time.perf_counter()
            await call(x, tol)
            latencies[tol].append(time.perf_counter() - t)
            await asyncio.sleep(0)

    async def everyone() -> float:
        started = time.perf_counter()
        await asyncio.gather(*(caller(c) for c in range(callers)))
        return time.perf_counter() - started

    elapsed = asyncio.run(everyone())
    total = callers * per_caller
    return {
        "requests": total,
        "throughput_rps": total / elapsed,
        "p50_ms": {f"{t:g}": 1e3 * float(np.percentile(v, 50)) for t, v in latencies.items() if v},
        "p99_ms": {f"{t:g}": 1e3 * float(np.percentile(v, 99)) for t, v in latencies.items() if v},
    }


def bench_scheduler(model_dir: Path, x_all: np.ndarray, quick: bool) -> dict[str, Any]:
    """The scheduler against one-at-a-time execution, the engine loaded as ``fpn-serve`` loads it.

    One at a time: each request runs ``engine.classify`` on the loop when its turn comes, as a
    server without batching does (for one input on the CPU, one FPN1.onnx call). The scheduler:
    ``submit_async``, as ``/classify`` does. The two take turns, caller count by caller count, each
    count after an unmeasured warm-up of the scheduler at that load.
    """
    from fpn_serve.batching.registry import serving_threads

    engine = Engine.load(model_dir, device="cpu", threads=serving_threads(0))
    per_caller_total = 600 if quick else 4000
    warm_up = 2000 if quick else 10_000  # requests, about 1.5 s on a 2-core CPU
    scheduler = Scheduler(engine, max_active=256)
    scheduler.start()

    async def sequential(x: np.ndarray, tol: float) -> object:
        return engine.classify(x, tol=tol)

    async def batched(x: np.ndarray, tol: float) -> object:
        return await scheduler.submit_async(x, tol=tol)

    async def alone_ms() -> float:
        times = []
        for i in range(400):
            t = time.perf_counter()
            await scheduler.submit_async(x_all[i % len(x_all)][None], tol=1e-1)
            times.append(time.perf_counter() - t)
            await asyncio.sleep(0)
        return 1e3 * statistics.median(times[100:])

    try:
        alone = asyncio.run(alone_ms())
        rows = []
        for callers in (1, 2, 4, 8, 16, 32, 64):
            per_caller = max(per_caller_total // callers, 10)
            # the same load first, unmeasured: the scheduler's chooser measures its modes at this
            # level (a few quarter-second epochs), as it does in the first seconds of any traffic
            _load(batched, x_all, callers, max(warm_up // callers, 10))
            seq = _load(sequential, x_all, callers, per_caller)
            sch = _load(batched, x_all, callers, per_caller)
            rows.append(
                {
                    "callers": callers,
                    "sequential": seq,
                    "scheduler": sch,
                    "throughput_ratio": sch["throughput_rps"] / seq["throughput_rps"],
                    "tol_0.1_p50_vs_alone": sch["p50_ms"]["0.1"] / alone,
                }
            )
    finally:
        scheduler.stop()
    return {"tol_0.1_alone_ms": alone, "q_threads": serving_threads(0), "rows": rows, "stats": scheduler.stats}


def cpu_description() -> dict[str, Any]:
    """The CPU's model and its instruction sets (``lscpu``), and whether it has int8 dot products."""
    info: dict[str, str] = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}
    except (OSError, subprocess.CalledProcessError):
        pass
    flags = info.get("Flags", "").split()
    vnni = [f for f in flags if "vnni" in f or f.startswith("amx")]
    return {"model": info.get("Model name", platform.processor()), "flags": flags, "int8_dot_product": vnni}


def _interleaved(fns: Mapping[str, Callable[..., object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds of each function, called in turn round after round (side by side)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats + warmup):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            if r >= warmup:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_q_precision(fp32_dir: Path, int8_dir: Path, x_all: np.ndarray, quick: bool) -> dict[str, Any]:
    """Q by precision (fp32, int8-static) in one call at batch 1 and 256 and per input by chunk size, on
    one thread; FPN.onnx at batch 256 and FPN1.onnx at batch 1 on one thread and two. Side by side."""
    import onnxruntime as ort

    def session(path: Path, threads: int) -> Any:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    q = {"fp32": session(fp32_dir / "Q.onnx", 1), "int8-static": session(int8_dir / "Q.onnx", 1)}
    x256 = np.ascontiguousarray(x_all[:256])
    one = {k: (lambda s=s: s.run(["z"], {"x": x256[:1]})) for k, s in q.items()}
    whole = {k: (lambda s=s: s.run(["z"], {"x": x256})) for k, s in q.items()}
    b1 = _interleaved(one, 300 if quick else 3000, 50)
    b256 = _interleaved(whole, 10 if quick else 60, 3)
    # as the engine runs Q: providers.open_session, on one thread, in chunks of Q_CHUNK on the CPU
    served = {
        k: open_session(d / "Q.onnx", "Q", 1, ["CPUExecutionProvider"], k)
        for k, d in (("fp32", fp32_dir), ("int8-static", int8_dir))
    }
    served_fns = {k: (lambda s=s: s.run(["z"], {"x": x256})) for k, s in served.items()}
    served256 = _interleaved(served_fns, 10 if quick else 60, 3)
    chunks = {}
    for c in (1, 8, 16, 32, 64, 256):
        fns = {
            k: (lambda s=s, c=c: [s.run(["z"], {"x": x256[i : i + c]}) for i in range(0, 256, c)]) for k, s in q.items()
        }
        chunks[c] = {k: 1e6 * v / 256 for k, v in _interleaved(fns, 5 if quick else 25, 2).items()}
    feeds = {"tol": np.array(1e-4, np.float32), "max_iter": np.array(100, np.int64)}
    loops: dict[str, float] = {}
    for model_dir in (fp32_dir, int8_dir):
        fpn = {f"{model_dir.name} FPN b256 t{t}": session(model_dir / "FPN.onnx", t) for t in (1, 2)}
        fpn1 = {f"{model_dir.name} FPN1 b1 t{t}": session(model_dir / "FPN1.onnx", t) for t in (1, 2)}
        big = {k: (lambda s=s: s.run(None, {"x": x256, **feeds})) for k, s in fpn.items()}
        small = {k: (lambda s=s: s.run(None, {"x": x256[:1], **feeds})) for k, s in fpn1.items()}
        loops |= _interleaved(big, 5 if quick else 30, 2) | _interleaved(small, 200 if quick else 2000, 50)
    return {
        "cpu": cpu_description(),
        "q_us": {"batch1": {k: 1e6 * v for k, v in b1.items()}, "batch256": {k: 1e6 * v for k, v in b256.items()}},
        "q_speedup": {
            "batch1": b1["fp32"] / b1["int8-static"],
            "batch256": b256["fp32"] / b256["int8-static"],
            "batch256_served": served256["fp32"] / served256["int8-static"],
        },
        "q_served_batch256_us": {k: 1e6 * v for k, v in served256.items()},
        "q_chunk": Q_CHUNK,
        "q_us_per_input_by_chunk": chunks,
        "loops_ms": {k: 1e3 * v for k, v in loops.items()},
    }


def print_q_precision(r: dict[str, Any]) -> None:
    cpu = r["cpu"]
    print(f"\nCPU: {cpu['model']}")
    print(f"flags: {' '.join(cpu['flags'])}")
    if not cpu["int8_dot_product"]:
        print("this CPU has no VNNI/AMX int8 dot products: int8 runs on AVX2/AVX-512 u8 x s8 kernels (measured anyway)")
    print("\nQ by precision, one thread (median us, interleaved)")
    print(f"{'batch':>6} {'fp32':>10} {'int8-static':>12} {'speedup':>8}")
    for b in ("batch1", "batch256"):
        us = r["q_us"][b]
        print(f"{b.removeprefix('batch'):>6} {us['fp32']:>10.1f} {us['int8-static']:>12.1f} {r['q_speedup'][b]:>7.2f}x")
    us = r["q_served_batch256_us"]
    print(f"{'256*':>6} {us['fp32']:>10.1f} {us['int8-static']:>12.1f} {r['q_speedup']['batch256_served']:>7.2f}x")
    print(f"  * as the engine runs Q (providers.open_session): in chunks of {r['q_chunk']} inputs")
    print("\nQ per input over 256 inputs by chunk size, one thread (median us)")
    for c, us in r["q_us_per_input_by_chunk"].items():
        print(f"{c:>6} {us['fp32']:>10.1f} {us['int8-static']:>12.1f}")
    print("\nFused loops at tol 1e-4 by threads (median ms)")
    for k, ms in r["loops_ms"].items():
        print(f"{k:>28} {ms:>9.3f}")


def bench_tolerance_curve(engine: Engine, x: np.ndarray, y: np.ndarray, out_png: Path) -> list[dict[str, Any]]:
    rows = []
    for tol in TOLS:
        res = engine.classify(x, tol=tol)
        one = x[:200]
        t = median_seconds(lambda: [engine.classify(one[i : i + 1], tol=tol) for i in range(len(one))], 5, 1)  # noqa: B023
        rows.append(
            {
                "tol": tol,
                "accuracy": float((res.labels == y).mean()),
                "mean_iterations": float(res.iterations.mean()),
                "batch1_latency_us": 1e6 * t / len(one),
            }
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(6.4, 4))
    tols = [r["tol"] for r in rows]
    ax1.semilogx(tols, [100 * r["accuracy"] for r in rows], "o-", color="tab:blue", label="accuracy")
    ax1.set_xlabel("tolerance (per-sample relative residual)")
    ax1.set_ylabel("test accuracy (%)", color="tab:blue")
    ax1.invert_xaxis()
    ax2 = ax1.twinx()
    ax2.semilogx(tols, [r["batch1_latency_us"] for r in rows], "s--", color="tab:red", label="latency")
    ax2.set_ylabel("batch-1 latency (us)", color="tab:red")
    ax1.set_title(f"{engine.name}: accuracy and latency against tolerance ({len(x)} test images)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REPO / "models" / "mnist")
    p.add_argument("--int8-model", type=Path, default=REPO / "models" / "mnist-int8")
    p.add_argument("--data-root", type=Path, default=REPO / "data")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--parts", nargs="*", default=["batch1", "iteration", "torch", "scheduler", "q_precision", "curve"])
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    repeats = 300 if args.quick else 3000

    engine = Engine.load(args.model, device=args.device)
    x, y = load_digits(args.data_root, 10_000 if "curve" in args.parts else 512)
    report: dict[str, Any] = {
        "model": engine.name,
        "device": engine.device,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    if "batch1" in args.parts:
        b1 = bench_batch1(engine, x, repeats)
        report["batch1"] = b1
        print(
            f"\nOne input at tol={b1['tol']:g} ({b1['inputs']} digits, {b1['mean_iterations']:.2f} iterations), "
            "median ms (by path: interleaved call by call)"
        )
        print(
            f"{'classify alone':>24} {b1['classify_alone_ms']:.4f} (p90 {b1['classify_alone_p90_ms']:.4f}), "
            "call after call"
        )
        for key in ("classify_ms", "run_prepared_ms", "classify_without_fpn1_ms", "three_graph_loop_ms"):
            if key in b1:
                print(f"{key.removesuffix('_ms'):>24} {b1[key]:.4f}")
        for key in ("Q_alone_ms", "Q_one_thread_ms"):
            print(f"{key.removesuffix('_ms'):>24} {b1[key]:.4f}")
    if "iteration" in args.parts:
        rows = bench_iteration(engine, x, repeats)
        report["iteration"] = rows
        print("\nPer-iteration cost (median, us)")
        print(f"{'batch':>6} {'bare T run':>11} {'engine/iter':>12} {'overhead':>9}")
        for r in rows:
            print(
                f"{r['batch']:>6} {r['bare_T_run_us']:>11.2f} {r['engine_per_iteration_us']:>12.2f} "
                f"{r['overhead_pct']:>8.1f}%"
            )
    if "torch" in args.parts:
        rows = bench_vs_torch(engine, x, repeats)
        report["vs_torch"] = rows
        print("\nEngine against a torch eager loop over the same weights, tol=1e-4 (median, ms)")
        print(f"{'batch':>6} {'engine':>9} {'torch':>9} {'speedup':>8} {'iters':>6} {'agree':>6}")
        for r in rows:
            print(
                f"{r['batch']:>6} {r['engine_ms']:>9.4f} {r['torch_eager_ms']:>9.4f} {r['speedup']:>7.2f}x "
                f"{r['engine_mean_iterations']:>6.2f} {r['label_agreement']:>6.3f}"
            )
    if "scheduler" in args.parts:
        sched = bench_scheduler(args.model, x, args.quick)
        report["scheduler"] = sched
        print(f"\nScheduler against one-at-a-time execution (tol=1e-1 alone: {sched['tol_0.1_alone_ms']:.3f} ms)")
        print(
            f"{'callers':>8} {'seq rps':>9} {'sched rps':>10} {'ratio':>6} "
            f"{'p50 1e-1':>9} {'p99 1e-6':>9} {'x alone':>8}"
        )
        for r in sched["rows"]:
            s = r["scheduler"]
            print(
                f"{r['callers']:>8} {r['sequential']['throughput_rps']:>9.0f} {s['throughput_rps']:>10.0f} "
                f"{r['throughput_ratio']:>5.2f}x {s['p50_ms']['0.1']:>8.3f}m {s['p99_ms']['1e-06']:>8.3f}m "
                f"{r['tol_0.1_p50_vs_alone']:>7.2f}x"
            )
    if "q_precision" in args.parts:
        report["q_precision"] = bench_q_precision(args.model, args.int8_model, x, args.quick)
        print_q_precision(report["q_precision"])
    if "curve" in args.parts:
        rows = bench_tolerance_curve(engine, x, y, args.out / "tolerance_curve.png")
        report["tolerance_curve"] = rows
        print(f"\nAccuracy and batch-1 latency against tolerance ({len(x)} test images)")
        print(f"{'tol':>8} {'accuracy':>9} {'iters':>6} {'latency us':>11}")
        for r in rows:
            print(
                f"{r['tol']:>8g} {100 * r['accuracy']:>8.2f}% {r['mean_iterations']:>6.2f} "
                f"{r['batch1_latency_us']:>11.1f}"
            )
    suffix = "" if engine.device == "cpu" else f"_{engine.device}"
    path = args.out / f"engine{suffix}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
