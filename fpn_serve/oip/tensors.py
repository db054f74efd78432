"""Tensors of the Open Inference Protocol: datatypes, raw little-endian bytes <-> numpy, the outputs.

Raw tensor bytes (Triton's binary tensor data over HTTP, ``raw_input_contents`` over gRPC) are
the elements in row-major order, little-endian, ``BOOL`` one byte each. A declared shape is
checked before anything is allocated from it: every dimension a non-negative integer and the
element count bounded, so a shape cannot overflow or reserve memory the body does not hold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import InputError
from ..runtime.result import ClassifyResult

# fixed-size datatypes by their protocol name (BYTES, strings with a length prefix, is not one)
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
MAX_ELEMENTS = 1 << 40  # no tensor of a request can declare more (the body limit is far lower)

# The outputs every model answers: name -> (datatype, the value's shape after the batch axis as a
# function of the class count, the value taken from a result). Datatypes match the arrays' dtypes.
_Take = Callable[[ClassifyResult], np.ndarray]
OUTPUTS: dict[str, tuple[str, bool, _Take]] = {
    "logits": ("FP32", True, lambda r: r.logits),
    "probabilities": ("FP32", True, lambda r: r.probabilities),
    "label": ("INT64", False, lambda r: r.labels),
    "iterations": ("INT32", False, lambda r: r.iterations),
    "residual": ("FP32", False, lambda r: r.residuals),
    "converged": ("BOOL", False, lambda r: r.converged),
    "error_bound": ("FP32", False, lambda r: r.error_bounds),
    "label_certified": ("BOOL", False, lambda r: r.certified),
}


def output_datatype(name: str) -> str:
    return OUTPUTS[name][0]


def output_value(result: ClassifyResult, name: str) -> np.ndarray:
    """Output ``name`` of ``result`` as a C-contiguous array of the output's datatype
    ([N, classes] for logits and probabilities, [N] for the others)."""
    datatype, _, take = OUTPUTS[name]
    return np.ascontiguousarray(take(result), dtype=DTYPES[datatype])


def output_shape(name: str, classes: int) -> list[int]:
    """The output's shape as model metadata states it (-1: the batch axis)."""
    return [-1, classes] if OUTPUTS[name][1] else [-1]


def check_shape(shape: Any, what: str = "input") -> tuple[int, ...]:
    """A declared shape as a tuple of ints; InputError unless it is a list of non-negative
    integers whose product is at most MAX_ELEMENTS (checked dimension by dimension)."""
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InputError(f"{what} shape must be a list of integers, got {shape!r}")
    count = 1
    for d in shape:
        if d < 0:
            raise InputError(f"{what} shape {list(shape)} has a negative dimension")
        count *= d
        if count > MAX_ELEMENTS:
            raise InputError(f"{what} shape {list(shape)} declares more than {MAX_ELEMENTS} elements")
    return tuple(shape)


def raw_size(datatype: str, shape: tuple[int, ...]) -> int:
    """Bytes that raw data of ``datatype`` and (checked) ``shape`` takes; InputError for a datatype
    that has no fixed size."""
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise InputError(f"datatype {datatype!r} has no fixed-size raw form; use one of {', '.join(DTYPES)}")
    return math.prod(shape) * dtype.itemsize


def decode_raw(
    raw: bytes | bytearray | memoryview, datatype: str, shape: tuple[int, ...], what: str = "input"
) -> np.ndarray:
    """Raw little-endian row-major bytes as an array of ``shape`` (a read-only view of ``raw``, no
    copy); InputError when the byte count is not the shape's. BOOL bytes other than 0 are true."""
    want = raw_size(datatype, shape)
    if len(raw) != want:
        raise InputError(f"{what} has {len(raw)} bytes of {datatype} data; shape {list(shape)} needs {want}")
    dtype = DTYPES[datatype]
    if datatype == "BOOL":
        flags: np.ndarray = np.frombuffer(raw, dtype=np.uint8).reshape(shape) != 0
        return flags
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def decode_list(data: Any, datatype: str, shape: tuple[int, ...], what: str = "input") -> np.ndarray:
    """JSON (or typed gRPC) contents, flat in row-major order or nested, as an array of ``shape``;
    InputError for anything but numbers or a count that is not the shape's."""
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise InputError(f"datatype {datatype!r} is not supported; use one of {', '.join(DTYPES)}")
    if isinstance(data, (str, bytes, dict)) or not hasattr(data, "__len__"):
        raise InputError(f"{what} data must be a list of numbers (flat row-major or nested)")
    try:
        arr = np.asarray(data, dtype=dtype.newbyteorder("="))
    except (ValueError, TypeError, OverflowError) as exc:
        raise InputError(f"{what} data must hold only numbers of datatype {datatype}: {exc}") from exc
    want = math.prod(shape)
    if arr.size != want:
        raise InputError(f"{what} data has {arr.size} elements; shape {list(shape)} needs {want}")
    return arr.reshape(shape)
