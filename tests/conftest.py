"""Shared fixtures: the real MNIST data (fetched once into data/ or $FPN_DATA_ROOT) and paths."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent

# A server a test starts listens for gRPC only where the test asks for a port (FPN_SERVE_GRPC_PORT):
# the default 8001 would be one port for every server of the session.
os.environ.setdefault("FPN_SERVE_GRPC_PORT", "0")
SHIPPED_MODEL = REPO / "models" / "mnist"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    """The committed models/mnist folder that fpn-serve serves by default."""
    return SHIPPED_MODEL


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """A data root holding torchvision's MNIST files (prepared through the real offline path)."""
    pytest.importorskip("torch")
    from training.data import prepare_mnist

    root = Path(os.environ.get("FPN_DATA_ROOT", REPO / "data"))
    prepare_mnist(root)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_up(client: httpx.Client, proc: subprocess.Popen[bytes], path: str, seconds: float = 60) -> bool:
    """Poll ``path`` until it answers 200; False if the process died or time ran out."""
    deadline = time.monotonic() + seconds
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if client.get(path).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return False


@contextlib.contextmanager
def running_server(model: Path, log_dir: Path, env: dict[str, str] | None = None) -> Iterator[httpx.Client]:
    """``fpn-serve MODEL`` as a real uvicorn process on a free loopback port, stopped afterwards."""
    port = _free_port()
    log_path = log_dir / "server.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fpn_serve.cli", str(model), "--port", str(port), "--log-level", "warning"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        if not wait_until_up(client, proc, "/healthz"):
            pytest.fail(f"server did not start: {log_path.read_text()}")
        yield client
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    assert "Traceback" not in log_path.read_text()  # no request made the server crash inside


@pytest.fixture(scope="session")
def server(shipped_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with running_server(shipped_model, tmp_path_factory.mktemp("server")) as client:
        yield client
