"""The Open Inference Protocol over gRPC on a real ``fpn-serve`` process, as stock clients use it:
tritonclient.grpc, and the service's own generated stub for what tritonclient cannot send."""

from __future__ import annotations

import ast
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from fpn_serve.grpc import grpc_service_pb2 as pb
from fpn_serve.grpc import grpc_service_pb2_grpc as pb_grpc

from ..conftest import _free_port, running_server  # type: ignore[import-not-found]

pytestmark = pytest.mark.slow

TOKEN = "s3cret"
ENDLESS = 10**8  # iterations: minutes of work on a model that never meets tol=1e-9
Code = grpc.StatusCode


class Served:
    """A running server: its HTTP client, its gRPC address, a tritonclient and a raw stub."""

    def __init__(self, http: httpx.Client, grpc_port: int, token: str | None = None) -> None:
        self.http = http
        self.address = f"127.0.0.1:{grpc_port}"
        self.client = triton.InferenceServerClient(self.address)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def infer(self, request: pb.ModelInferRequest, timeout: float = 30) -> pb.ModelInferResponse:
        return self.stub.ModelInfer(request, metadata=self.metadata, timeout=timeout)

    def close(self) -> None:
        self.channel.close()
        self.client.close()


@contextmanager
def serving(
    model: Path, log_dir: Path, env: dict[str, str] | None = None, token: str | None = None
) -> Iterator[Served]:
    grpc_port = _free_port()
    env = {**(env or {}), "FPN_SERVE_GRPC_PORT": str(grpc_port)}
    if token:
        env["FPN_SERVE_TOKEN"] = token
    with running_server(model, log_dir, env) as http:
        if token:
            http.headers["authorization"] = f"Bearer {token}"
        served = Served(http, grpc_port, token)
        try:
            yield served
        finally:
            served.close()


@pytest.fixture(scope="module")
def mnist(shipped_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving(shipped_model, tmp_path_factory.mktemp("grpc-mnist")) as served:
        yield served


@pytest.fixture(scope="module")
def never(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A model whose residual is 1/k after k iterations (tol=1e-9 runs until max_iter), behind a token."""
    from .synthetic import linear_model

    model = linear_model(tmp_path_factory.mktemp("never") / "never", scale=1.0)
    env = {"FPN_SERVE_MAX_ITER_CAP": str(ENDLESS)}
    with serving(model, tmp_path_factory.mktemp("grpc-never"), env, token=TOKEN) as served:
        yield served


@pytest.fixture(scope="module")
def digits(mnist_root: Path) -> tuple[np.ndarray, np.ndarray]:
    from training.data import load_split

    test = load_split("mnist", mnist_root, train=False, limit=16)
    return test.normalise(test.images).numpy(), test.labels.numpy()


def _request(x: np.ndarray, model: str = "mnist", **parameters: Any) -> pb.ModelInferRequest:
    """A raw-bytes request as tritonclient.grpc builds it; parameters typed by their Python type."""
    request = pb.ModelInferRequest(model_name=model, id="req-1")
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    for name, value in parameters.items():
        param = request.parameters[name]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = value
    return request


def _outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    dtypes = {"FP32": "<f4", "INT64": "<i8", "INT32": "<i4", "BOOL": "?"}
    return {
        o.name: np.frombuffer(raw, dtype=dtypes[o.datatype]).reshape(tuple(o.shape))
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, flags=re.M)
    return float(match.group(1)) if match else 0.0


def _until(condition: Callable[[], bool], seconds: float) -> float | None:
    """Poll ``condition`` until it holds; the seconds that took, or None if it never did."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if condition():
            return time.monotonic() - started
    return None


# -- the .proto against the stock client's ---------------------------------------------------


def test_every_message_and_call_matches_the_stock_client_field_by_field() -> None:
    """Names, numbers, types and labels as tritonclient's copy of Triton's grpc_service.proto has
    them; importing both in one process works (the service keeps its own descriptor pool)."""
    from tritonclient.grpc import service_pb2 as theirs

    ours = pb.DESCRIPTOR
    assert ours.package == "inference"
    for name, message in ours.message_types_by_name.items():
        _same_message(message, theirs.DESCRIPTOR.message_types_by_name[name])
    their_service = theirs.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in ours.services_by_name["GRPCInferenceService"].methods:
        other = their_service.methods_by_name[method.name]
        assert method.input_type.full_name == other.input_type.full_name, method.name
        assert method.output_type.full_name == other.output_type.full_name, method.name


def _same_message(ours: Any, theirs: Any) -> None:
    for field in ours.fields:
        other = theirs.fields_by_number[field.number]
        assert (field.name, field.type, field.is_repeated) == (other.name, other.type, other.is_repeated), field
        if field.message_type is not None:
            assert field.message_type.full_name == other.message_type.full_name
    for nested in ours.nested_types:
        _same_message(nested, theirs.nested_types_by_name[nested.name])


def test_only_the_grpc_package_imports_grpc(repo: Path) -> None:
    importers = []
    for path in sorted((repo / "fpn_serve").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            if any(n == "grpc" or n.startswith("grpc.") for n in names):
                importers.append(path.relative_to(repo).parent.as_posix())
    assert set(importers) == {"fpn_serve/grpc"}


# -- health, metadata, inference -------------------------------------------------------------


def test_health_and_metadata_match_http_v2(mnist: Served) -> None:
    c = mnist.client
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("mnist")
    assert c.is_model_ready("mnist", "1")
    server = c.get_server_metadata()
    assert (server.name, server.version) == (
        mnist.http.get("/v2").json()["name"],
        mnist.http.get("/v2").json()["version"],
    )
    assert "model_repository" in server.extensions
    meta = c.get_model_metadata("mnist", as_json=True)
    http = mnist.http.get("/v2/models/mnist").json()
    assert meta["name"] == "mnist" and meta["versions"] == http["versions"] and meta["platform"] == http["platform"]
    for key in ("inputs", "outputs"):
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta[key]] == [
            (t["name"], t["datatype"], t["shape"]) for t in http[key]
        ]
    for call in (
        lambda: c.get_model_metadata("cifar"),
        lambda: c.is_model_ready("cifar"),
        lambda: c.get_model_metadata("mnist", "7"),
    ):
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == "StatusCode.NOT_FOUND" and "mnist" in err.value.message()


def test_infer_gives_the_answers_of_classify_and_of_the_engine(
    mnist: Served, shipped_model: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    from fpn_serve import Engine

    x, y = digits
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    # tritonclient sends raw_input_contents and int/str parameters (KServe's InferParameter has no double)
    result = mnist.client.infer("mnist", [tensor], parameters={"tol": "1e-3", "max_iter": 40}, request_id="r7")
    assert result.get_response().id == "r7" and result.get_response().model_version == "1"
    classify = mnist.http.post("/classify", params={"tol": 1e-3, "max_iter": 40}, json={"inputs": x.tolist()})
    predictions = classify.json()["predictions"]
    engine = Engine.load(shipped_model).classify(x, tol=1e-3, max_iter=40)
    assert result.as_numpy("label").tolist() == [int(p["label"]) for p in predictions] == engine.labels.tolist()
    assert (result.as_numpy("label") == y).mean() >= 0.9
    assert (
        result.as_numpy("iterations").tolist() == [p["iterations"] for p in predictions] == engine.iterations.tolist()
    )
    np.testing.assert_allclose(result.as_numpy("logits"), engine.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("probabilities"), [p["probabilities"] for p in predictions], atol=1e-6)
    assert result.as_numpy("converged").tolist() == engine.converged.tolist()
    assert result.as_numpy("label_certified").dtype == np.bool_
    # typed contents and a double parameter (the stub): the same answer, only the outputs asked for
    typed = pb.ModelInferRequest(
        model_name="mnist", outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="iterations")]
    )
    typed.inputs.add(name="x", datatype="FP32", shape=list(x.shape)).contents.fp32_contents.extend(x.ravel().tolist())
    typed.parameters["tol"].double_param = 1e-3
    typed.parameters["max_iter"].int64_param = 40
    out = _outputs(mnist.infer(typed))
    assert list(out) == ["iterations"] and out["iterations"].tolist() == engine.iterations.tolist()


def test_dial_parameters_reach_the_runtime(mnist: Served, digits: tuple[np.ndarray, np.ndarray]) -> None:
    x = digits[0][:4]
    loose = _outputs(mnist.infer(_request(x, tol=1e-2)))["iterations"]
    tight = _outputs(mnist.infer(_request(x, tol=1e-6, max_iter=200)))["iterations"]
    capped = _outputs(mnist.infer(_request(x, tol=1e-9, max_iter=3)))
    assert (loose < tight).all() and (capped["iterations"] == 3).all() and not capped["converged"].any()
    anderson = _outputs(mnist.infer(_request(x, tol=1e-4, solver="anderson")))
    assert anderson["converged"].all()
    certified = _outputs(mnist.infer(_request(x, tol=1e-6, max_iter=200, stop="certified")))
    assert certified["label_certified"].all() and (certified["iterations"] <= tight).all()
    answer = mnist.infer(_request(x, target_accuracy=0.99))  # a target chooses tol: the answer says which
    said = {
        k: v.WhichOneof("parameter_choice") and getattr(v, v.WhichOneof("parameter_choice"))
        for k, v in answer.parameters.items()
    }
    assert said["chosen_by"] == "target_accuracy" and said["accuracy_lower_bound"] >= 0.99 and said["stop"] == "tol"
    assert said["max_iter"] == 100 and 0 < said["tol"] <= 1


BAD_REQUESTS: list[tuple[str, Callable[[pb.ModelInferRequest], None], str]] = [
    ("unknown input", lambda r: setattr(r.inputs[0], "name", "input0"), "unknown input 'input0'"),
    ("datatype", lambda r: setattr(r.inputs[0], "datatype", "FP64"), "the model takes FP32"),
    ("shape", lambda r: r.inputs[0].shape.__setitem__(slice(None), [1, 28, 28]), "the model takes [-1, 1, 28, 28]"),
    ("no rows", lambda r: r.inputs[0].shape.__setitem__(0, 0), "N >= 1"),
    ("negative dim", lambda r: r.inputs[0].shape.__setitem__(1, -1), "negative dimension"),
    ("short raw", lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 12), "needs 3136"),
    ("raw count", lambda r: r.raw_input_contents.append(b""), "raw_input_contents has 2 entries for 1 inputs"),
    ("no inputs", lambda r: (r.inputs.pop(), r.raw_input_contents.pop()), "input 'x' is missing"),
    (
        "twice",
        lambda r: (r.inputs.add().CopyFrom(r.inputs[0]), r.raw_input_contents.append(r.raw_input_contents[0])),
        "given 2 times",
    ),
    ("raw and typed", lambda r: r.inputs[0].contents.fp32_contents.extend([0.0] * 784), "both 'contents' and raw"),
    ("typed field", lambda r: _typed(r, "int_contents", [0] * 784), "FP32 data goes in contents.fp32_contents"),
    ("typed count", lambda r: _typed(r, "fp32_contents", [0.0] * 783), "has 783 elements"),
    ("no data", lambda r: _typed(r, None, []), "has no data"),
    ("not finite", lambda r: _typed(r, "fp32_contents", [float("nan")] * 784), "finite"),
    ("unknown output", lambda r: r.outputs.add(name="scores"), "unknown output 'scores'"),
    ("output twice", lambda r: (r.outputs.add(name="label"), r.outputs.add(name="label")), "more than once"),
    ("tol range", lambda r: r.parameters["tol"].MergeFrom(pb.InferParameter(double_param=5.0)), "0 < tol <= 1"),
    (
        "tol text",
        lambda r: r.parameters["tol"].MergeFrom(pb.InferParameter(string_param="fast")),
        "tol must be a number",
    ),
    ("max_iter", lambda r: r.parameters["max_iter"].MergeFrom(pb.InferParameter(int64_param=0)), "max_iter must be"),
    ("max_iter cap", lambda r: r.parameters["max_iter"].MergeFrom(pb.InferParameter(int64_param=10**7)), "1000"),
    ("solver", lambda r: r.parameters["solver"].MergeFrom(pb.InferParameter(string_param="newton")), "fixed_point"),
    ("stop", lambda r: r.parameters["stop"].MergeFrom(pb.InferParameter(string_param="never")), "certified"),
    (
        "flag",
        lambda r: r.parameters["trace"].MergeFrom(pb.InferParameter(int64_param=7)),
        "trace must be true or false",
    ),
    ("no model", lambda r: setattr(r, "model_name", ""), "names no model"),
]


def _typed(request: pb.ModelInferRequest, field: str | None, values: list[Any]) -> None:
    del request.raw_input_contents[:]
    if field is not None:
        getattr(request.inputs[0].contents, field).extend(values)


@pytest.mark.parametrize(("case", "spoil", "message"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_every_strict_validation_case_is_invalid_argument_and_the_server_keeps_serving(
    mnist: Served, case: str, spoil: Callable[[pb.ModelInferRequest], None], message: str
) -> None:
    request = _request(np.zeros((1, 1, 28, 28), np.float32))
    spoil(request)
    with pytest.raises(grpc.RpcError) as err:
        mnist.infer(request)
    assert err.value.code() == Code.INVALID_ARGUMENT, (case, err.value.details())
    assert message in err.value.details(), (case, err.value.details())
    assert _outputs(mnist.infer(_request(np.zeros((1, 1, 28, 28), np.float32))))["label"].shape == (1,)


def test_unknown_models_limits_and_sizes_have_their_codes(mnist: Served) -> None:
    x = np.zeros((1, 1, 28, 28), np.float32)
    cases = [
        (_request(x, model="cifar"), Code.NOT_FOUND, "available: mnist"),
        (pb.ModelInferRequest(model_name="mnist", model_version="7"), Code.NOT_FOUND, "has version '1'"),
        (_request(np.zeros((257, 1, 28, 28), np.float32)), Code.RESOURCE_EXHAUSTED, "at most 256"),
        (_request(np.zeros((1400, 1, 28, 28), np.float32)), Code.RESOURCE_EXHAUSTED, "larger than max"),  # > 4 MiB
    ]
    for request, code, message in cases:
        with pytest.raises(grpc.RpcError) as err:
            mnist.infer(request)
        assert err.value.code() == code and message in err.value.details(), err.value.details()
    tensor = triton.InferInput("x", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as triton_err:
        mnist.client.infer("cifar", [tensor])
    assert triton_err.value.status() == "StatusCode.NOT_FOUND"


def test_the_model_repository_calls(mnist: Served) -> None:
    c = mnist.client
    assert [(m.name, m.state) for m in c.get_model_repository_index().models] == [("mnist", "READY")]
    c.unload_model("mnist")
    try:
        assert not c.is_server_ready()
        assert [(m.name, m.state) for m in c.get_model_repository_index().models] == [("mnist", "UNAVAILABLE")]
        assert c.get_model_repository_index(as_json=True).get("models") is not None
        with pytest.raises(InferenceServerException) as err:
            c.get_model_metadata("mnist")
        assert err.value.status() == "StatusCode.NOT_FOUND"
        for name, code in (("nope", "NOT_FOUND"), ("../mnist", "INVALID_ARGUMENT")):
            with pytest.raises(InferenceServerException) as err:
                c.load_model(name)
            assert err.value.status() == f"StatusCode.{code}", err.value.message()
    finally:
        c.load_model("mnist")
    assert c.is_model_ready("mnist") and c.is_server_ready()


# -- auth, cancellation and deadlines --------------------------------------------------------


def test_a_token_server_refuses_calls_without_it(never: Served) -> None:
    plain = pb_grpc.GRPCInferenceServiceStub(never.channel)
    assert plain.ServerLive(pb.ServerLiveRequest()).live  # health stays open, as over HTTP
    assert plain.ServerReady(pb.ServerReadyRequest()).ready
    request = _request(np.ones((1, 1, 2, 2), np.float32), model="never", tol=1e-3)
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
        for call, message in (
            (plain.ModelInfer, request),
            (plain.ModelMetadata, pb.ModelMetadataRequest(name="never")),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call(message, metadata=metadata, timeout=10)
            assert err.value.code() == Code.UNAUTHENTICATED and "Bearer" in err.value.details()
    assert never.client.get_model_metadata("never", headers={"authorization": f"Bearer {TOKEN}"}).name == "never"
    assert _outputs(never.infer(request))["label"].shape == (1,)


def _active(served: Served) -> float:
    return _metric(served.http.get("/metrics").text, "fpn_active_batch", model="never")


def test_a_cancelled_call_leaves_the_shared_batch_within_an_iteration(never: Served) -> None:
    request = _request(np.ones((2, 1, 2, 2), np.float32), model="never", tol=1e-9, max_iter=ENDLESS)
    before = _metric(never.http.get("/metrics").text, "fpn_abandoned_total", model="never", reason="client_gone")
    call = never.stub.ModelInfer.future(request, metadata=never.metadata, timeout=60)
    assert _until(lambda: _active(never) == 2, 10) is not None  # both rows iterate
    assert call.cancel()
    took = _until(lambda: _active(never) == 0, 5)
    print(f"the rows left {took} s after the cancel")
    assert took is not None and took < 0.25
    gone = _metric(never.http.get("/metrics").text, "fpn_abandoned_total", model="never", reason="client_gone")
    assert gone == before + 1


def test_a_call_past_its_deadline_leaves_the_shared_batch(never: Served) -> None:
    request = _request(np.ones((2, 1, 2, 2), np.float32), model="never", tol=1e-9, max_iter=ENDLESS)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        never.infer(request, timeout=0.5)
    assert err.value.code() == Code.DEADLINE_EXCEEDED and time.monotonic() - started < 2
    took = _until(lambda: _active(never) == 0, 5)
    assert took is not None and took < 0.25
    # deadline_ms bounds the solve itself: an answer, not converged, well before the call's deadline
    out = _outputs(
        never.infer(
            _request(np.ones((1, 1, 2, 2), np.float32), model="never", tol=1e-9, max_iter=ENDLESS, deadline_ms=50.0)
        )
    )
    assert not out["converged"].any() and out["iterations"][0] > 1


# -- the command -----------------------------------------------------------------------------


def test_a_taken_grpc_port_stops_the_server_with_one_clear_line(shipped_model: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "fpn_serve.cli",
                str(shipped_model),
                "--port",
                str(_free_port()),
                "--grpc-port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 1 and f"cannot listen for gRPC on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
    help_text = subprocess.run([sys.executable, "-m", "fpn_serve.cli", "--help"], capture_output=True, text=True).stdout
    assert "--grpc-port" in help_text and "0: no gRPC" in help_text
