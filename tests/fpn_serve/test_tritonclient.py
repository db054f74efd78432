"""A stock ``tritonclient.http`` against a real server: its default binary calls and its JSON calls
give the answers of /classify for the same inputs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.slow

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def digits(mnist_root: Path) -> tuple[np.ndarray, np.ndarray]:
    from training.data import load_split

    test = load_split("mnist", mnist_root, train=False, limit=16)
    return test.normalise(test.images).numpy(), test.labels.numpy()


@pytest.fixture(scope="module")
def client(server: httpx.Client) -> Iterator[object]:
    url = str(server.base_url).removeprefix("http://").rstrip("/")
    triton = httpclient.InferenceServerClient(url=url, concurrency=2)
    yield triton
    triton.close()


def _infer(client: object, x: np.ndarray, binary: bool | None, outputs: list[str] | None = None) -> object:
    given = httpclient.InferInput("x", list(x.shape), "FP32")
    if binary is None:
        given.set_data_from_numpy(x)  # the default: binary
        wanted = None if outputs is None else [httpclient.InferRequestedOutput(n) for n in outputs]
    else:
        given.set_data_from_numpy(x, binary_data=binary)
        names = outputs or ["logits", "probabilities", "label", "iterations", "converged", "label_certified"]
        wanted = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in names]
    return client.infer("mnist", [given], outputs=wanted, parameters={"tol": 1e-3})  # type: ignore[attr-defined]


@pytest.mark.parametrize("binary", [None, True, False], ids=["default", "binary", "json"])
def test_tritonclient_answers_like_classify(
    server: httpx.Client, client: object, digits: tuple[np.ndarray, np.ndarray], binary: bool | None
) -> None:
    x, y = digits
    result = _infer(client, x, binary)
    classify = server.post("/classify", params={"tol": 1e-3}, json={"inputs": x.tolist()}).json()["predictions"]
    labels = result.as_numpy("label")  # type: ignore[attr-defined]
    assert labels.dtype == np.int64 and labels.tolist() == y.tolist()
    assert [str(label) for label in labels] == [p["label"] for p in classify]  # the manifest's names are the digits
    assert result.as_numpy("iterations").tolist() == [p["iterations"] for p in classify]  # type: ignore[attr-defined]
    probabilities = result.as_numpy("probabilities")  # type: ignore[attr-defined]
    assert probabilities.dtype == np.float32 and probabilities.shape == (16, 10)
    np.testing.assert_allclose(probabilities, [p["probabilities"] for p in classify], atol=1e-6)
    logits = result.as_numpy("logits")  # type: ignore[attr-defined]
    np.testing.assert_array_equal(np.argmax(logits, axis=1), y)
    assert result.as_numpy("converged").dtype == np.bool_ and result.as_numpy("converged").all()  # type: ignore[attr-defined]
    assert result.get_response()["model_name"] == "mnist"  # type: ignore[attr-defined]


def test_tritonclient_metadata_and_repository(client: object) -> None:
    assert client.is_server_live() and client.is_server_ready()  # type: ignore[attr-defined]
    assert client.is_model_ready("mnist")  # type: ignore[attr-defined]
    meta = client.get_model_metadata("mnist")  # type: ignore[attr-defined]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    server = client.get_server_metadata()  # type: ignore[attr-defined]
    assert {"binary_tensor_data", "model_repository"} <= set(server["extensions"])
    index = client.get_model_repository_index()  # type: ignore[attr-defined]
    assert index == [{"name": "mnist", "version": "1", "state": "READY"}]


def test_tritonclient_sees_strict_validation(client: object) -> None:
    x = np.zeros((1, 1, 28, 28), np.float32)
    wrong = httpclient.InferInput("nope", [1, 1, 28, 28], "FP32")
    wrong.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="unknown input 'nope'"):
        client.infer("mnist", [wrong])  # type: ignore[attr-defined]
    with pytest.raises(InferenceServerException, match="unknown output 'softmax'"):
        _infer(client, x, None, outputs=["softmax"])
    flat = httpclient.InferInput("x", [1, 784], "FP32")
    flat.set_data_from_numpy(x.reshape(1, 784))
    with pytest.raises(InferenceServerException, match=r"the model takes \[-1, 1, 28, 28\]"):
        client.infer("mnist", [flat])  # type: ignore[attr-defined]
    assert _infer(client, x, None).as_numpy("label").shape == (1,)  # type: ignore[attr-defined]
