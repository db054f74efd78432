"""Streams over HTTP (Triton's sequence parameters on /classify), on a real uvicorn server with the
shipped model: concurrent clients, each sending its own stream of drifting frames of a real MNIST
test digit into the shared batch, each keep their own warm start; ``sequence_end`` forgets it; the
number of kept sequences is bounded by ``--max-sequences``."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from fpn_serve import Engine
from fpn_serve.contract.images import images_to_batch

pytestmark = pytest.mark.slow

CLIENTS = 8
FRAMES = 6
LATENT_BYTES = 46 * 4  # the shipped model's latent: 46 float32


@pytest.fixture(scope="module")
def streams(mnist_root: Path) -> list[list[bytes]]:
    """Per client: PNG frames of one real test digit drifting by a pixel per frame."""
    from training.data import load_split

    test = load_split("mnist", mnist_root, train=False, limit=CLIENTS)
    out = []
    for c, img in enumerate(test.images[:, 0].numpy()):
        frames = []
        for k in range(FRAMES):
            shifted = np.roll(img, (k // 2 * (1 if c % 2 else -1), (k + 1) // 2), axis=(0, 1))
            buf = io.BytesIO()
            Image.fromarray(shifted).save(buf, format="PNG")
            frames.append(buf.getvalue())
        out.append(frames)
    return out


@pytest.fixture(scope="module")
def server(shipped_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A server of this module's own: its sequence store holds only these tests' streams."""
    from ..conftest import running_server  # type: ignore[import-not-found,misc]

    with running_server(shipped_model, tmp_path_factory.mktemp("streams")) as client:
        yield client


@pytest.fixture(scope="module")
def engine(shipped_model: Path) -> Engine:
    return Engine.load(shipped_model, device="cpu", threads=1)


def _x(engine: Engine, png: bytes) -> np.ndarray:
    return images_to_batch([png], engine.manifest.input)


def _send(client: httpx.Client, png: bytes, x: np.ndarray, as_json: bool, **params: Any) -> dict[str, Any]:
    if as_json:  # the declared route
        r = client.post("/classify", params=params, json={"inputs": x.tolist()})
    else:  # the lean path
        r = client.post("/classify", params=params, content=png, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    (p,) = r.json()["predictions"]
    assert isinstance(p, dict)
    return p


def _stream(base_url: str, sid: str, frames: list[bytes], xs: list[np.ndarray], as_json: bool) -> list[dict[str, Any]]:
    """One client's stream, start to end, as a client of its own would send it."""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        answers = []
        for k, (png, x) in enumerate(zip(frames, xs, strict=True)):
            flags = {"sequence_start": "true"} if k == 0 else {"sequence_end": "true"} if k == len(frames) - 1 else {}
            answers.append(_send(client, png, x, as_json, sequence_id=sid, **flags))
        return answers


def _expected(engine: Engine, xs: list[np.ndarray]) -> Iterator[tuple[Any, Any]]:
    """Per frame: (the cold start's result, the warm start's from the previous frame's latents)."""
    u = None
    for x in xs:
        cold = engine.run(engine.prepare(x, keep_latents=True))
        warm = cold if u is None else engine.classify(x, u0=u)
        u = warm.latents
        yield cold, warm


def _metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + '{model="mnist"}'):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_concurrent_streams_keep_their_own_state(
    server: httpx.Client, engine: Engine, streams: list[list[bytes]]
) -> None:
    xs = [[_x(engine, png) for png in frames] for frames in streams]
    answers: dict[int, list[dict[str, Any]]] = {}
    failures: list[BaseException] = []

    def run(c: int) -> None:
        try:
            answers[c] = _stream(str(server.base_url), f"client-{c}", streams[c], xs[c], as_json=c % 3 == 0)
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    cold_total = warm_total = 0
    names = engine.manifest.labels
    for c in range(CLIENTS):
        for k, (p, (cold, warm)) in enumerate(zip(answers[c], _expected(engine, xs[c]), strict=True)):
            assert p["label"] == names[int(cold.labels[0])], (c, k)
            assert p["iterations"] == int(warm.iterations[0]), (c, k)
            if k:
                cold_total += int(cold.iterations[0])
                warm_total += p["iterations"]
    assert warm_total < 0.85 * cold_total, (warm_total, cold_total)  # warm frames cost fewer iterations
    assert _metric(server, "fpn_sequences") == 0  # every stream ended: nothing kept


def test_sequence_end_forgets_the_state(server: httpx.Client, engine: Engine, streams: list[list[bytes]]) -> None:
    frames = streams[1]
    xs = [_x(engine, png) for png in frames]
    expected = list(_expected(engine, xs[:2]))
    before = _metric(server, "fpn_sequences")
    first = _send(server, frames[0], xs[0], False, sequence_id=77, sequence_start="true")
    assert _metric(server, "fpn_sequences") == before + 1
    assert _metric(server, "fpn_sequence_bytes") >= LATENT_BYTES
    ended = _send(server, frames[1], xs[1], False, sequence_id=77, sequence_end="true")
    assert ended["iterations"] == int(expected[1][1].iterations[0]) < first["iterations"]  # warm
    assert _metric(server, "fpn_sequences") == before
    again = _send(server, frames[1], xs[1], False, sequence_id=77)  # no state left: a cold start
    assert again["iterations"] == int(expected[1][0].iterations[0]) > ended["iterations"]
    _send(server, frames[1], xs[1], False, sequence_id=77, sequence_end="true")


def test_more_sequences_than_the_bound_keep_only_the_bound(
    shipped_model: Path, tmp_path: Path, engine: Engine, streams: list[list[bytes]]
) -> None:
    from ..conftest import running_server  # type: ignore[import-not-found,misc]

    bound, opened = 3, 7
    with running_server(shipped_model, tmp_path, env={"FPN_SERVE_MAX_SEQUENCES": str(bound)}) as client:
        frames = streams[2]
        xs = [_x(engine, png) for png in frames]
        _, (cold1, warm1) = _expected(engine, xs[:2])
        for sid in range(1, opened + 1):
            _send(client, frames[0], xs[0], sid % 2 == 0, sequence_id=sid, sequence_start="true")
        assert _metric(client, "fpn_sequences") == bound
        assert _metric(client, "fpn_sequence_bytes") == bound * LATENT_BYTES
        assert _metric(client, "fpn_sequences_dropped_total") == opened - bound
        oldest = _send(client, frames[1], xs[1], False, sequence_id=1)  # pushed out: a cold start
        assert oldest["iterations"] == int(cold1.iterations[0])
        newest = _send(client, frames[1], xs[1], False, sequence_id=opened)  # kept: a warm start
        assert newest["iterations"] == int(warm1.iterations[0]) < oldest["iterations"]
        assert _metric(client, "fpn_sequences") == bound
