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

The dial's parameters (``stop``, ``trace``, ``sequence_id``, ``sequence_start``,
``sequence_end``) are read here too when written plainly, and then parsed with the others by
``batching.parameters`` (a combination it refuses goes to the general route, which answers the
error); a plain request, without them, parses nothing more than before.

The parsers here accept only what they can read with certainty, and return None otherwise.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ..batching.parameters import MAX_DEADLINE_MS, MAX_TOL, RequestParameters, parse_parameters
from ..errors import InputError

QUERY_NAMES = frozenset({b"tol", b"max_iter", b"model", b"solver", b"deadline_ms", b"top_k"})
DIAL_NAMES = frozenset({b"stop", b"trace", b"sequence_id", b"sequence_start", b"sequence_end"})
SOLVERS = {b"fixed_point": "fixed_point", b"anderson": "anderson"}
STOPS = frozenset({b"tol", b"certified"})
FLAGS = frozenset({b"true", b"false", b"1", b"0"})

# Plain decimal numbers: their float value is certain (Python and pydantic both round correctly).
_FLOAT = re.compile(rb"[0-9]{1,20}(?:\.[0-9]{1,20})?(?:[eE][-+]?[0-9]{1,3})?")
_INT = re.compile(rb"[1-9][0-9]{0,8}")
_NAME = re.compile(rb"[A-Za-z0-9_.-]{1,64}")
_SEQUENCE_ID = re.compile(rb"[A-Za-z0-9_.:-]{1,128}")


class ClassifyQuery(NamedTuple):
    tol: float | None = None
    max_iter: int | None = None
    model: str | None = None
    solver: str = "fixed_point"
    deadline_ms: float | None = None
    top_k: int | None = None
    dial: RequestParameters | None = None  # every request parameter, when the dial's were given


def parse_query(query_string: bytes) -> ClassifyQuery | None:
    """The /classify parameters when each one is given at most once, by its own name, in a plain
    form and within its bounds; None for anything else (the general path then decides)."""
    if not query_string:
        return ClassifyQuery()
    values: dict[bytes, bytes] = {}
    dial: dict[bytes, bytes] | None = None
    for part in query_string.split(b"&"):
        key, eq, value = part.partition(b"=")
        if not eq or key in values or (dial is not None and key in dial):
            return None
        if key in QUERY_NAMES:
            values[key] = value
        elif key in DIAL_NAMES:
            if dial is None:
                dial = {}
            dial[key] = value
        else:
            return None
    query = _plain(values)
    if query is None or dial is None:
        return query
    return _with_dial(query, dial)


def _with_dial(query: ClassifyQuery, dial: dict[bytes, bytes]) -> ClassifyQuery | None:
    """``query`` with the dial's parameters parsed along with the others; None unless each is plain
    and ``batching.parameters`` accepts the whole."""
    for key, value in dial.items():
        if key == b"stop":
            plain = value in STOPS
        elif key == b"sequence_id":
            plain = _SEQUENCE_ID.fullmatch(value) is not None
        else:
            plain = value in FLAGS
        if not plain:
            return None
    text = {key.decode("ascii"): value.decode("ascii") for key, value in dial.items()}
    given = {"tol": query.tol, "max_iter": query.max_iter, "deadline_ms": query.deadline_ms, "solver": query.solver}
    try:
        params = parse_parameters({**given, **text}, from_text=True)
    except InputError:
        return None
    return query._replace(dial=params)


def _plain(values: dict[bytes, bytes]) -> ClassifyQuery | None:
    tol = max_iter = top_k = None
    deadline_ms = None
    model = None
    solver = "fixed_point"
    for key, value in values.items():
        if key == b"tol" or key == b"deadline_ms":
            if _FLOAT.fullmatch(value) is None:
                return None
            number = float(value)
            if not (0 < number <= (MAX_TOL if key == b"tol" else MAX_DEADLINE_MS)):
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
