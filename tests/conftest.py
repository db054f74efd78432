"""Shared fixtures: the real MNIST data (fetched once into data/ or $FPN_DATA_ROOT) and paths."""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def server(shipped_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fpn_serve.cli", str(shipped_model), "--port", str(port), "--log-level", "warning"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    deadline = time.monotonic() + 60
    while True:
        try:
            if client.get("/healthz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.close()
            pytest.fail(f"server did not start: {log_path.read_text()}")
        time.sleep(0.2)
    yield client
    client.close()
    proc.terminate()
    proc.wait(timeout=20)
    log.close()
    assert "Traceback" not in log_path.read_text()  # no request made the server crash inside
