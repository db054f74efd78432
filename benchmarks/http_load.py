"""HTTP load benchmark: concurrent clients against a real fpn-serve on loopback.

    python benchmarks/http_load.py [--clients 32] [--seconds 5]

Starts the server on a free loopback port, then for each scenario runs ``--clients`` concurrent
keep-alive connections for ``--seconds`` with ``wrk`` (Debian package ``wrk``; it costs the
server's two cores far less than a Python client) or, where wrk is absent, asyncio + httpx:
``/healthz`` (the HTTP floor),
``/classify`` with one PNG digit at several tolerances, and ``/v2/models/mnist/infer`` with a JSON
body and with Triton's binary tensor data (a raw input, binary outputs: tritonclient's default). Prints
throughput, p50 and p99 latency and errors, and writes benchmarks/results/http_load.json. Every
request loop is bounded in time and count and goes only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
MAX_REQUESTS = 200_000  # per scenario, a hard bound besides the time limit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(model: Path, *options: str) -> Iterator[str]:
    """``fpn-serve MODEL`` on a free loopback port (with ``options``, at log level warning, without
    a shutdown drain), until it answers ``/healthz``; yields its base URL, and stops it afterwards."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fpn_serve.cli", str(model), "--port", str(port), "--log-level", "warning", *options],
        env={**os.environ, "FPN_SERVE_DRAIN_S": "0"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def scenario(base: str, clients: int, seconds: float, request: dict[str, Any]) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:

        async def one_client() -> None:
            nonlocal errors
            while time.perf_counter() < stop and len(latencies) + errors < MAX_REQUESTS:
                t = time.perf_counter()
                try:
                    r = await client.request(**request)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1

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
        "client": "httpx",
    }


def wrk_scenario(base: str, clients: int, seconds: float, request: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Run one scenario with wrk (a Lua script sets the method, headers and body)."""
    body = request.get("content")
    if body is None and "json" in request:
        body = json.dumps(request["json"]).encode()
    headers = dict(request.get("headers", {}))
    if "json" in request:
        headers["content-type"] = "application/json"
    lines = [f'wrk.method = "{request["method"]}"']
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    if body is not None:
        (tmp / "body.bin").write_bytes(body)
        lines.append(f'local f = io.open("{tmp / "body.bin"}", "rb"); wrk.body = f:read("*all"); f:close()')
    script = tmp / "request.lua"
    script.write_text("\n".join(lines) + "\n")
    url = base + request["url"]
    if request.get("params"):
        url += "?" + "&".join(f"{k}={v}" for k, v in request["params"].items())
    out = subprocess.run(
        ["wrk", "-t2", f"-c{clients}", f"-d{round(seconds)}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout

    def ms(token: str) -> float:
        value = float(token[:-2] if token.endswith("ms") else token[:-2] if token.endswith("us") else token[:-1])
        return value / 1000 if token.endswith("us") else value if token.endswith("ms") else value * 1000

    pct = {line.split()[0]: ms(line.split()[1]) for line in out.splitlines() if line.strip().startswith(("50%", "99%"))}
    total = int(next(line.split()[0] for line in out.splitlines() if "requests in" in line))
    bad = sum(int(line.split()[-1]) for line in out.splitlines() if "Non-2xx" in line)
    errors = bad + sum(
        int(n)
        for line in out.splitlines()
        if "Socket errors" in line
        for n in line.replace(",", " ").split()
        if n.isdigit()
    )
    rps = float(next(line.split()[1] for line in out.splitlines() if line.startswith("Requests/sec")))
    return {
        "requests": total - bad,
        "errors": errors,
        "throughput_rps": rps * (total - bad) / max(total, 1),
        "p50_ms": pct.get("50%", 0.0),
        "p99_ms": pct.get("99%", 0.0),
        "client": "wrk",
    }


def binary_request(x: np.ndarray, tol: float) -> dict[str, Any]:
    """A v2 infer request as tritonclient.http sends it by default: the input as raw bytes after
    the JSON header, every output asked in binary."""
    raw = x.astype("<f4").tobytes()
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
    header = json.dumps({"inputs": [tensor], "parameters": {"tol": tol, "binary_data_output": True}}).encode()
    return {
        "method": "POST",
        "url": "/v2/models/mnist/infer",
        "content": header + raw,
        "headers": {"content-type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--model", type=Path, default=REPO / "models" / "mnist")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "http_load.json")
    p.add_argument(
        "--only", default="", help="run only the scenarios whose name contains this text (healthz always runs)"
    )
    args = p.parse_args()

    png = (REPO / "examples" / "seven.png").read_bytes()
    x = np.zeros((1, 1, 28, 28), np.float32)
    v2 = {
        "inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": x.ravel().tolist()}],
        "parameters": {"tol": 1e-3},
    }
    scenarios: dict[str, dict[str, Any]] = {"healthz": {"method": "GET", "url": "/healthz"}}
    for tol in (1e-1, 1e-3, 1e-6):
        scenarios[f"classify tol={tol:g}"] = {
            "method": "POST",
            "url": "/classify",
            "params": {"tol": tol},
            "content": png,
            "headers": {"content-type": "image/png"},
        }
    scenarios["v2 infer tol=1e-3"] = {"method": "POST", "url": "/v2/models/mnist/infer", "json": v2}
    scenarios["v2 binary tol=1e-3"] = binary_request(x, tol=1e-3)
    scenarios = {k: v for k, v in scenarios.items() if k == "healthz" or args.only in k}

    results = {}
    with serving(args.model) as base, tempfile.TemporaryDirectory() as tmp:
        for name, request in scenarios.items():
            if shutil.which("wrk"):
                results[name] = wrk_scenario(base, args.clients, args.seconds, request, Path(tmp))
            else:
                results[name] = asyncio.run(scenario(base, args.clients, args.seconds, request))
    floor = results["healthz"]["throughput_rps"]
    print(f"\n{args.clients} concurrent clients, {args.seconds:g} s each, loopback")
    print(f"{'scenario':<22} {'req/s':>8} {'of healthz':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for name, r in results.items():
        r["fraction_of_healthz"] = r["throughput_rps"] / floor
        print(
            f"{name:<22} {r['throughput_rps']:>8.0f} {100 * r['fraction_of_healthz']:>9.0f}% "
            f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['errors']:>7}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"clients": args.clients, "seconds": args.seconds, "results": results}, indent=2) + "\n"
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
