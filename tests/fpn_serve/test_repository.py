"""The model repository extension on a real server: the index of the store, unload and load (and a
reload of a model under traffic) with no failed request on the models being served."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ..conftest import running_server

pytestmark = pytest.mark.slow

X1 = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784}]}


def _copy(model: Path, store: Path, name: str) -> Path:
    folder = store / name
    shutil.copytree(model, folder, ignore=shutil.ignore_patterns("*.png", "metrics.jsonl"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["name"] = name  # the graphs' sha256 stay valid
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def store(shipped_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    _copy(shipped_model, root, "mnist")
    _copy(shipped_model, root, "digits")
    return root


@pytest.fixture(scope="module")
def repo_server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with running_server(store, tmp_path_factory.mktemp("repo")) as client:
        yield client


def _index(server: httpx.Client) -> dict[str, str]:
    r = server.post("/v2/repository/index")
    assert r.status_code == 200, r.text
    return {m["name"]: m["state"] for m in r.json()}


class Hammer:
    """A thread sending v2 requests to one model until stopped; every status it saw, counted."""

    def __init__(self, base_url: httpx.URL, model: str) -> None:
        self.statuses: dict[int, int] = {}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(base_url, model), daemon=True)

    def _run(self, base_url: httpx.URL, model: str) -> None:
        with httpx.Client(base_url=base_url, timeout=30) as client:
            while not self._stop.is_set():
                r = client.post(f"/v2/models/{model}/infer", json=X1)
                self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
                if r.status_code != 200:
                    self.failures.append(r.text)

    def __enter__(self) -> Hammer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def test_the_index_lists_the_store(repo_server: httpx.Client) -> None:
    assert _index(repo_server) == {"digits": "READY", "mnist": "READY"}
    r = repo_server.post("/v2/repository/index", json={"ready": True})
    assert [m["name"] for m in r.json()] == ["digits", "mnist"] and r.json()[0]["version"] == "1"


def test_unload_and_load_under_traffic_on_another_model(repo_server: httpx.Client) -> None:
    with Hammer(repo_server.base_url, "mnist") as hammer:
        r = repo_server.post("/v2/repository/models/digits/unload")
        assert r.status_code == 200, r.text
        assert _index(repo_server) == {"digits": "UNAVAILABLE", "mnist": "READY"}
        assert repo_server.post("/v2/models/digits/infer", json=X1).status_code == 404
        assert [m["name"] for m in repo_server.get("/models").json()] == ["mnist"]
        assert repo_server.get("/v2/models/digits/ready").status_code == 404
        assert repo_server.get("/v2/health/ready").json() == {"ready": True}
        assert 'model="digits"' not in repo_server.get("/metrics").text.split("fpn_active_batch", 1)[1]
        assert repo_server.post("/v2/repository/models/digits/unload").status_code == 404  # not loaded
        r = repo_server.post("/v2/repository/models/digits/load")
        assert r.status_code == 200, r.text
        assert _index(repo_server) == {"digits": "READY", "mnist": "READY"}
        assert repo_server.post("/v2/models/digits/infer", json=X1).status_code == 200
        assert 'fpn_active_batch{model="digits"}' in repo_server.get("/metrics").text
    assert not hammer.failures and hammer.statuses.get(200, 0) > 5, hammer.statuses


def test_a_reload_under_traffic_fails_no_request(repo_server: httpx.Client) -> None:
    with Hammer(repo_server.base_url, "mnist") as one, Hammer(repo_server.base_url, "mnist") as two:
        for _ in range(3):
            r = repo_server.post("/v2/repository/models/mnist/load")
            assert r.status_code == 200, r.text
    for hammer in (one, two):
        assert not hammer.failures and hammer.statuses.get(200, 0) > 0, hammer.statuses
    assert _index(repo_server)["mnist"] == "READY"


def test_names_only_from_the_store(repo_server: httpx.Client, store: Path) -> None:
    for name, status, message in [
        ("cifar", 404, "holds no model 'cifar'; it holds: digits, mnist"),
        (".mnist", 400, "is not a model name"),
        ("..", 404, ""),  # the client resolves the dots: /v2/repository/load, no route
        ("~mnist", 400, "is not a model name"),
        ("mnist%2F..%2Fdigits", 404, ""),
        ("%2Fetc", 404, ""),
    ]:
        r = repo_server.post(f"/v2/repository/models/{name}/load")
        assert r.status_code == status, (name, r.text)
        assert message in r.json()["error"], name
    r = repo_server.post("/v2/repository/models/mnist/load", json={"parameters": {"config": "{}"}})
    assert r.status_code == 400 and "not supported" in r.json()["error"]
    r = repo_server.post("/v2/repository/index", content=b"{nope")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]


def test_a_broken_folder_is_refused_and_the_served_model_stays(repo_server: httpx.Client, store: Path) -> None:
    broken = _copy(store / "mnist", store, "broken")
    graph = broken / "T.onnx"
    graph.write_bytes(graph.read_bytes()[:-10])  # its sha256 no longer matches the manifest
    r = repo_server.post("/v2/repository/models/broken/load")
    assert r.status_code == 400 and "sha256" in r.json()["error"], r.text
    assert _index(repo_server)["broken"] == "UNAVAILABLE"
    digits = json.loads((store / "digits" / "manifest.json").read_text())
    (store / "digits" / "T.onnx").write_bytes(graph.read_bytes())
    try:
        r = repo_server.post("/v2/repository/models/digits/load")
        assert r.status_code == 400, r.text
        served = repo_server.post("/v2/models/digits/infer", json=X1)  # the loaded one still serves
        assert served.status_code == 200 and "outputs" in served.json()
    finally:
        shutil.copy(store / "mnist" / "T.onnx", store / "digits" / "T.onnx")
        (store / "digits" / "manifest.json").write_text(json.dumps(digits))
        shutil.rmtree(broken)


def test_the_repository_is_behind_the_bearer_token(store: Path, tmp_path: Path) -> None:
    with running_server(store, tmp_path, env={"FPN_SERVE_TOKEN": "s3cret"}) as client:
        assert client.post("/v2/repository/index").status_code == 401
        assert client.post("/v2/repository/models/digits/unload").status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert client.post("/v2/repository/models/digits/unload", headers=auth).status_code == 200
        index = client.post("/v2/repository/index", headers=auth).json()
        assert {m["name"]: m["state"] for m in index} == {"digits": "UNAVAILABLE", "mnist": "READY"}
        assert client.get("/v2/health/ready").json() == {"ready": True}
