"""The gRPC messages of the Open Inference Protocol to and from ``fpn_serve.oip``'s pieces.

Decoding (``input_tensors``, ``parameters_of``) checks only what the wire format alone decides:
one ``raw_input_contents`` entry per input or none, never both raw and typed contents for one
input, typed contents in the field of their datatype. Everything else (names, datatypes, shapes,
data sizes, outputs) is ``oip``'s strict validation, the same as over HTTP.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import oip
from ..errors import InputError
from ..runtime.engine import Engine
from ..runtime.result import ClassifyResult
from . import grpc_service_pb2 as pb

# where typed contents of each datatype go (InferTensorContents); FP16 and BF16 travel raw only
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameters_of(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """A parameter map as plain values (bool, int, str or float); a parameter with no value set
    counts as not sent."""
    values: dict[str, Any] = {}
    for name, param in params.items():
        which = param.WhichOneof("parameter_choice")
        if which is not None:
            values[name] = getattr(param, which)
    return values


def input_tensors(request: pb.ModelInferRequest) -> list[oip.InputTensor]:
    """The request's input tensors for ``oip.validate_inputs``: each with its raw bytes (from
    ``raw_input_contents``, in the order of ``inputs``) or its typed contents."""
    raw = request.raw_input_contents
    inputs = request.inputs
    if raw and len(raw) != len(inputs):
        raise InputError(
            f"raw_input_contents has {len(raw)} entries for {len(inputs)} inputs; send one per input, "
            "in the order of 'inputs', or send every input's data in its 'contents'"
        )
    tensors = []
    for i, tensor in enumerate(inputs):
        if raw:
            if tensor.HasField("contents") and tensor.contents.ListFields():
                raise InputError(
                    f"input {tensor.name!r} has both 'contents' and raw_input_contents; send its data one way"
                )
            tensors.append(oip.InputTensor(tensor.name, tensor.datatype, list(tensor.shape), raw=raw[i]))
        else:
            tensors.append(oip.InputTensor(tensor.name, tensor.datatype, list(tensor.shape), data=_contents(tensor)))
    return tensors


def _contents(tensor: pb.ModelInferRequest.InferInputTensor) -> list[Any]:
    filled = [field.name for field, _ in tensor.contents.ListFields()]
    want = CONTENTS_FIELD.get(tensor.datatype)
    if not filled:
        where = f"contents.{want}" if want is not None else "'contents'"
        raise InputError(f"input {tensor.name!r} has no data; send it in raw_input_contents or in {where}")
    if want is not None and filled != [want]:
        raise InputError(
            f"input {tensor.name!r} of datatype {tensor.datatype} has data in {', '.join(filled)}; "
            f"{tensor.datatype} data goes in contents.{want} alone"
        )
    return list(getattr(tensor.contents, filled[0]))


def infer_response(
    request: pb.ModelInferRequest,
    engine: Engine,
    result: ClassifyResult,
    names: tuple[str, ...],
    parameters: Mapping[str, float | int | str] | None = None,
) -> pb.ModelInferResponse:
    """The answer: the outputs ``names`` (``oip``'s output table) as raw little-endian bytes, and
    ``parameters`` (what ran: tol, max_iter, stop, a target's choice) in the response's parameters."""
    response = pb.ModelInferResponse(model_name=engine.name, model_version=engine.manifest.version, id=request.id)
    for key, given in (parameters or {}).items():
        if isinstance(given, str):
            response.parameters[key].string_param = given
        elif isinstance(given, int):
            response.parameters[key].int64_param = given
        else:
            response.parameters[key].double_param = given
    for name in names:
        value = oip.output_value(result, name)
        response.outputs.add(name=name, datatype=oip.output_datatype(name), shape=value.shape)
        response.raw_output_contents.append(value.tobytes())
    return response


def model_metadata(engine: Engine) -> pb.ModelMetadataResponse:
    """``oip.model_metadata`` as the gRPC message (which has no field for its 'parameters')."""
    doc = oip.model_metadata(engine)
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=doc["name"],
        versions=doc["versions"],
        platform=doc["platform"],
        inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in doc["inputs"]],
        outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in doc["outputs"]],
    )
