"""Settings from FPN_SERVE_* variables and flags, the bearer token, and the request timeout."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from ..conftest import running_server  # type: ignore[import-not-found]
from .synthetic import linear_model

pytestmark = pytest.mark.slow

ONE = {"inputs": np.zeros((1, 1, 28, 28)).tolist()}


@pytest.fixture(scope="module")
def locked(shipped_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    env = {
        "FPN_SERVE_TOKEN": "s3cret",
        "FPN_SERVE_MAX_INPUTS": "2",
        "FPN_SERVE_REQUEST_TIMEOUT_S": "0.05",
        "FPN_SERVE_MAX_ITER_CAP": "20000",
    }
    with running_server(shipped_model, tmp_path_factory.mktemp("locked"), env) as client:
        yield client


def test_the_token_guards_every_route_but_health(locked: httpx.Client) -> None:
    assert locked.get("/healthz").status_code == 200
    assert locked.get("/v2/health/ready").status_code == 200
    for method, path in [("GET", "/models"), ("GET", "/metrics"), ("POST", "/classify"), ("GET", "/v2/models/mnist")]:
        r = locked.request(method, path, json=ONE)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        assert set(r.json()) == ({"error"} if path.startswith("/v2") else {"detail"})
        wrong = locked.request(method, path, json=ONE, headers={"authorization": "Bearer guess"})
        assert wrong.status_code == 401
    ok = locked.post("/classify", json=ONE, headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 200


def test_environment_settings_apply(locked: httpx.Client) -> None:
    auth = {"authorization": "Bearer s3cret"}
    three = {"inputs": np.zeros((3, 1, 28, 28)).tolist()}
    r = locked.post("/classify", json=three, headers=auth)
    assert r.status_code == 413 and "at most 2" in r.json()["detail"]
    noise = np.random.default_rng(0).standard_normal((2, 1, 28, 28))  # never reaches tol=1e-9
    slow = {"inputs": noise.tolist()}
    r = locked.post("/classify", params={"tol": 1e-9, "max_iter": 20000, "solver": "anderson"}, json=slow, headers=auth)
    assert r.status_code == 504 and "deadline_ms" in r.json()["detail"]


@pytest.fixture(scope="module")
def never_done(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose residual is 1/k after k iterations: tol=1e-9 takes max_iter iterations, whatever
    the rounding of the machine."""
    return linear_model(tmp_path_factory.mktemp("never") / "never", scale=1.0)


def test_image_requests_get_the_token_check_and_the_timeout(
    never_done: Path, repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    env = {"FPN_SERVE_TOKEN": "s3cret", "FPN_SERVE_REQUEST_TIMEOUT_S": "0.05", "FPN_SERVE_MAX_ITER_CAP": "20000"}
    with running_server(never_done, tmp_path_factory.mktemp("locked-images"), env) as locked:
        _image_requests_get_the_token_check_and_the_timeout(locked, repo)


def _image_requests_get_the_token_check_and_the_timeout(locked: httpx.Client, repo: Path) -> None:
    png = {"content": (repo / "examples" / "seven.png").read_bytes(), "headers": {"content-type": "image/png"}}
    auth = {"authorization": "Bearer s3cret", "content-type": "image/png"}
    r = locked.post("/classify", **png)  # type: ignore[arg-type]
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    for _ in range(3):
        r = locked.post("/classify", params={"tol": 1e-9, "max_iter": 20000}, content=png["content"], headers=auth)
        assert r.status_code == 504 and "deadline_ms" in r.json()["detail"]
    # The scheduler still runs the timed-out requests; the requests that share the batch with them
    # while they finish are unharmed (at worst late on a busy machine).
    statuses = []
    stop = time.monotonic() + 1.5
    while time.monotonic() < stop:
        r = locked.post("/classify", params={"tol": 1e-2}, content=png["content"], headers=auth)
        statuses.append(r.status_code)
        assert r.status_code in (200, 504), r.text
    assert statuses.count(200) >= 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "--port: Input should be less than or equal to 65535"),
        (["--max-inputs", "0"], "--max-inputs: Input should be greater than or equal to 1"),
        (["--device", "tpu"], "--device: Value error, unknown device 'tpu'; choose one of auto, cpu, cuda, tensorrt"),
    ],
)
def test_bad_flags_get_one_clear_line(args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "fpn_serve.cli", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_shutdown_drains_readiness_first_and_finishes_in_flight_work(never_done: Path, tmp_path: Path) -> None:
    import signal
    import threading
    import time

    from ..conftest import _free_port  # type: ignore[import-not-found]

    port = _free_port()
    env = {**__import__("os").environ, "FPN_SERVE_DRAIN_S": "1.5", "FPN_SERVE_MAX_ITER_CAP": "20000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fpn_serve.cli", str(never_done), "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        for _ in range(300):
            try:
                if client.get("/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        inputs = np.ones((2, 1, 2, 2)).tolist()
        answers: list[httpx.Response] = []
        slow = threading.Thread(
            target=lambda: answers.append(
                client.post("/classify", params={"tol": 1e-9, "max_iter": 20000}, json={"inputs": inputs})
            )
        )
        slow.start()
        time.sleep(0.2)  # the slow request is in flight
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = client.get("/v2/health/ready")
        assert ready.status_code == 503 and ready.json() == {"ready": False}
        assert client.get("/v2/health/live").status_code == 200  # alive while draining
        slow.join(30)
        assert answers and answers[0].status_code == 200  # in-flight work finished
        assert answers[0].json()["predictions"][0]["iterations"] == 20000
        # uvicorn exits cleanly, then re-raises the signal it caught, as a process ended by it should
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0].decode()
    assert "Traceback" not in output


def test_help_never_prints_the_token() -> None:
    env = {**__import__("os").environ, "FPN_SERVE_TOKEN": "topsecret"}
    proc = subprocess.run([sys.executable, "-m", "fpn_serve.cli", "--help"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "--token" in proc.stdout and "topsecret" not in proc.stdout


def test_an_empty_token_means_no_token() -> None:
    from fpn_serve.settings import Settings

    assert Settings(token="").bearer_token is None
    assert Settings(token="x").bearer_token == "x"
    assert Settings().bearer_token is None


def test_a_bad_environment_variable_is_one_clear_line() -> None:
    env = {**__import__("os").environ, "FPN_SERVE_PORT": "abc"}
    proc = subprocess.run([sys.executable, "-m", "fpn_serve.cli"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "FPN_SERVE_PORT: Input should be a valid integer" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_values_json_cannot_hold_are_sent_as_null(never_done: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A model without a contraction certificate (gamma >= 1) has an infinite error bound: JSON null,
    not a failed response."""
    with running_server(never_done, tmp_path_factory.mktemp("uncertified")) as client:
        r = client.post(
            "/classify", params={"tol": 1e-2, "max_iter": 200}, json={"inputs": np.ones((1, 1, 2, 2)).tolist()}
        )
        assert r.status_code == 200, r.text
        prediction = r.json()["predictions"][0]
        assert prediction["error_bound"] is None and prediction["iterations"] == 100 and prediction["converged"]
        doc = {
            "parameters": {"tol": 1e-2, "max_iter": 200},
            "inputs": [{"name": "x", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": [1.0] * 4}],
            "outputs": [{"name": "error_bound"}, {"name": "iterations"}],
        }
        r = client.post("/v2/models/never/infer", json=doc)
        assert r.status_code == 200, r.text
        assert [o["data"] for o in r.json()["outputs"]] == [[None], [100]]
