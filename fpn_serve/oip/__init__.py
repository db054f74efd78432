"""The Open Inference Protocol (KServe v2) data plane, shared by every protocol (HTTP and gRPC).

No FastAPI, no grpc: a protocol decodes its wire format into these pieces and encodes their
answers back. The API::

    from fpn_serve import oip

    oip.server_metadata(extensions)        # {"name", "version", "extensions": [...]}
    oip.model_metadata(engine)             # {"name", "versions", "platform", "inputs", "outputs", "parameters"}

    # a request's inputs as received (name, datatype, shape unchecked; data a list, or raw bytes)
    tensors = [oip.InputTensor(name, datatype, shape, data=None, raw=raw_input_contents[0])]
    x = oip.validate_inputs(engine, tensors, settings.max_inputs)   # float32 [N, *input_shape]
    names = oip.validate_outputs(requested_names_or_None)           # tuple of output names

    with registry.lease(model_name, version) as engine:   # ModelNotFound; an unload waits for it
        prepared, result = await oip.execute(registry, engine, x, request_parameters, run, started=t0)
    oip.answer_parameters(prepared)   # the answer's parameters: tol, max_iter, stop, what a target chose
    # run(prepared) -> awaitable ClassifyResult, the protocol's: for solver "fixed_point"
    # registry.scheduler_for(engine).submit_async(prepared) (the shared active batch), else
    # engine.run(prepared) in a worker thread; HTTP's is http.execute.run_model

    for name in names:
        oip.output_datatype(name), oip.output_value(result, name)   # e.g. "FP32", float32 [N, 10]

    oip.decode_raw(raw, datatype, shape)   # raw little-endian row-major bytes -> numpy (BOOL: 1 byte)
    oip.check_shape(shape), oip.raw_size(datatype, shape)

Every failure is a domain error (``fpn_serve.errors``): InputError (a bad tensor, output or
parameter: 400 on v2), LimitExceeded (too many inputs), ModelNotFound, QueueFull; each message
names the problem and what the model expects.
"""

from .execute import Executed, Run, answer_parameters, execute
from .metadata import PLATFORM, SERVER_NAME, model_metadata, server_metadata
from .tensors import DTYPES, OUTPUTS, check_shape, decode_list, decode_raw, output_datatype, output_value, raw_size
from .validate import INPUT_DATATYPE, INPUT_NAME, InputTensor, input_shape, validate_inputs, validate_outputs

__all__ = [
    "DTYPES",
    "INPUT_DATATYPE",
    "INPUT_NAME",
    "OUTPUTS",
    "PLATFORM",
    "SERVER_NAME",
    "Executed",
    "InputTensor",
    "Run",
    "answer_parameters",
    "check_shape",
    "decode_list",
    "decode_raw",
    "execute",
    "input_shape",
    "model_metadata",
    "output_datatype",
    "output_value",
    "raw_size",
    "server_metadata",
    "validate_inputs",
    "validate_outputs",
]
