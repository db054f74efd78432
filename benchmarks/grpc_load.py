"""gRPC load benchmark: ModelInfer beside HTTP v2 binary, the same inputs, one real fpn-serve.

    python benchmarks/grpc_load.py [--clients 32] [--seconds 5] [--tol 1e-3] [--batch 1]

Starts the server on free loopback ports (HTTP and gRPC), then runs ``--clients`` concurrent
callers for ``--seconds`` each: gRPC ModelInfer with raw input bytes and raw outputs (what
tritonclient.grpc sends and expects) on grpc.aio stubs over one channel, and HTTP v2 with Triton's
binary tensor data (benchmarks/http_load.py's request) on asyncio + httpx, so that both
protocols are driven by the same kind of Python client; with ``wrk`` installed (Debian package
``wrk``) HTTP binary is also measured with it, a client that costs the server's cores far less.
The input is the example digit (examples/seven.png) for every request. Prints throughput, p50 and
p99 latency and errors, and writes benchmarks/results/grpc_load.json. Every request loop is
bounded in time and count and goes only to 127.0.0.1.

From another benchmark (``http_load.py``), with a server already up::

    from grpc_load import grpc_scenario
    result = asyncio.run(grpc_scenario("127.0.0.1:8001", clients=32, seconds=5, x=x, tol=1e-3))
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # http_load beside this file

from http_load import binary_request, free_port, scenario, serving, wrk_scenario

from fpn_serve.grpc import grpc_service_pb2 as pb
from fpn_serve.grpc import grpc_service_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
MAX_REQUESTS = 200_000  # per scenario, a hard bound besides the time limit


def infer_request(x: np.ndarray, tol: float, model: str = "mnist") -> pb.ModelInferRequest:
    """A ModelInfer request as tritonclient.grpc builds it: the input as raw little-endian bytes,
    no outputs named (every output comes back, raw)."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    request.parameters["tol"].double_param = tol
    return request


async def grpc_scenario(
    address: str, clients: int, seconds: float, x: np.ndarray, tol: float, *, model: str = "mnist", token: str = ""
) -> dict[str, Any]:
    """``clients`` concurrent ModelInfer callers on one grpc.aio channel for ``seconds``; the same
    keys as http_load's scenarios (requests, errors, throughput_rps, p50_ms, p99_ms, client)."""
    request = infer_request(x, tol, model)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await stub.ServerReady(pb.ServerReadyRequest(), timeout=10)
        stop = time.perf_counter() + seconds

        async def one_client() -> None:
            nonlocal errors
            while time.perf_counter() < stop and len(latencies) + errors < MAX_REQUESTS:
                t = time.perf_counter()
                try:
                    await stub.ModelInfer(request, metadata=metadata, timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                else:
                    latencies.append(time.perf_counter() - t)

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    lat = np.asarray(latencies) * 1e3 if latencies else np.zeros(1)
    return {
        "requests": len(latencies),
        "errors": errors,
        "throughput_rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "client": "grpc.aio",
    }


def example_digit(model: Path, batch: int) -> np.ndarray:
    """examples/seven.png as the model's normalised input, repeated ``batch`` times: [batch, 1, 28, 28]."""
    from fpn_serve import load_manifest
    from fpn_serve.contract.images import images_to_batch

    spec = load_manifest(model).input
    return np.repeat(images_to_batch([(REPO / "examples" / "seven.png").read_bytes()], spec), batch, axis=0)


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    x = example_digit(args.model, args.batch)
    grpc_port = free_port()
    results: dict[str, dict[str, Any]] = {}
    with serving(args.model, "--grpc-port", str(grpc_port)) as base:
        tag = f"tol={args.tol:g} batch={args.batch}"
        results[f"grpc ModelInfer {tag}"] = asyncio.run(
            grpc_scenario(f"127.0.0.1:{grpc_port}", args.clients, args.seconds, x, args.tol)
        )
        http = binary_request(x, tol=args.tol)
        results[f"http v2 binary {tag}"] = asyncio.run(scenario(base, args.clients, args.seconds, http))
        if shutil.which("wrk"):
            with tempfile.TemporaryDirectory() as tmp:
                results[f"http v2 binary {tag} (wrk)"] = wrk_scenario(base, args.clients, args.seconds, http, Path(tmp))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=1, help="inputs per request")
    p.add_argument("--model", type=Path, default=REPO / "models" / "mnist")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "grpc_load.json")
    args = p.parse_args()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if shutil.which("lscpu") else ""
    model_line = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "")
    results = run(args)
    print(f"\n{args.clients} concurrent clients, {args.seconds:g} s each, loopback; {model_line or platform.machine()}")
    print(f"{'scenario':<40} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for name, r in results.items():
        print(f"{name:<40} {r['throughput_rps']:>8.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['errors']:>7}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"clients": args.clients, "seconds": args.seconds, "cpu": model_line, "results": results}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
