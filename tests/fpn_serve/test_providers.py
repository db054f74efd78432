"""Execution providers by name with options, the fallback that says why, threads per role, Q in chunks."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from fpn_serve import ModelError
from fpn_serve.runtime.providers import (
    CPU,
    ChunkedSession,
    choose_providers,
    open_session,
    parse_device,
)

MODEL = Path(__file__).resolve().parents[2] / "models" / "mnist"


def test_a_device_names_a_provider_and_its_options() -> None:
    assert parse_device("cpu") == ("cpu", {})
    assert parse_device("XNNPACK:intra_op_num_threads=2") == ("XnnpackExecutionProvider", {"intra_op_num_threads": "2"})
    assert parse_device("OpenVINOExecutionProvider:device_type=CPU,num_of_threads=1") == (
        "OpenVINOExecutionProvider",
        {"device_type": "CPU", "num_of_threads": "1"},
    )


@pytest.mark.parametrize("device", ["tpu", "xnnpack:threads", "cpu:x=1"])
def test_a_bad_device_is_refused_with_the_valid_names(device: str) -> None:
    with pytest.raises(ModelError, match="xnnpack|key=value"):
        choose_providers(device, MODEL / "S.onnx")


@pytest.mark.parametrize("device", ["xnnpack", "coreml", "nnapi", "qnn", "openvino:device_type=CPU", "tensorrt"])
def test_a_provider_that_does_not_initialise_falls_back_to_the_cpu_saying_why(
    device: str, caplog: pytest.LogCaptureFixture
) -> None:
    name, _ = parse_device(device)
    with caplog.at_level(logging.WARNING, logger="fpn_serve"):
        providers, why = choose_providers(device, MODEL / "S.onnx")
    if name in ort.get_available_providers() and providers[0] != CPU:
        pytest.skip(f"{name} really initialises here")
    assert providers == [CPU]
    assert name in why
    (record,) = [r for r in caplog.records if "running on the CPU" in r.getMessage()]
    assert why in record.getMessage() and device in record.getMessage()


def test_the_engine_loads_on_the_cpu_when_a_provider_is_missing(caplog: pytest.LogCaptureFixture) -> None:
    from fpn_serve import Engine

    with caplog.at_level(logging.INFO, logger="fpn_serve"):
        engine = Engine.load(MODEL, device="xnnpack")
    assert engine.device == "cpu"
    assert any("XnnpackExecutionProvider" in r.getMessage() for r in caplog.records)


def test_threads_reach_the_sessions_that_do_a_batchs_work() -> None:
    threads = {
        role: open_session(MODEL / f, role, 2, [CPU], "fp32").get_session_options().intra_op_num_threads
        for role, f in {
            "Q": "Q.onnx",
            "fpn": "FPN.onnx",
            "fpn1": "FPN1.onnx",
            "T": "T.onnx",
            "step": "step.onnx",
            "steps": "steps.onnx",
        }.items()
    }
    assert threads == {"Q": 2, "fpn": 2, "fpn1": 1, "T": 1, "step": 1, "steps": 1}


def test_q_in_chunks_answers_as_q_in_one_call() -> None:
    q = open_session(MODEL / "Q.onnx", "Q", 1, [CPU], "fp32")
    assert isinstance(q, ChunkedSession)
    plain = ort.InferenceSession(str(MODEL / "Q.onnx"), providers=[CPU])
    x = np.random.default_rng(0).standard_normal((q.chunk * 2 + 5, 1, 28, 28)).astype(np.float32)
    (chunked,) = q.run(["z"], {"x": x})
    (whole,) = plain.run(["z"], {"x": x})
    assert chunked.shape == whole.shape
    np.testing.assert_array_equal(chunked, whole)
