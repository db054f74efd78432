"""The v2 inference body over HTTP: JSON, or Triton's binary tensor data extension.

A binary request is a JSON header followed by raw tensors; the ``Inference-Header-Content-Length``
header gives the JSON header's length in bytes, and each input sent as raw bytes carries
``parameters.binary_data_size`` (and no ``data``). The raw tensors follow the header in the order
of the inputs, little-endian and row-major, BOOL one byte per element. An output is answered in
binary when its request entry says ``parameters.binary_data: true``, or, by default, when the
request's ``parameters.binary_data_output`` is true; the answer is then built the same way (the
header's length in ``Inference-Header-Content-Length``, each binary output's size in its
``parameters.binary_data_size``).

Every size is checked against the body before a byte is taken: the header length lies within the
body, the inputs' sizes add up to exactly what follows it, and (``oip.validate_inputs``) each size
is its shape's. Everything wrong is a ``MalformedBody`` or ``InputError`` naming the problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from starlette.responses import Response

from ..errors import InputError
from ..oip import InputTensor, output_datatype, output_value
from ..runtime.result import ClassifyResult
from .errors import MalformedBody, UnsupportedType

HEADER_LENGTH = "inference-header-content-length"
BINARY_TYPE = "application/octet-stream"
JSON_TYPE = "application/json"


@dataclass(frozen=True)
class InferBody:
    """An inference request's body, parsed: inputs not yet checked against the model."""

    id: Any
    inputs: list[InputTensor]
    outputs: list[Any] | None  # the requested output names (None: all of them)
    binary: list[bool]  # per requested output (or, for None, one flag for all): answer in binary
    parameters: dict[str, Any]  # the request's parameters, as received


def parse_body(body: bytes, header_length: str | None, content_encoding: str | None = None) -> InferBody:
    """Split and parse a v2 inference body; ``header_length`` is the
    ``Inference-Header-Content-Length`` header (None: the whole body is JSON)."""
    if content_encoding not in (None, "identity"):
        raise UnsupportedType(f"Content-Encoding {content_encoding!r} is not supported; send the body uncompressed")
    view = memoryview(body)
    if header_length is None:
        header, rest = view, view[len(view) :]
    else:
        text = header_length.strip()
        if not text.isdigit() or not 0 < int(text) <= len(body):
            raise MalformedBody(
                f"Inference-Header-Content-Length {header_length!r} must be a whole number of bytes "
                f"from 1 to the body's {len(body)}"
            )
        header, rest = view[: int(text)], view[int(text) :]
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise MalformedBody(f"the inference header is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InputError("the inference request must be a JSON object with an 'inputs' list")
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InputError("the request's 'parameters' must be an object")
    inputs = _inputs(doc.get("inputs"), rest, binary_allowed=header_length is not None)
    outputs, binary = _outputs(doc.get("outputs"), _flag(parameters, "binary_data_output", "the request"))
    return InferBody(doc.get("id"), inputs, outputs, binary, parameters)


def _inputs(raw_inputs: Any, rest: memoryview, binary_allowed: bool) -> list[InputTensor]:
    if not isinstance(raw_inputs, list) or not all(isinstance(t, dict) for t in raw_inputs):
        raise InputError("'inputs' must be a list of tensor objects {name, datatype, shape, data}")
    tensors, offset = [], 0
    for t in raw_inputs:
        params = t.get("parameters") or {}
        if not isinstance(params, dict):
            raise InputError(f"the 'parameters' of input {t.get('name')!r} must be an object")
        size = params.get("binary_data_size")
        raw = None
        if size is not None:
            if not binary_allowed:
                raise MalformedBody(
                    f"input {t.get('name')!r} has binary_data_size but the request has no "
                    "Inference-Header-Content-Length header to tell where its binary data starts"
                )
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InputError(f"binary_data_size of input {t.get('name')!r} must be a byte count, got {size!r}")
            if offset + size > len(rest):
                raise MalformedBody(
                    f"input {t.get('name')!r} declares {size} bytes of binary data but only "
                    f"{len(rest) - offset} follow the inference header"
                )
            raw = rest[offset : offset + size]
            offset += size
        tensors.append(InputTensor(t.get("name"), t.get("datatype"), t.get("shape"), t.get("data"), raw))
    if offset != len(rest):
        raise MalformedBody(
            f"{len(rest) - offset} bytes follow the inference header beyond the inputs' binary_data_size"
        )
    return tensors


def _outputs(requested: Any, binary_default: bool) -> tuple[list[Any] | None, list[bool]]:
    if requested is None:
        return None, [binary_default]
    if not isinstance(requested, list) or not all(isinstance(o, dict) and "name" in o for o in requested):
        raise InputError("'outputs' must be a list of objects with a 'name'")
    binary = []
    for o in requested:
        params = o.get("parameters") or {}
        if not isinstance(params, dict):
            raise InputError(f"the 'parameters' of output {o['name']!r} must be an object")
        if "classification" in params:
            raise InputError("the classification extension is not supported; request the 'label' output")
        flag = _flag(params, "binary_data", f"output {o['name']!r}")
        binary.append(flag if "binary_data" in params else binary_default)
    return [o["name"] for o in requested], binary


def _flag(params: dict[str, Any], key: str, whose: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise InputError(f"{key} of {whose} must be true or false, got {value!r}")
    return value


def answer(
    model: str,
    version: str,
    request_id: Any,
    result: ClassifyResult,
    names: tuple[str, ...],
    binary: list[bool],
    parameters: dict[str, Any] | None = None,
) -> Response:
    """The inference answer: JSON, or with the outputs asked in binary after the JSON header;
    ``parameters`` (what ran: tol, max_iter, stop, a target's choice) in the answer's ``parameters``."""
    flags = binary if len(binary) == len(names) else binary * len(names)
    outputs, chunks = [], []
    for name, as_binary in zip(names, flags, strict=True):
        value = output_value(result, name)
        tensor: dict[str, Any] = {"name": name, "datatype": output_datatype(name), "shape": list(value.shape)}
        if as_binary:
            chunk = value.tobytes()
            tensor["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            tensor["data"] = value.ravel()  # orjson writes numpy arrays, inf and NaN as null
        outputs.append(tensor)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if parameters:
        doc["parameters"] = parameters
    if request_id is not None:
        doc["id"] = request_id
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return Response(header, media_type=JSON_TYPE)
    return Response(
        b"".join([header, *chunks]),
        media_type=BINARY_TYPE,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
