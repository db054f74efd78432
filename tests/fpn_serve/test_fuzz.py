"""Property-based bad input for both APIs: every request gets a 4xx JSON error or a valid answer,
never a 5xx, and the server answers correctly afterwards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

param_values = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.text(max_size=20),
    st.sampled_from(["nan", "inf", "-0", "1e-400", "../../etc/passwd", "fixed_point", "anderson", "%00", ""]),
    st.sampled_from(["true", "false", "1", "0", "yes", "tol", "certified", "x" * 200]),
)
NAMES = ("tol", "max_iter", "model", "solver", "deadline_ms", "top_k", "stop", "trace")
SEQUENCE = ("sequence_id", "sequence_start", "sequence_end")
query = st.fixed_dictionaries({}, optional={k: param_values for k in NAMES + SEQUENCE})
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.floats(), st.integers(), st.text(max_size=5)),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=40,
)
bodies = st.one_of(
    st.tuples(st.just("application/json"), json_values.map(lambda v: json.dumps(v).encode())),
    st.tuples(
        st.just("application/json"),
        st.dictionaries(st.sampled_from(["inputs", "x"]), json_values).map(lambda v: json.dumps(v).encode()),
    ),
    st.tuples(
        st.sampled_from(["image/png", "image/jpeg", "text/plain", "", "multipart/form-data"]), st.binary(max_size=300)
    ),
)


def _check(r: httpx.Response, error_key: str) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    body = r.json()
    if r.status_code >= 400:
        assert isinstance(body.get(error_key), str) and body[error_key]
    else:
        assert "predictions" in body or "outputs" in body


@FUZZ
@given(params=query, body=bodies)
def test_classify_never_fails_on_any_request(
    server: httpx.Client, params: dict[str, Any], body: tuple[str, bytes]
) -> None:
    content_type, content = body
    headers = {"content-type": content_type} if content_type else {}
    r = server.post(
        "/classify", params={k: v for k, v in params.items() if v is not None}, content=content, headers=headers
    )
    _check(r, "detail")


infer_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {
            "inputs": st.lists(
                st.fixed_dictionaries(
                    {
                        "name": st.text(max_size=3),
                        "shape": st.lists(st.integers(-2, 30), max_size=5),
                        "datatype": st.sampled_from(["FP32", "INT64", "BOOL", "fp32", "BYTES"]),
                        "data": json_values,
                    }
                ),
                max_size=2,
            )
        },
        optional={
            "parameters": st.dictionaries(
                st.sampled_from(["tol", "max_iter", "deadline_ms", "solver", "x"]), json_values, max_size=3
            ),
            "outputs": json_values,
            "id": json_values,
        },
    ),
)


@FUZZ
@given(body=infer_bodies, name=st.sampled_from(["mnist", "other", "..", "mnist/versions/1", "mnist/versions/9"]))
def test_v2_infer_never_fails_on_any_request(server: httpx.Client, body: Any, name: str) -> None:
    r = server.post(
        f"/v2/models/{name}/infer", content=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    if (
        r.status_code == 404
        and r.headers.get("content-type", "").startswith("application/json")
        and "detail" in r.json()
    ):
        return  # a path no route matches (FastAPI's own 404)
    _check(r, "error")


def test_server_is_still_correct_after_the_fuzzing(server: httpx.Client, repo: Path) -> None:
    png = (repo / "examples" / "seven.png").read_bytes()
    r = server.post("/classify", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "7"
