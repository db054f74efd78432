"""The dial over HTTP, on a real uvicorn server with the shipped model and real MNIST test digits:
``stop=certified``, ``label_certified`` and ``trace`` give what the engine gives for the same
inputs; ``/models`` shows the calibration table; bad values are 422 naming the parameter."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from fpn_serve import Engine
from fpn_serve.contract.images import images_to_batch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits(mnist_root: Path) -> list[bytes]:
    """Real MNIST test digits as PNG files."""
    from training.data import load_split

    test = load_split("mnist", mnist_root, train=False, limit=24)
    out = []
    for img in test.images[:, 0].numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def engine(shipped_model: Path) -> Engine:
    return Engine.load(shipped_model, device="cpu", threads=1)


def _x(engine: Engine, png: bytes) -> np.ndarray:
    """The normalised input the server makes of ``png`` (the same decoder)."""
    return images_to_batch([png], engine.manifest.input)


def _classify(server: httpx.Client, png: bytes, **params: Any) -> dict[str, Any]:
    r = server.post("/classify", params=params, content=png, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_the_certified_stop_gives_the_engines_iterations_and_labels(
    server: httpx.Client, engine: Engine, digits: list[bytes]
) -> None:
    fewer = 0
    for png in digits:
        x = _x(engine, png)
        want = engine.classify(x, stop="certified")
        body = _classify(server, png, stop="certified")
        (p,) = body["predictions"]
        assert body["stop"] == "certified"
        assert p["label"] == engine.manifest.labels[int(want.labels[0])]
        assert p["iterations"] == int(want.iterations[0])
        assert p["label_certified"] is bool(want.certified[0])
        plain = _classify(server, png)
        assert plain["stop"] == "tol" and plain["predictions"][0]["label"] == p["label"]
        fewer += p["iterations"] < plain["predictions"][0]["iterations"]
    assert fewer >= len(digits) // 2  # the certified stop is the cheaper rule on most digits


@pytest.mark.parametrize("tol", [0.1, 1e-3, 1e-6])
def test_label_certified_agrees_with_the_engine(
    server: httpx.Client, engine: Engine, digits: list[bytes], tol: float
) -> None:
    x = np.concatenate([_x(engine, png) for png in digits])
    want = engine.classify(x, tol)
    r = server.post("/classify", params={"tol": tol}, json={"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    got = [p["label_certified"] for p in r.json()["predictions"]]
    assert got == want.certified.tolist()
    if tol == 1e-6:
        assert all(got)  # a tight tol certifies every real digit of this model
    if tol == 0.1:
        assert not all(got)  # three iterations are too few to certify some of them


def _steps(engine: Engine, result: Any, row: int) -> list[dict[str, Any]]:
    trace, names = result.trace, engine.manifest.labels
    return [
        {
            "iteration": k + 1,
            "residual": float(trace.residuals[row, k]),
            "label": names[int(trace.labels[row, k])],
            "certified": bool(trace.certified[row, k]),
        }
        for k in range(int(result.iterations[row]))
    ]


@pytest.mark.parametrize("stop", ["tol", "certified"])
def test_the_trace_agrees_with_the_engine_entry_by_entry(
    server: httpx.Client, engine: Engine, digits: list[bytes], stop: str
) -> None:
    for png in digits[:8]:  # one image at a time: the lean path
        want = engine.classify(_x(engine, png), 1e-5, stop=stop, trace=True)
        (p,) = _classify(server, png, tol=1e-5, stop=stop, trace="true")["predictions"]
        expected = _steps(engine, want, 0)
        assert len(p["trace"]) == p["iterations"] == len(expected)
        for got, step in zip(p["trace"], expected, strict=True):
            assert got == {**step, "residual": pytest.approx(step["residual"], rel=1e-5)}
        assert p["trace"][-1]["residual"] == pytest.approx(p["residual"], rel=1e-6)
        assert p["trace"][-1]["label"] == p["label"] and p["trace"][-1]["certified"] is p["label_certified"]
    x = np.concatenate([_x(engine, png) for png in digits[8:12]])  # a JSON batch: the declared route
    want = engine.classify(x, 1e-5, stop=stop, trace=True)
    r = server.post("/classify", params={"tol": 1e-5, "stop": stop, "trace": "true"}, json={"inputs": x.tolist()})
    for row, p in enumerate(r.json()["predictions"]):
        assert [s["label"] for s in p["trace"]] == [s["label"] for s in _steps(engine, want, row)]
        assert [s["certified"] for s in p["trace"]] == [s["certified"] for s in _steps(engine, want, row)]
        residuals = [s["residual"] for s in _steps(engine, want, row)]
        assert [s["residual"] for s in p["trace"]] == pytest.approx(residuals, rel=1e-5)


def test_without_trace_there_is_none(server: httpx.Client, digits: list[bytes]) -> None:
    for params in ({}, {"trace": "false"}, {"trace": "0", "tol": 0.01}):
        (p,) = _classify(server, digits[0], **params)["predictions"]
        assert "trace" not in p and isinstance(p["label_certified"], bool)


def test_models_show_the_calibration_table_and_the_certificate(server: httpx.Client, shipped_model: Path) -> None:
    (info,) = server.get("/models").json()
    manifest = json.loads((shipped_model / "manifest.json").read_text())
    rows = manifest["calibration"]["tolerances"]
    assert info["certifies"] is True
    assert [r["tol"] for r in info["tolerances"]] == sorted((r["tol"] for r in rows), reverse=True)
    for row in info["tolerances"]:
        source = next(r for r in rows if r["tol"] == row["tol"])
        assert row["mean_iterations"] == source["mean_iterations"] and row["accuracy"] == source["accuracy"]
        assert row["latency_us_batch1"] == source["latency_us_batch1"]
    certified = manifest["calibration"].get("certified_stop")
    if certified is None:
        assert info.get("certified_stop") is None
    else:
        assert info["certified_stop"]["mean_iterations"] == certified["mean_iterations"]
        assert info["certified_stop"]["accuracy"] == certified["accuracy"]


def test_a_target_accuracy_picks_a_calibrated_tol(server: httpx.Client, digits: list[bytes]) -> None:
    (info,) = server.get("/models").json()
    loosest = info["tolerances"][0]
    body = _classify(server, digits[0], target_accuracy=0.99)
    assert body["tol"] in [r["tol"] for r in info["tolerances"]] and body["tol"] <= loosest["tol"]
    chosen = body["chosen"]  # the answer says what chose tol and why
    assert chosen["by"] == "target_accuracy" and chosen["requested"] == 0.99 and chosen["accuracy_lower_bound"] >= 0.99
    row = next(r for r in info["targets"] if r["tol"] == body["tol"])
    assert row["accuracy_lower_bound"] == chosen["accuracy_lower_bound"]
    assert all(r["accuracy_lower_bound"] < 0.99 for r in info["targets"] if r["tol"] > body["tol"])
    timed = _classify(server, digits[0], latency_budget_ms=50)
    assert timed["chosen"]["by"] == "latency_budget_ms" and timed["chosen"]["predicted_p99_ms"] <= 50
    assert timed["tol"] == min(r["tol"] for r in info["targets"])  # 50 ms fits every row: the tightest
    r = server.post(
        "/classify", params={"latency_budget_ms": 1e-4}, content=digits[0], headers={"content-type": "image/png"}
    )
    assert r.status_code == 422 and "the fastest this model offers" in r.json()["detail"], r.text
    r = server.post(
        "/classify", params={"target_accuracy": 1}, content=digits[0], headers={"content-type": "image/png"}
    )
    assert r.status_code == 422 and "accuracy" in r.json()["detail"], r.text  # no calibrated tol reaches 100 %


LONG_ID = "s" * 129
BAD_DIALS = [
    ({"stop": "exact"}, "stop", "exact"),
    ({"stop": ""}, "stop", "''"),
    ({"trace": "maybe"}, "trace", "maybe"),
    ({"trace": "yes"}, "trace", "yes"),
    ({"sequence_start": "true"}, "sequence_start", "sequence_id"),
    ({"sequence_end": "1"}, "sequence_end", "sequence_id"),
    ({"sequence_id": "a", "sequence_end": "2"}, "sequence_end", "2"),
    ({"sequence_id": "a", "sequence_start": "yes"}, "sequence_start", "yes"),
    ({"sequence_id": LONG_ID}, "sequence_id", "129"),
    ({"stop": "certified", "tol": "0"}, "tol", "0"),
]


@pytest.mark.parametrize(("params", "name", "shown"), BAD_DIALS)
@pytest.mark.parametrize("body", ["png", "multipart", "json"])
def test_bad_dial_values_are_422_naming_the_parameter(
    server: httpx.Client, digits: list[bytes], params: dict[str, str], name: str, shown: str, body: str
) -> None:
    if body == "png":
        r = server.post("/classify", params=params, content=digits[0], headers={"content-type": "image/png"})
    elif body == "multipart":
        r = server.post("/classify", params=params, files={"file": ("d.png", digits[0], "image/png")})
    else:
        r = server.post("/classify", params=params, json={"inputs": np.zeros((1, 1, 28, 28)).tolist()})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert name in detail and shown in detail
