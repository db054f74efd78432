"""Parsers for the lean path of ``POST /classify`` (``app.LeanClassify``): the common request
answered without FastAPI's parameter, dependency and form machinery.

A request whose query parameters are all given in a plain form and within their bounds, for a
served model, with a small raw ``image/png``/``image/jpeg`` body or a multipart body holding
exactly one ``file`` part in the shape browsers, curl and httpx send, is answered on the lean
path. Every other request -- a parameter that may be invalid or is written unusually, another
content type, JSON, several files, a large body -- goes to the declared FastAPI route unchanged
(with the body handed on when it was already read); that route is also what OpenAPI documents.
Both paths share the body limit, the image decoding (a corrupt image gets the same 400 either
way), the model dispatch, the answer and the exception handlers, so they give the same response;
the tests hold the lean path to that on random requests.

The parsers here accept only what they can read with certainty, and return None otherwise.
"""

from __future__ import annotations

import re
from typing import NamedTuple

QUERY_NAMES = frozenset({b"tol", b"max_iter", b"model", b"solver", b"deadline_ms", b"top_k"})
SOLVERS = {b"fixed_point": "fixed_point", b"anderson": "anderson"}

# Plain decimal numbers: their float value is certain (Python and pydantic both round correctly).
_FLOAT = re.compile(rb"[0-9]{1,20}(?:\.[0-9]{1,20})?(?:[eE][-+]?[0-9]{1,3})?")
_INT = re.compile(rb"[1-9][0-9]{0,8}")
_NAME = re.compile(rb"[A-Za-z0-9_.-]{1,64}")


class ClassifyQuery(NamedTuple):
    tol: float | None = None
    max_iter: int | None = None
    model: str | None = None
    solver: str = "fixed_point"
    deadline_ms: float | None = None
    top_k: int | None = None


def parse_query(query_string: bytes) -> ClassifyQuery | None:
    """The /classify parameters when each one is given at most once, by its own name, in a plain
    form and within its bounds; None for anything else (the general path then decides)."""
    if not query_string:
        return ClassifyQuery()
    values: dict[bytes, bytes] = {}
    for part in query_string.split(b"&"):
        key, eq, value = part.partition(b"=")
        if not eq or key not in QUERY_NAMES or key in values:
            return None
        values[key] = value
    tol = max_iter = top_k = None
    deadline_ms = None
    model = None
    solver = "fixed_point"
    for key, value in values.items():
        if key == b"tol" or key == b"deadline_ms":
            if _FLOAT.fullmatch(value) is None:
                return None
            number = float(value)
            if not (0 < number <= (1 if key == b"tol" else 60_000)):
                return None
            if key == b"tol":
                tol = number
            else:
                deadline_ms = number
        elif key == b"max_iter" or key == b"top_k":
            if _INT.fullmatch(value) is None:
                return None
            if key == b"max_iter":
                max_iter = int(value)
            else:
                top_k = int(value)
        elif key == b"model":
            if _NAME.fullmatch(value) is None:
                return None
            model = value.decode("ascii")
        else:
            chosen = SOLVERS.get(value)
            if chosen is None:
                return None
            solver = chosen
    return ClassifyQuery(tol, max_iter, model, solver, deadline_ms, top_k)


_BOUNDARY = re.compile(rb"multipart/form-data; ?boundary=([A-Za-z0-9_.-]{1,70})")
_DISPOSITION = re.compile(rb'form-data; name="file"; filename="[A-Za-z0-9 _.()-]{1,128}"')
_PART_TYPE = re.compile(rb"[A-Za-z0-9!#$&^_.+-]{1,64}/[A-Za-z0-9!#$&^_.+-]{1,64}")


def multipart_boundary(content_type: bytes) -> bytes | None:
    """The boundary of ``multipart/form-data; boundary=B`` with a plain token B; None otherwise."""
    match = _BOUNDARY.fullmatch(content_type)
    return match.group(1) if match else None


def single_file(body: bytes, boundary: bytes) -> bytes | None:
    """The content of the one part of a multipart body shaped as browsers, curl and httpx send a
    single file field named ``file``::

        --B CRLF
        Content-Disposition: form-data; name="file"; filename="NAME" CRLF
        [Content-Type: TYPE CRLF]
        CRLF
        DATA CRLF --B-- [CRLF]

    None for any other shape (the general multipart parser then reads it).
    """
    opening = b"--" + boundary + b"\r\n"
    if not body.startswith(opening):
        return None
    head_end = body.find(b"\r\n\r\n", len(opening))
    if head_end < 0:
        return None
    seen: set[bytes] = set()
    for line in body[len(opening) : head_end].split(b"\r\n"):
        name, sep, value = line.partition(b": ")
        name = name.lower()
        if not sep or name in seen:
            return None
        seen.add(name)
        if name == b"content-disposition":
            if _DISPOSITION.fullmatch(value) is None:
                return None
        elif name != b"content-type" or _PART_TYPE.fullmatch(value) is None:
            return None
    if b"content-disposition" not in seen:
        return None
    start = head_end + 4
    delimiter = b"\r\n--" + boundary
    end = body.find(delimiter, start)
    if end < 0:
        return None
    closing = body[end + len(delimiter) :]
    if closing not in (b"--", b"--\r\n"):
        return None
    return body[start:end]
