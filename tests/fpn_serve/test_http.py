"""A real uvicorn server on a free loopback port, serving the shipped MNIST model."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digit_pngs(mnist_root: Path) -> list[tuple[bytes, int]]:
    from training.data import load_split

    test = load_split("mnist", mnist_root, train=False, limit=20)
    out = []
    for img, label in zip(test.images[:, 0].numpy(), test.labels.tolist(), strict=True):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append((buf.getvalue(), label))
    return out


def _noise_png(size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _png(width: int, height: int, mode: str = "L", color: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def test_the_readme_example_answers_seven(server: httpx.Client, repo: Path) -> None:
    png = (repo / "examples" / "seven.png").read_bytes()
    r = server.post("/classify", params={"tol": 1e-3}, files={"file": ("seven.png", png, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "mnist" and body["latency_ms"] > 0
    (pred,) = body["predictions"]
    assert pred["label"] == "7" and pred["converged"] and 1 <= pred["iterations"] <= 100
    assert pred["residual"] <= 1e-3 and abs(sum(pred["probabilities"]) - 1) < 1e-4


def test_real_test_digits_are_classified_correctly(server: httpx.Client, digit_pngs: list[tuple[bytes, int]]) -> None:
    for png, label in digit_pngs:
        r = server.post("/classify", content=png, headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["label"] == str(label)


def test_json_batch_keeps_order_and_loose_tol_costs_no_more(server: httpx.Client, mnist_root: Path) -> None:
    from training.data import load_split

    test = load_split("mnist", mnist_root, train=False, limit=32)
    inputs = test.normalise(test.images).numpy().tolist()
    loose = server.post("/classify", params={"tol": 1e-1}, json={"inputs": inputs}).json()["predictions"]
    tight = server.post("/classify", params={"tol": 1e-6}, json={"inputs": inputs}).json()["predictions"]
    assert [p["label"] for p in tight] == [str(v) for v in test.labels.tolist()]
    assert all(a["iterations"] <= b["iterations"] for a, b in zip(loose, tight, strict=True))
    assert sum(p["iterations"] for p in loose) < sum(p["iterations"] for p in tight)


def test_models_and_health(server: httpx.Client) -> None:
    (info,) = server.get("/models").json()
    assert info["name"] == "mnist" and info["input_shape"] == [1, 28, 28]
    assert len(info["calibration"]["tolerances"]) == 6 and info["calibration"]["fixed_iterations"]
    assert server.get("/healthz").json()["status"] == "ok"


GOOD_JSON = {"inputs": np.zeros((1, 1, 28, 28)).tolist()}
BAD_REQUESTS = [
    (
        "not an image",
        {"content": b"hello, world", "headers": {"content-type": "image/png"}},
        400,
        "not a readable image",
    ),
    (
        "truncated png",
        {"content": _noise_png()[:2000], "headers": {"content-type": "image/png"}},
        400,
        "corrupt or truncated",
    ),
    ("empty body", {"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty"),
    ("pixel bomb", {"content": _png(6000, 6000, "1"), "headers": {"content-type": "image/png"}}, 413, "pixels"),
    ("wrong content type", {"content": b"abc", "headers": {"content-type": "text/plain"}}, 415, "image/png"),
    ("multipart without file", {"files": {"image": ("a.png", _png(28, 28), "image/png")}}, 400, "no 'file' field"),
    (
        "body too large",
        {"content": b"\0" * (4 * 1024 * 1024 + 1), "headers": {"content-type": "image/png"}},
        413,
        "at most",
    ),
    ("invalid json", {"content": b"{inputs:", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ("json wrong key", {"json": {"images": [1]}}, 422, '{"inputs": [...]}'),
    ("json wrong shape", {"json": {"inputs": [[1.0, 2.0]]}}, 422, "expected [n, 1, 28, 28]"),
    ("json ragged", {"json": {"inputs": [[1.0], [1.0, 2.0]]}}, 422, "regular nested list"),
    ("json strings", {"json": {"inputs": [[["a"] * 28] * 28]}}, 422, "numbers"),
    (
        "json NaN",
        {
            "content": json.dumps({"inputs": [[[[float("nan")] * 28] * 28]]}).encode(),
            "headers": {"content-type": "application/json"},
        },
        422,
        "NaN or infinite",
    ),
    (
        "json Infinity",
        {
            "content": json.dumps({"inputs": [[[[float("inf")] * 28] * 28]]}).encode(),
            "headers": {"content-type": "application/json"},
        },
        422,
        "NaN or infinite",
    ),
    ("tol zero", {"params": {"tol": 0}, "json": GOOD_JSON}, 422, "tol: Input should be greater than 0"),
    ("tol negative", {"params": {"tol": -1}, "json": GOOD_JSON}, 422, "greater than 0"),
    ("tol above one", {"params": {"tol": 1.5}, "json": GOOD_JSON}, 422, "less than or equal to 1"),
    ("tol not a number", {"params": {"tol": "abc"}, "json": GOOD_JSON}, 422, "valid number"),
    ("tol nan", {"params": {"tol": "nan"}, "json": GOOD_JSON}, 422, "tol"),
    ("max_iter zero", {"params": {"max_iter": 0}, "json": GOOD_JSON}, 422, "greater than or equal to 1"),
    ("max_iter over cap", {"params": {"max_iter": 1001}, "json": GOOD_JSON}, 422, "from 1 to 1000"),
    ("max_iter text", {"params": {"max_iter": "many"}, "json": GOOD_JSON}, 422, "valid integer"),
    ("unknown model", {"params": {"model": "cifar"}, "json": GOOD_JSON}, 404, "available: mnist"),
    ("too many inputs", {"json": {"inputs": [[[[0.0] * 28] * 28]] * 257}}, 413, "at most 256"),
    ("too many files", {"files": [("file", ("d.png", _png(28, 28), "image/png"))] * 257}, 413, "at most 256"),
    (
        "json nested too deeply",
        {
            "content": b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "headers": {"content-type": "application/json"},
        },
        400,
        "nested too deeply",
    ),
    ("json booleans", {"json": {"inputs": [[[[True] * 28] * 28]]}}, 422, "true/false"),
    ("json huge numbers", {"json": {"inputs": [[[[3e38] * 28] * 28]]}}, 422, "must lie within"),
]


@pytest.mark.parametrize(
    ("case", "request_kwargs", "status", "message"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_input_gets_a_clear_4xx(
    server: httpx.Client, case: str, request_kwargs: dict[str, object], status: int, message: str
) -> None:
    r = server.post("/classify", **request_kwargs)  # type: ignore[arg-type]
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and message in detail


def test_server_still_serves_correctly_after_bad_input(server: httpx.Client, repo: Path) -> None:
    for _, kwargs, _, _ in BAD_REQUESTS[:6]:
        server.post("/classify", **kwargs)  # type: ignore[arg-type]
    png = (repo / "examples" / "seven.png").read_bytes()
    r = server.post("/classify", files={"file": ("seven.png", png, "image/png")})
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "7"


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}}" if want else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests_iterations_and_failures(server: httpx.Client, repo: Path) -> None:
    before = server.get("/metrics").text
    png = (repo / "examples" / "seven.png").read_bytes()
    for _ in range(3):
        assert server.post("/classify", content=png, headers={"content-type": "image/png"}).status_code == 200
    assert (
        server.post("/classify", params={"tol": 7}, content=png, headers={"content-type": "image/png"}).status_code
        == 422
    )
    assert (
        server.post(
            "/classify", params={"tol": 1e-9, "max_iter": 2}, content=png, headers={"content-type": "image/png"}
        ).status_code
        == 200
    )
    after = server.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    ok = ("fpn_requests_total", {"route": "/classify", "status": "200"})
    bad = ("fpn_requests_total", {"route": "/classify", "status": "422"})
    assert _metric(text, ok[0], **ok[1]) - _metric(before, ok[0], **ok[1]) == 4
    assert _metric(text, bad[0], **bad[1]) - _metric(before, bad[0], **bad[1]) == 1
    assert (
        _metric(text, "fpn_iterations_count", model="mnist") - _metric(before, "fpn_iterations_count", model="mnist")
        == 4
    )
    assert (
        _metric(text, "fpn_not_converged_total", model="mnist")
        - _metric(before, "fpn_not_converged_total", model="mnist")
        == 1
    )
    assert "fpn_queue_depth" in text and "fpn_active_batch" in text and "fpn_request_seconds_bucket" in text


def test_top_k_answers_the_most_probable_classes(server: httpx.Client, repo: Path) -> None:
    png = (repo / "examples" / "seven.png").read_bytes()
    pred = server.post("/classify", params={"top_k": 3}, content=png, headers={"content-type": "image/png"}).json()[
        "predictions"
    ][0]
    assert "probabilities" not in pred
    ranked = pred["top_k"]
    assert ranked[0]["label"] == "7" and len(ranked) == 3
    assert [r["probability"] for r in ranked] == sorted((r["probability"] for r in ranked), reverse=True)
    for k in (0, 11):
        r = server.post("/classify", params={"top_k": k}, content=png, headers={"content-type": "image/png"})
        assert r.status_code == 422 and "top_k" in r.json()["detail"]


def test_a_client_that_hangs_up_mid_body_leaves_no_traceback(shipped_model: Path, tmp_path: Path) -> None:
    import socket
    import time

    from ..conftest import running_server  # type: ignore[import-not-found]

    with running_server(shipped_model, tmp_path) as client:
        port = client.base_url.port
        assert port is not None
        for path in ("/v2/models/mnist/infer", "/classify"):
            head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(head.encode() + b'{"inputs": [')  # then hang up with most of the body unsent
                time.sleep(0.2)
        time.sleep(0.3)
        assert client.get("/healthz").status_code == 200
    log = (tmp_path / "server.log").read_text()
    assert "Exception in ASGI application" not in log and "Traceback" not in log


# --- abandoned work leaves the shared batch ------------------------------------------------------

ENDLESS = 10**8  # iterations: minutes of work on a model that never meets tol=1e-9


@pytest.fixture(scope="module")
def never_done(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose residual is 1/k after k iterations: tol=1e-9 runs until max_iter."""
    from .synthetic import linear_model

    return linear_model(tmp_path_factory.mktemp("never") / "never", scale=1.0)


def _active(client: httpx.Client) -> float:
    return _metric(client.get("/metrics").text, "fpn_active_batch", model="never")


def _until(condition: Any, seconds: float) -> float | None:
    """Poll ``condition`` until it holds; the seconds that took, or None if it never did."""
    import time

    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if condition():
            return time.monotonic() - started
    return None


ENDLESS_REQUESTS = [
    ("/classify?tol=1e-9&max_iter=100000000", {"inputs": np.ones((2, 1, 2, 2)).tolist()}),
    (
        "/v2/models/never/infer",
        {
            "parameters": {"tol": 1e-9, "max_iter": ENDLESS},
            "inputs": [{"name": "x", "shape": [2, 1, 2, 2], "datatype": "FP32", "data": [1.0] * 8}],
        },
    ),
]


def test_a_client_that_hangs_up_leaves_the_shared_batch(never_done: Path, tmp_path: Path) -> None:
    import socket

    from ..conftest import running_server  # type: ignore[import-not-found]

    with running_server(never_done, tmp_path, {"FPN_SERVE_MAX_ITER_CAP": str(ENDLESS)}) as client:
        port = client.base_url.port
        assert port is not None
        for target, doc in ENDLESS_REQUESTS:
            body = json.dumps(doc).encode()
            head = (
                f"POST {target} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(head.encode() + body)
                assert _until(lambda: _active(client) == 2, 10) is not None, target  # both rows iterate
            # hung up: the rows leave at the scheduler's next iteration
            took = _until(lambda: _active(client) == 0, 5)
            print(f"{target}: the rows left {took} s after the hang-up")
            assert took is not None and took < 0.25, (target, took)
        gone = _metric(client.get("/metrics").text, "fpn_abandoned_total", model="never", reason="client_gone")
        assert gone == 2 and client.get("/healthz").status_code == 200


def test_a_timed_out_request_leaves_the_shared_batch(never_done: Path, tmp_path: Path) -> None:
    from ..conftest import running_server  # type: ignore[import-not-found]

    env = {"FPN_SERVE_MAX_ITER_CAP": str(ENDLESS), "FPN_SERVE_REQUEST_TIMEOUT_S": "0.3"}
    with running_server(never_done, tmp_path, env) as client:
        for target, doc in ENDLESS_REQUESTS:
            r = client.post(target, json=doc)
            assert r.status_code == 504 and "deadline_ms" in r.json()["error" if "/v2" in target else "detail"]
            took = _until(lambda: _active(client) == 0, 5)
            assert took is not None and took < 0.25, (target, took)
