"""The Open Inference Protocol (KServe v2) routes on a real server, as a v2 client uses them."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits(mnist_root: Path) -> tuple[np.ndarray, np.ndarray]:
    from training.data import load_split

    test = load_split("mnist", mnist_root, train=False, limit=16)
    return test.normalise(test.images).numpy(), test.labels.numpy()


def _request(x: np.ndarray, **extra: object) -> dict[str, object]:
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}], **extra}


def test_health_and_metadata(server: httpx.Client) -> None:
    assert server.get("/v2/health/live").json() == {"live": True}
    assert server.get("/v2/health/ready").json() == {"ready": True}
    assert server.get("/v2").json()["name"] == "fpn-serve"
    meta = server.get("/v2/models/mnist").json()
    assert meta["name"] == "mnist" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
        "logits": "FP32",
        "probabilities": "FP32",
        "label": "INT64",
        "iterations": "INT32",
        "residual": "FP32",
        "converged": "BOOL",
        "error_bound": "FP32",
        "label_certified": "BOOL",
    }
    assert set(server.get("/v2").json()["extensions"]) == {"binary_tensor_data", "model_repository"}
    assert server.get("/v2/models/mnist/versions/1").json() == meta
    assert server.get("/v2/models/mnist/ready").json() == {"name": "mnist", "ready": True}
    for path in ("/v2/models/cifar", "/v2/models/cifar/ready", "/v2/models/mnist/versions/7"):
        r = server.get(path)
        assert r.status_code == 404 and "error" in r.json()


def test_infer_answers_named_tensors_like_classify(server: httpx.Client, digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    r = server.post("/v2/models/mnist/infer", json=_request(x, id="req-1", parameters={"tol": 1e-3}))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "mnist" and body["id"] == "req-1"
    out = {o["name"]: o for o in body["outputs"]}
    assert out["label"]["datatype"] == "INT64" and out["label"]["shape"] == [16]
    assert out["label"]["data"] == y.tolist()
    assert out["logits"]["shape"] == [16, 10] and len(out["logits"]["data"]) == 160
    assert out["converged"]["datatype"] == "BOOL" and all(out["converged"]["data"])
    classify = server.post("/classify", params={"tol": 1e-3}, json={"inputs": x.tolist()}).json()["predictions"]
    assert out["iterations"]["data"] == [p["iterations"] for p in classify]
    np.testing.assert_allclose(
        np.asarray(out["probabilities"]["data"]).reshape(16, 10), [p["probabilities"] for p in classify], atol=1e-6
    )


def test_infer_takes_nested_data_parameters_and_an_output_selection(
    server: httpx.Client, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x = digits[0][:4]
    loose = server.post(
        "/v2/models/mnist/versions/1/infer",
        json={
            "inputs": [{"name": "x", "shape": [4, 1, 28, 28], "datatype": "FP32", "data": x.tolist()}],
            "parameters": {"tol": 0.1},
            "outputs": [{"name": "iterations"}],
        },
    ).json()
    tight = server.post("/v2/models/mnist/infer", json=_request(x, parameters={"tol": 1e-6, "max_iter": 200})).json()
    assert [o["name"] for o in loose["outputs"]] == ["iterations"]
    tight_iters = next(o for o in tight["outputs"] if o["name"] == "iterations")["data"]
    assert all(a <= b for a, b in zip(loose["outputs"][0]["data"], tight_iters, strict=True))
    assert sum(loose["outputs"][0]["data"]) < sum(tight_iters)


X1 = np.zeros((1, 1, 28, 28), np.float32)
X = _request(X1)["inputs"][0]  # type: ignore[index]
BAD = [
    ("not json", b"{inputs", "not valid JSON"),
    ("no inputs", {"outputs": []}, "'inputs' must be a list"),
    ("missing input", {"inputs": []}, "input 'x' is missing"),
    ("unknown input", {"inputs": [{**X, "name": "nope"}]}, "unknown input 'nope'; the model's only input is 'x'"),
    ("unnamed input", {"inputs": [{k: v for k, v in X.items() if k != "name"}]}, "needs a 'name'"),
    ("duplicate input", {"inputs": [X, X]}, "input 'x' is given 2 times"),
    ("extra input", {"inputs": [X, {**X, "name": "y"}]}, "unknown input 'y'"),
    ("datatype", {"inputs": [{**X, "datatype": "INT8"}]}, "has datatype 'INT8'; the model takes FP32"),
    ("shape", {"inputs": [{**X, "shape": [1, 784]}]}, "the model takes [-1, 1, 28, 28]"),
    ("shape of strings", {"inputs": [{**X, "shape": ["1", 1, 28, 28]}]}, "list of integers"),
    ("negative shape", {"inputs": [{**X, "shape": [-1, 1, 28, 28]}]}, "negative dimension"),
    ("no rows", {"inputs": [{**X, "shape": [0, 1, 28, 28], "data": []}]}, "N >= 1"),
    ("data length", {"inputs": [{**X, "data": [0.0] * 10}]}, "has 10 elements; shape [1, 1, 28, 28] needs 784"),
    ("data strings", {"inputs": [{**X, "data": ["a"] * 784}]}, "only numbers"),
    ("no data", {"inputs": [{k: v for k, v in X.items() if k != "data"}]}, "has no 'data'"),
    ("binary size without header", {"inputs": [{**X, "parameters": {"binary_data_size": 0}}]}, "no Inference-Header"),
    ("bad tol", _request(X1, parameters={"tol": 0}), "0 < tol <= 1"),
    ("bad max_iter", _request(X1, parameters={"max_iter": 10**6}), "from 1 to 1000"),
    ("bad solver", _request(X1, parameters={"solver": "newton"}), "unknown solver"),
    ("unknown output", _request(X1, outputs=[{"name": "softmax"}]), "unknown output 'softmax'; the model's outputs"),
    ("duplicate output", _request(X1, outputs=[{"name": "label"}, {"name": "label"}]), "more than once"),
    ("binary flag", _request(X1, outputs=[{"name": "label", "parameters": {"binary_data": 1}}]), "true or false"),
    ("classification", _request(X1, outputs=[{"name": "label", "parameters": {"classification": 3}}]), "not supported"),
]


@pytest.mark.parametrize(("case", "body", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_infer_requests_get_a_v2_error(server: httpx.Client, case: str, body: object, message: str) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = server.post("/v2/models/mnist/infer", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"} and message in r.json()["error"]
    assert server.post("/v2/models/mnist/infer", json=_request(X1)).status_code == 200  # still serving


def test_infer_on_an_unknown_model_is_404(server: httpx.Client) -> None:
    r = server.post("/v2/models/cifar/infer", json=_request(X1))
    assert r.status_code == 404 and "available: mnist" in r.json()["error"]


def test_a_triton_client_json_request_works_unchanged(
    server: httpx.Client, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    """tritonclient's JSON request (binary_data=False): its own parameters and no outputs list."""
    x, y = digits
    request = {
        "inputs": [{"name": "x", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": x[:2].ravel().tolist()}],
        "parameters": {"binary_data_output": False, "tol": 1e-3},
    }
    r = server.post("/v2/models/mnist/infer", json=request)
    assert r.status_code == 200, r.text
    out = {o["name"]: o["data"] for o in r.json()["outputs"]}
    assert out["label"] == y[:2].tolist() and out["label_certified"] == [True, True]


def test_errors_before_routing_keep_the_v2_shape(server: httpx.Client) -> None:
    for r in (server.get("/v2/no/such/route"), server.post("/v2/health/live")):
        assert r.status_code in (404, 405) and set(r.json()) == {"error"}
    assert set(server.get("/no/such/route").json()) == {"detail"}  # elsewhere: FastAPI's shape


def test_limits_and_timeouts_keep_the_v2_shape(server: httpx.Client) -> None:
    big = b"{" + b" " * (4 * 1024 * 1024) + b"}"
    r = server.post("/v2/models/mnist/infer", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and set(r.json()) == {"error"} and "at most 4194304" in r.json()["error"]
    r = server.post("/v2/models/mnist/versions/2/infer", json=_request(X1))
    assert r.status_code == 404 and "has version '1', not '2'" in r.json()["error"]
    many = np.zeros((257, 1, 28, 28), np.float32)
    r = server.post("/v2/models/mnist/infer", json=_request(many))
    assert r.status_code == 413 and "at most 256" in r.json()["error"]


def test_the_registry_raises_a_domain_error_not_an_http_one(shipped_model: Path) -> None:
    from fpn_serve import FPNServeError, ModelNotFound
    from fpn_serve.batching.registry import load_registry

    registry = load_registry([shipped_model], device="cpu")
    assert registry.get(None) is registry.get("mnist") is registry.get("mnist", "1")
    for name, version, message in [("cifar", None, "available: mnist"), ("mnist", "2", "not '2'")]:
        with pytest.raises(ModelNotFound, match=message) as info:
            registry.get(name, version)
        assert isinstance(info.value, FPNServeError) and not hasattr(info.value, "status_code")


def test_targets_choose_tol_and_the_answer_says_so(server: httpx.Client, digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = digits
    plain = server.post("/v2/models/mnist/infer", json=_request(x[:2], parameters={"tol": 1e-3})).json()
    assert plain["parameters"] == {"tol": 1e-3, "max_iter": 100, "stop": "tol"}
    (info,) = server.get("/models").json()
    r = server.post("/v2/models/mnist/infer", json=_request(x[:2], parameters={"target_accuracy": 0.99}))
    assert r.status_code == 200, r.text
    params = r.json()["parameters"]
    chosen = next(t for t in info["targets"] if t["tol"] == params["tol"])
    assert params["chosen_by"] == "target_accuracy" and params["target_accuracy"] == 0.99
    assert params["accuracy_lower_bound"] == chosen["accuracy_lower_bound"] >= 0.99
    r = server.post("/v2/models/mnist/infer", json=_request(x[:2], parameters={"target_accuracy": 0.99999}))
    assert r.status_code == 422 and "the best this model offers" in r.json()["error"], r.text
