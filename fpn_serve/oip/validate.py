"""Strict validation of an inference request against the model, as Triton's: every input named,
once, with the model's datatype and shape and data of exactly that shape; only known outputs.

A protocol turns what it received into ``InputTensor`` objects (the name, datatype and shape as
received, unchecked; the data either as a list of numbers or as raw bytes) and calls
``validate_inputs``, which checks the header of every tensor before decoding any data, so no
declared shape allocates memory. Each failure is an InputError (LimitExceeded for more inputs
than a request may carry) that names the problem and what the model expects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError, LimitExceeded
from ..runtime.engine import Engine
from .tensors import OUTPUTS, check_shape, decode_list, decode_raw

INPUT_NAME = "x"  # the name of every model's one input (Q.onnx's input)
INPUT_DATATYPE = "FP32"


@dataclass(frozen=True)
class InputTensor:
    """One input tensor as a protocol received it: ``data`` a (nested) list of numbers, or ``raw``
    its little-endian row-major bytes (exactly one of the two)."""

    name: Any
    datatype: Any
    shape: Any
    data: Any = None
    raw: bytes | bytearray | memoryview | None = None


def input_shape(engine: Engine) -> list[int]:
    """The model's input shape as metadata states it, the batch axis as -1."""
    return [-1, *engine.manifest.input.shape]


def validate_inputs(engine: Engine, tensors: Sequence[InputTensor], max_inputs: int) -> np.ndarray:
    """The request's inputs as float32 [N, *input_shape] (1 <= N <= ``max_inputs``).

    Raises InputError for an unknown, duplicate or missing input, a datatype or shape other than
    the model's, or data whose length is not the shape's; LimitExceeded for N over ``max_inputs``."""
    names = [t.name for t in tensors]
    for name in names:
        if not isinstance(name, str):
            raise InputError(f"every input needs a 'name' string, got {name!r}; the model's input is {INPUT_NAME!r}")
        if name != INPUT_NAME:
            raise InputError(f"unknown input {name!r}; the model's only input is {INPUT_NAME!r}")
    if len(names) > 1:
        raise InputError(f"input {INPUT_NAME!r} is given {len(names)} times; send it once")
    if not names:
        raise InputError(f"input {INPUT_NAME!r} is missing; the model takes one input {INPUT_NAME!r}")
    tensor = tensors[0]
    if tensor.datatype != INPUT_DATATYPE:
        raise InputError(f"input {INPUT_NAME!r} has datatype {tensor.datatype!r}; the model takes {INPUT_DATATYPE}")
    want = input_shape(engine)
    shape = check_shape(tensor.shape, f"input {INPUT_NAME!r}")
    if len(shape) != len(want) or list(shape[1:]) != want[1:] or shape[0] < 1:
        raise InputError(
            f"input {INPUT_NAME!r} has shape {list(shape)}; the model takes {want} (N >= 1 inputs of shape {want[1:]})"
        )
    if shape[0] > max_inputs:
        raise LimitExceeded(f"{shape[0]} inputs in one request; at most {max_inputs} are allowed")
    what = f"input {INPUT_NAME!r}"
    if tensor.raw is not None:
        if tensor.data is not None:
            raise InputError(f"{what} has both 'data' and binary data; send one")
        return decode_raw(tensor.raw, INPUT_DATATYPE, shape, what)
    if tensor.data is None:
        raise InputError(f"{what} has no 'data'")
    return decode_list(tensor.data, INPUT_DATATYPE, shape, what)


def validate_outputs(requested: Sequence[Any] | None) -> tuple[str, ...]:
    """The names of the outputs to answer: all of them for None, else the requested ones, each
    known and named once (InputError otherwise)."""
    if requested is None:
        return tuple(OUTPUTS)
    names = tuple(requested)
    for name in names:
        if not isinstance(name, str) or name not in OUTPUTS:
            raise InputError(f"unknown output {name!r}; the model's outputs: {', '.join(OUTPUTS)}")
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"outputs {twice} are requested more than once; name each once")
    return names
