"""The lean path of /classify gives exactly the general path's answer: the same status, headers that
matter and JSON (all but latency_ms) for every request, valid or not, and it is taken for the
common requests. Its multipart reader agrees with Starlette's parser wherever it answers."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from fpn_serve.http import lean
from fpn_serve.http.app import create_app, load_models
from fpn_serve.http.classify import LeanClassify
from fpn_serve.settings import Settings


class Client:
    """A blocking client for an ASGI app served (lifespan included) on an event loop of its own thread."""

    def __init__(self, app: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.app, self.loop = app, loop
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        content = kwargs.get("content")
        if isinstance(content, Iterator):  # a body in pieces, without a length
            pieces = list(content)

            async def stream() -> AsyncIterator[bytes]:
                for piece in pieces:
                    yield piece

            kwargs["content"] = stream()
        return asyncio.run_coroutine_threadsafe(self.client.request(method, url, **kwargs), self.loop).result(60)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)


# Starlette's multipart parser leaves the spooled file of a part that never ends unclosed (it is
# freed at once all the same); the general path meets such bodies here in-process.
pytestmark = pytest.mark.filterwarnings("ignore:Unclosed file <tempfile.SpooledTemporaryFile:ResourceWarning")

SEVEN = (Path(__file__).resolve().parents[2] / "examples" / "seven.png").read_bytes()
EXAMPLES = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _digit(mode: str = "L", size: int = 28) -> Image.Image:
    arr = np.zeros((size, size), np.uint8)
    arr[size // 4 : 3 * size // 4, size // 2 - 2 : size // 2 + 2] = 255
    return Image.fromarray(arr).convert(mode)


IMAGES = [
    SEVEN,
    _encode(_digit()),
    _encode(_digit("RGBA")),
    _encode(_digit("RGB", 56), "JPEG"),
    _encode(_digit("P")),
    _encode(Image.fromarray(np.asarray(_digit()).astype(np.uint16) * 257)),
    SEVEN[:100],  # truncated
    b"not an image at all",
    b"",
    _encode(Image.new("L", (600, 600))),  # over the tests' pixel limit
]


@pytest.fixture(scope="module")
def clients(shipped_model: Path) -> Iterator[tuple[Client, Client, list[int]]]:
    """(lean app, the same app with the lean path removed, how often the lean app fell back)."""
    settings = Settings(device="cpu", max_body_bytes=200_000, max_pixels=512 * 512, max_inputs=3)
    registry = load_models(settings, [shipped_model])
    lean_app, general_app = create_app(settings, registry=registry), create_app(settings, registry=registry)
    fallbacks = [0]
    for app, keep in ((lean_app, True), (general_app, False)):
        route = next(r for r in app.router.routes if getattr(r, "path", None) == "/classify")
        assert isinstance(route.app, LeanClassify)  # type: ignore[attr-defined]
        general = route.app.general  # type: ignore[attr-defined]
        if keep:

            async def counted(scope: Any, receive: Any, send: Any, general: Any = general) -> None:
                fallbacks[0] += 1
                await general(scope, receive, send)

            route.app.general = counted  # type: ignore[attr-defined]
        else:
            route.app = general  # type: ignore[attr-defined]
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    stack = contextlib.AsyncExitStack()
    for app in (lean_app, general_app):
        asyncio.run_coroutine_threadsafe(stack.enter_async_context(app.router.lifespan_context(app)), loop).result(60)
    try:
        yield Client(lean_app, loop), Client(general_app, loop), fallbacks
    finally:
        asyncio.run_coroutine_threadsafe(stack.aclose(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _same(a: Any, b: Any) -> None:
    assert a.status_code == b.status_code, (a.status_code, a.text[:200], b.status_code, b.text[:200])
    for header in ("content-type", "retry-after", "www-authenticate"):
        assert a.headers.get(header) == b.headers.get(header)
    ja, jb = a.json(), b.json()
    if a.status_code == 200:
        assert ja.pop("latency_ms") >= 0 and jb.pop("latency_ms") >= 0
    assert ja == jb


def _both(clients: tuple[Client, Client, list[int]], url: str, **kwargs: Any) -> tuple[Any, bool]:
    """Send one request to both apps; return the lean app's response and whether it fell back."""
    a, b, fallbacks = clients
    pieces = list(kwargs["content"]) if isinstance(kwargs.get("content"), Iterator) else None
    before = fallbacks[0]
    ra = a.post(url, **(kwargs if pieces is None else {**kwargs, "content": iter(pieces)}))
    rb = b.post(url, **(kwargs if pieces is None else {**kwargs, "content": iter(pieces)}))
    _same(ra, rb)
    return ra, fallbacks[0] > before


# --- the query string ----------------------------------------------------------------------

VALUES = {
    "tol": [
        "0.001",
        "1e-3",
        "1",
        "1.0",
        "0.5",
        "1E-2",
        "0",
        "1.5",
        "-1",
        "nan",
        "inf",
        "abc",
        "",
        ".5",
        "5.",
        "1_0",
        "1e-400",
        "1e400",
        " 0.1",
        "0.1 ",
        "+0.1",
        "0x1",
        "1e-3%20",
        "0%2E1",
    ],
    "max_iter": ["1", "10", "100", "1000", "1001", "0", "-1", "1.0", "01", "ten", "", "1e2", "99999999999"],
    "model": ["mnist", "MNIST", "cifar", "", "m%6Eist", "mnist ", "../mnist"],
    "solver": ["fixed_point", "anderson", "newton", "", "FIXED_POINT", "fixed%5Fpoint"],
    "deadline_ms": ["60000", "5e4", "59999.5", "0", "-5", "60001", "abc", "", "1e5", "nan"],
    "top_k": ["1", "3", "10", "11", "0", "-1", "2.0", "", "x"],
    "stop": ["tol", "certified", "", "exact", "TOL", "certified%20"],
    "trace": ["true", "false", "1", "0", "yes", "True", "", "2"],
}
query_pairs = st.lists(
    st.one_of(
        st.sampled_from(sorted(VALUES)).flatmap(lambda k: st.tuples(st.just(k), st.sampled_from(VALUES[k]))),
        st.tuples(
            st.sampled_from(["tol", "max_iter", "Tol", "other", "", "top_k[]"]), st.text("0123456789.e-", max_size=6)
        ),
    ),
    max_size=4,
)


def _query(pairs: list[tuple[str, str]], bare: bool) -> str:
    parts = [f"{k}={v}" if not bare or i else k for i, (k, v) in enumerate(pairs)]
    return "&".join(parts)


@EXAMPLES
@given(pairs=query_pairs, bare=st.booleans(), image=st.sampled_from(IMAGES[:2]))
def test_any_query_string_gets_the_general_answer(
    clients: tuple[Client, Client, list[int]], pairs: list[tuple[str, str]], bare: bool, image: bytes
) -> None:
    _both(clients, "/classify?" + _query(pairs, bare), content=image, headers={"content-type": "image/png"})


@pytest.mark.parametrize(
    "query",
    [
        "",
        "tol=0.001",
        "tol=1e-3&max_iter=50",
        "model=mnist&top_k=3",
        "solver=anderson&tol=0.01",
        "deadline_ms=60000",
        "stop=certified",
        "trace=true&tol=0.01",
        "stop=tol&trace=0",
        "sequence_id=lean-1&sequence_end=true&trace=1",
    ],
)
def test_common_requests_take_the_lean_path(clients: tuple[Client, Client, list[int]], query: str) -> None:
    for content, ctype in [(SEVEN, "image/png"), (IMAGES[3], "image/jpeg")]:
        r, fell_back = _both(clients, f"/classify?{query}", content=content, headers={"content-type": ctype})
        assert r.status_code == 200 and not fell_back
    r, fell_back = _both(clients, f"/classify?{query}", files={"file": ("seven.png", SEVEN, "image/png")})
    assert r.status_code == 200 and not fell_back
    if query == "":
        assert r.json()["predictions"][0]["label"] == "7"


SEQUENCES = [  # each one ends its sequence: the two apps share one registry, and so one store
    "sequence_id=5&sequence_end=true",
    "sequence_id=5&sequence_start=true&sequence_end=true&stop=certified",
    "sequence_id=s.1:a_b-c&sequence_end=1&tol=0.01",
    "sequence_id=0",
    "sequence_id=0&sequence_end=true",
    "sequence_end=true",
    "sequence_start=false",
    "sequence_id=&sequence_end=true",
    "sequence_id=" + "x" * 129 + "&sequence_end=true",
    "sequence_id=a%20b&sequence_end=true",
    "sequence_id=7&sequence_end=yes",
    "sequence_id=7&sequence_end=true&sequence_end=true",
    "sequence_id=7&sequence_start=2&sequence_end=true",
]


@pytest.mark.parametrize("query", SEQUENCES)
def test_sequence_parameters_get_the_general_answer(clients: tuple[Client, Client, list[int]], query: str) -> None:
    for content, ctype in [(SEVEN, "image/png"), (IMAGES[1], "image/png")]:
        _both(clients, f"/classify?{query}", content=content, headers={"content-type": ctype})


# --- bodies and content types -----------------------------------------------------------------


def _multipart(
    boundary: str,
    parts: list[tuple[list[str], bytes]],
    *,
    preamble: bytes = b"",
    closing: bytes = b"--\r\n",
) -> bytes:
    out = preamble
    for headers, data in parts:
        out += f"--{boundary}\r\n".encode() + b"".join(h.encode("latin-1") + b"\r\n" for h in headers) + b"\r\n"
        out += data + b"\r\n"
    return out + f"--{boundary}".encode() + closing


BOUNDARIES = ["abc123", "----WebKitFormBoundary7MA4YWxkTrZu0gW", "-" * 24 + "9f8e7d", "x" * 70, "a.b_c-d"]
DISPOSITIONS = [
    'form-data; name="file"; filename="seven.png"',
    'form-data; name="file"; filename="my digit (2).png"',
    'form-data; name="file"',
    'form-data; name="image"; filename="a.png"',
    'form-data; filename="a.png"; name="file"',
    "form-data; name=file; filename=a.png",
    'form-data; name="file"; filename=""',
    'form-data; name="file"; filename="C:\\\\x\\\\a.png"',
    'form-data; name="file"; filename="a;b.png"',
    "form-data; name=\"file\"; filename*=utf-8''a.png",
    'attachment; name="file"; filename="a.png"',
    'form-data;name="file";filename="a.png"',
]
CONTENT_TYPES = [
    "multipart/form-data; boundary={b}",
    "multipart/form-data;boundary={b}",
    'multipart/form-data; boundary="{b}"',
    "Multipart/Form-Data; boundary={b}",
    "multipart/form-data; charset=utf-8; boundary={b}",
    "multipart/form-data",
    "multipart/form-data; boundary={b} ",
]
PART_HEADERS = [
    "Content-Type: image/png",
    "content-type: application/octet-stream",
    "Content-Type: image/png; x=y",
    "CONTENT-DISPOSITION: " + DISPOSITIONS[0],
    "X-Extra: 1",
    "Content-Disposition:" + DISPOSITIONS[0],
    "Content-Type:  image/png",
]
DATAS = [SEVEN, IMAGES[1], b"", b"\r\n--abc123", SEVEN + b"\r\n--abc123x", b"plain text", IMAGES[2]]
CLOSINGS = [b"--\r\n", b"--", b"--\r\nepilogue", b"", b"\r\n", b"-- \r\n", b"--\r\n\r\n"]


def _case(
    boundary: str, parts: list[tuple[list[str], bytes]], preamble: bytes, closing: bytes, form: str
) -> tuple[str, bytes]:
    return form.format(b=boundary), _multipart(boundary, parts, preamble=preamble, closing=closing)


# one part, as clients send it, with one thing at a time changed
near_canonical = st.builds(
    lambda boundary, disposition, extra, data, closing, form, preamble: _case(
        boundary, [(["Content-Disposition: " + disposition, *extra], data)], preamble, closing, form
    ),
    st.sampled_from(BOUNDARIES),
    st.sampled_from(DISPOSITIONS),
    st.lists(st.sampled_from(PART_HEADERS), max_size=2),
    st.sampled_from(DATAS),
    st.sampled_from(CLOSINGS[:2] * 4 + CLOSINGS),
    st.sampled_from(CONTENT_TYPES[:1] * 4 + CONTENT_TYPES),
    st.sampled_from([b"", b"", b"", b"preamble\r\n", b"\r\n"]),
)
# any number of parts, any headers
any_structure = st.builds(
    lambda boundary, header_sets, datas, preamble, closing, form: _case(
        boundary, list(zip(header_sets, datas, strict=False)), preamble, closing, form
    ),
    st.sampled_from(BOUNDARIES),
    st.lists(
        st.lists(
            st.one_of(
                st.sampled_from(DISPOSITIONS).map(lambda d: "Content-Disposition: " + d), st.sampled_from(PART_HEADERS)
            ),
            min_size=1,
            max_size=3,
        ),
        max_size=3,
    ),
    st.lists(st.sampled_from(DATAS), min_size=3, max_size=3),
    st.sampled_from([b"", b"preamble\r\n", b"\r\n"]),
    st.sampled_from(CLOSINGS),
    st.sampled_from(CONTENT_TYPES),
)
multipart_cases = st.one_of(near_canonical, any_structure)


def _starlette_files(content_type: str, body: bytes) -> list[bytes] | str:
    """The 'file' uploads Starlette's parser finds (as /classify's general path reads them), or its error."""

    async def parse() -> list[bytes] | str:
        async def stream() -> Any:
            yield body

        try:
            form = await MultiPartParser(Headers({"content-type": content_type}), stream(), max_fields=16).parse()
        except MultiPartException as exc:
            return exc.message
        try:
            return [await v.read() for k, v in form.multi_items() if k == "file" and isinstance(v, UploadFile)]
        finally:
            await form.close()

    return asyncio.run(parse())


@settings(max_examples=600, deadline=None)
@given(case=multipart_cases)
def test_the_single_file_reader_agrees_with_starlettes_parser(case: tuple[str, bytes]) -> None:
    content_type, body = case
    boundary = lean.multipart_boundary(content_type.encode("latin-1"))
    if boundary is None:
        return
    reference = _starlette_files(content_type, body)
    got = lean.single_file(body, boundary)
    if got is not None:
        assert reference == [got]


def test_the_single_file_reader_takes_what_clients_send() -> None:
    for boundary in BOUNDARIES:
        for headers in (
            ['Content-Disposition: form-data; name="file"; filename="seven.png"', "Content-Type: image/png"],
            ['Content-Disposition: form-data; name="file"; filename="seven.png"'],
        ):
            body = _multipart(boundary, [(headers, SEVEN)])
            assert (
                lean.single_file(
                    body, lean.multipart_boundary(f"multipart/form-data; boundary={boundary}".encode()) or b""
                )
                == SEVEN
            )


bodies = st.one_of(
    st.tuples(
        st.sampled_from(
            ["image/png", "image/jpeg", "IMAGE/PNG", "image/png; charset=x", " image/png", "text/plain", ""]
        ),
        st.sampled_from(IMAGES),
    ),
    multipart_cases,
    st.tuples(st.just("application/json"), st.just(b'{"inputs": [[[[0.5]]]]}')),
    st.tuples(st.sampled_from(["image/png", "multipart/form-data; boundary=abc123"]), st.binary(max_size=64)),
)


@EXAMPLES
@given(body=bodies, query=st.sampled_from(["", "tol=0.01", "top_k=2", "max_iter=5"]))
def test_any_body_gets_the_general_answer(
    clients: tuple[Client, Client, list[int]], body: tuple[str, bytes], query: str
) -> None:
    content_type, content = body
    headers = {"content-type": content_type} if content_type else {}
    _both(clients, f"/classify?{query}", content=content, headers=headers)


def test_limits_and_failures_are_the_same(clients: tuple[Client, Client, list[int]]) -> None:
    png = {"content-type": "image/png"}
    big = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8)))
    assert 64 * 1024 < len(big) < 200_000
    r, fell_back = _both(clients, "/classify", content=big, headers=png)  # large: decoded in a worker thread
    assert r.status_code == 200 and fell_back
    r, _ = _both(clients, "/classify", content=b"\0" * 200_001, headers=png)
    assert r.status_code == 413 and "at most 200000" in r.json()["detail"]
    r, _ = _both(clients, "/classify", content=iter([SEVEN] * 1000), headers=png)  # no length: counted while read
    assert r.status_code == 413 and "over 200000" in r.json()["detail"]
    r, _ = _both(clients, "/classify", content=iter([SEVEN[:50], SEVEN[50:]]), headers=png)  # in pieces
    assert r.status_code == 200
    r, _ = _both(clients, "/classify?tol=0.001", files=[("file", ("a.png", SEVEN, "image/png"))] * 4)
    assert r.status_code == 413 and "at most 3" in r.json()["detail"]
    r, _ = _both(clients, "/classify?tol=0.001", files=[("file", ("a.png", SEVEN, "image/png"))] * 2)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2


def test_a_full_queue_is_503_with_retry_after_on_both_paths(clients: tuple[Client, Client, list[int]]) -> None:
    a = clients[0]
    scheduler = a.app.state.registry.schedulers["mnist"]  # type: ignore[attr-defined]
    scheduler.stop()
    try:
        r, fell_back = _both(clients, "/classify?tol=0.01", content=SEVEN, headers={"content-type": "image/png"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and not fell_back
    finally:
        scheduler.start()
    r, _ = _both(clients, "/classify?tol=0.01", content=SEVEN, headers={"content-type": "image/png"})
    assert r.status_code == 200


def test_the_metrics_count_lean_requests_by_route(clients: tuple[Client, Client, list[int]]) -> None:
    a = clients[0]
    a.post("/classify", content=SEVEN, headers={"content-type": "image/png"})
    text = a.get("/metrics").text
    assert 'fpn_requests_total{route="/classify",status="200"}' in text
    assert 'fpn_requests_total{route="/classify",status="400"}' in text  # from the bad bodies above


DIAL = ("stop", "trace", "sequence_id", "sequence_start", "sequence_end", "target_accuracy", "latency_budget_ms")


def test_openapi_still_documents_classify(clients: tuple[Client, Client, list[int]]) -> None:
    spec = clients[0].get("/openapi.json").json()["paths"]["/classify"]["post"]
    params = {p["name"]: p for p in spec["parameters"]}
    assert set(params) == {"tol", "max_iter", "model", "solver", "deadline_ms", "top_k", *DIAL}
    assert params["stop"]["schema"]["enum"] == ["tol", "certified"] and params["stop"]["schema"]["default"] == "tol"
    for flag in ("trace", "sequence_start", "sequence_end"):
        assert params[flag]["schema"]["type"] == "boolean" and params[flag]["description"]
    assert params["tol"]["schema"]["anyOf"][0]["exclusiveMinimum"] == 0
    assert set(spec["requestBody"]["content"]) == {"multipart/form-data", "image/png", "image/jpeg", "application/json"}
    assert {"200", "400", "413", "415", "422", "503"} <= set(spec["responses"])
    assert spec["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("ClassifyResponse")


def test_query_parser_reads_plain_values_only() -> None:
    assert lean.parse_query(b"") == lean.ClassifyQuery()
    assert lean.parse_query(b"tol=1e-3&max_iter=7&model=mnist&solver=anderson&deadline_ms=250.5&top_k=2") == (
        lean.ClassifyQuery(1e-3, 7, "mnist", "anderson", 250.5, 2)
    )
    dial = lean.parse_query(b"tol=1e-3&stop=certified&trace=true&sequence_id=12&sequence_start=1")
    assert dial is not None and dial.tol == 1e-3 and dial.dial is not None
    assert (dial.dial.tol, dial.dial.stop, dial.dial.trace) == (1e-3, "certified", True)
    assert dial.dial.sequence is not None and (dial.dial.sequence.id, dial.dial.sequence.start) == (12, True)
    assert lean.parse_query(b"tol=1e-3").dial is None  # type: ignore[union-attr]  # a plain request
    for bad in [
        b"stop=exact",
        b"trace=yes",
        b"sequence_end=true",
        b"sequence_id=a%20b",
        b"stop=tol&stop=tol",
        b"tol=0",
        b"tol=2",
        b"tol=%31",
        b"tol=1&tol=1",
        b"tol",
        b"tol=1&",
        b"x=1",
        b"max_iter=0",
        b"top_k=01",
        b"deadline_ms=60001",
        b"solver=newton",
        b"model=a%20b",
        b"tol=1e-3;max_iter=2",
        b"tol=+1",
    ]:
        assert lean.parse_query(bad) is None, bad
