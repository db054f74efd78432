"""Triton's binary tensor data extension on a real server: raw request tensors, binary answers,
and every malformed binary body a 400 (or 413) that leaves the server serving."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.slow

SHAPE = [1, 28, 28]
HEADER = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def digits(mnist_root: Path) -> tuple[np.ndarray, np.ndarray]:
    from training.data import load_split

    test = load_split("mnist", mnist_root, train=False, limit=8)
    return test.normalise(test.images).numpy(), test.labels.numpy()


def _binary(
    x: np.ndarray, *, size: int | None = None, shape: list[int] | None = None, **extra: object
) -> tuple[bytes, int]:
    """A binary request body for inputs ``x`` and its JSON header's length."""
    raw = np.ascontiguousarray(x, "<f4").tobytes()
    tensor = {"name": "x", "datatype": "FP32", "shape": shape or list(x.shape)}
    tensor["parameters"] = {"binary_data_size": len(raw) if size is None else size}
    header = json.dumps({"inputs": [tensor], **extra}).encode()
    return header + raw, len(header)


def _post(server: httpx.Client, body: bytes, header_length: object) -> httpx.Response:
    headers = {"content-type": "application/octet-stream"}
    if header_length is not None:
        headers[HEADER] = str(header_length)
    return server.post("/v2/models/mnist/infer", content=body, headers=headers)


def _outputs(r: httpx.Response) -> dict[str, np.ndarray]:
    """The answer's outputs, decoded from JSON data or from the binary part after the header."""
    length = int(r.headers.get(HEADER, len(r.content)))
    doc, rest = json.loads(r.content[:length]), r.content[length:]
    dtypes = {"FP32": "<f4", "INT64": "<i8", "INT32": "<i4", "BOOL": "?"}
    out, offset = {}, 0
    for o in doc["outputs"]:
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is None:
            out[o["name"]] = np.asarray(o["data"], dtypes[o["datatype"]]).reshape(o["shape"])
        else:
            out[o["name"]] = np.frombuffer(rest[offset : offset + size], dtypes[o["datatype"]]).reshape(o["shape"])
            offset += size
    assert offset == len(rest)
    return out


def test_binary_inputs_and_outputs_answer_like_json(
    server: httpx.Client, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits
    body, length = _binary(x, parameters={"binary_data_output": True, "tol": 1e-3})
    r = _post(server, body, length)
    assert r.status_code == 200, r.text
    assert int(r.headers[HEADER]) < len(r.content) and r.headers["content-type"] == "application/octet-stream"
    binary = _outputs(r)
    assert binary["label"].tolist() == y.tolist() and binary["converged"].dtype == np.bool_
    as_json = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    plain = server.post("/v2/models/mnist/infer", json={**as_json, "parameters": {"tol": 1e-3}})
    assert HEADER not in plain.headers
    expected = _outputs(plain)
    assert (
        set(binary)
        == set(expected)
        == {
            "logits",
            "probabilities",
            "label",
            "iterations",
            "residual",
            "converged",
            "error_bound",
            "label_certified",
        }
    )
    for name, value in expected.items():
        assert binary[name].dtype == value.dtype and binary[name].shape == value.shape, name
        np.testing.assert_allclose(binary[name], value, rtol=1e-6, err_msg=name)


def test_outputs_choose_binary_one_by_one(server: httpx.Client, digits: tuple[np.ndarray, np.ndarray]) -> None:
    x = digits[0][:2]
    outputs = [{"name": "label", "parameters": {"binary_data": True}}, {"name": "iterations"}]
    body, length = _binary(x, outputs=outputs, parameters={"tol": 1e-3})
    r = _post(server, body, length)
    assert r.status_code == 200, r.text
    doc = json.loads(r.content[: int(r.headers[HEADER])])
    label, iterations = doc["outputs"]
    assert label["parameters"] == {"binary_data_size": 16} and "data" not in label
    assert "data" in iterations and "parameters" not in iterations
    assert len(r.content) == int(r.headers[HEADER]) + 16
    # the request-level default, overridden by one output
    header = json.dumps(
        {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [2, *SHAPE], "parameters": {"binary_data_size": 6272}}
            ],
            "outputs": [{"name": "label", "parameters": {"binary_data": False}}, {"name": "converged"}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    r = _post(server, header + x.astype("<f4").tobytes(), len(header))
    doc = json.loads(r.content[: int(r.headers[HEADER])])
    assert "data" in doc["outputs"][0] and doc["outputs"][1]["parameters"] == {"binary_data_size": 2}
    assert r.content[int(r.headers[HEADER]) :] in (b"\x00\x01", b"\x01\x01", b"\x01\x00", b"\x00\x00")


def _cases(x: np.ndarray) -> list[tuple[str, bytes, object, str]]:
    body, length = _binary(x)
    return [
        ("header length past the body", body, len(body) + 1, "from 1 to the body's"),
        ("header length negative", body, -5, "whole number"),
        ("header length zero", body, 0, "whole number"),
        ("header length not a number", body, "ten", "whole number"),
        ("header length too short", body, length - 3, "not valid JSON"),
        ("header length too long", body, length + 3, "not valid JSON"),
        ("truncated body", body[:-100], length, "only 3036 follow"),
        ("bytes beyond the inputs", body + b"\0" * 8, length, "8 bytes follow the inference header beyond"),
        ("size smaller than the shape", *_binary(x, size=3136 - 4)[:1], length, "bytes follow the inference header"),
        ("size not the shape's", *_binary(x, shape=[2, *SHAPE]), "shape [2, 1, 28, 28] needs 6272"),
        ("size negative", *_binary(x, size=-1), "must be a byte count"),
        ("size not a number", *_binary(x, size="3136"), "must be a byte count"),  # type: ignore[arg-type]
        ("overflowing shape", *_binary(x, shape=[2**62, 2**62, 28, 28]), "declares more than"),
        ("huge shape", *_binary(x, shape=[2**30, *SHAPE]), "at most 256"),
        ("wrong name", body.replace(b'"x"', b'"y"', 1), length, "unknown input 'y'"),
        ("wrong datatype", body.replace(b'"FP32"', b'"FP64"', 1), length, "has datatype 'FP64'"),
    ]


def test_every_malformed_binary_request_is_a_4xx(server: httpx.Client, digits: tuple[np.ndarray, np.ndarray]) -> None:
    x = digits[0][:1]
    fine, length = _binary(x)
    for case, body, header_length, message in _cases(x):
        r = _post(server, body, header_length)
        assert r.status_code in (400, 413), (case, r.status_code, r.text)
        assert set(r.json()) == {"error"} and message in r.json()["error"], (case, r.text)
        assert _post(server, fine, length).status_code == 200, case  # the server keeps serving


def test_the_body_limit_counts_the_binary_part(server: httpx.Client) -> None:
    many = np.zeros((400, *SHAPE), np.float32)  # 1.25 MB of raw tensors: under the limit
    body, length = _binary(many)
    r = _post(server, body, length)
    assert r.status_code == 413 and "at most 256" in r.json()["error"]
    huge = body + b"\0" * (4 * 1024 * 1024)
    r = _post(server, huge, length)
    assert r.status_code == 413 and "at most 4194304" in r.json()["error"]


def test_compressed_bodies_are_refused_by_name(server: httpx.Client) -> None:
    body, length = _binary(np.zeros((1, *SHAPE), np.float32))
    r = server.post("/v2/models/mnist/infer", content=body, headers={HEADER: str(length), "content-encoding": "gzip"})
    assert r.status_code == 415 and "Content-Encoding 'gzip'" in r.json()["error"]
