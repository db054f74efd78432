"""Lower-precision variants of the exported graphs; inputs and outputs stay float32.

- ``fp16``: every graph in half precision (onnxconverter-common, keeping float32 I/O), so clients
  and the serving code need not change. Its residual cannot fall much below fp16's resolution
  (about 1e-3): tight tolerances run to max_iter, and the calibration table shows it.
- ``int8``: Q with dynamic int8 weights (ConvInteger). Kept for folders already exported this way;
  on CPUs it is slower than fp32 (it quantizes every activation at run time).
- ``int8-static``: Q quantized statically (``quantize_q_static``): activation ranges calibrated on
  training images, per-channel int8 weights, in ONNX Runtime's QOperator form (QLinearConv, QGemm),
  the form its CPU kernels run fastest. T and S stay float32 in every variant, so the contraction,
  the stopping rule and the label certificate are unchanged.

Two details decide whether a static Q is right, not only fast:

- ONNX Runtime's quantizer folds a Relu into the range of the tensor it reads. After a MaxPool that
  tensor is the pool's output, whose range is tied to the convolution before it, so the Relu
  vanishes without clipping anything: negative features pass through and z is wrong (relative
  error about 2). Relu and MaxPool commute exactly (max is monotone), so the Relu is moved before
  the pool first (``relu_before_pool``); it then fuses into the convolution's output range.
- Without VNNI (AVX2, AVX-512F) the u8 x s8 kernels add pairs of products in saturating int16;
  full-range weights overflow it (relative error 0.14 on MNIST's Q). Weights are therefore
  quantized to 7 bits (``reduce_range``), which cannot saturate, on every CPU.

The first convolution, when it reads few input channels (MNIST's: one channel, 3 x 3, so a
product of length 9), stays float32: an int8 product that short costs more in requantization than
it saves, and its float output is quantized once, after its pool.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx

PRECISIONS = ("fp32", "fp16", "int8", "int8-static")
STEM_MAX_DEPTH = 32  # a first convolution with in_channels * kh * kw up to this stays float32
CALIBRATION_BATCH = 128


def convert(folder: Path, precision: str, calibration: np.ndarray | None = None) -> list[str]:
    """Convert the graphs in ``folder`` in place; return the roles converted. ``int8-static``
    needs ``calibration``, normalised training inputs [n, *input_shape]."""
    if precision == "fp32":
        return []
    if precision == "fp16":
        from onnxconverter_common import float16

        for role in ("Q", "T", "S"):
            path = folder / f"{role}.onnx"
            with warnings.catch_warnings():  # it warns for every weight that fp16 rounds: expected here
                warnings.simplefilter("ignore", UserWarning)
                model = float16.convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
            onnx.save(model, str(path))
        return ["Q", "T", "S"]
    if precision == "int8":
        _quantize_dynamic(folder / "Q.onnx")
        return ["Q"]
    if precision == "int8-static":
        if calibration is None:
            raise ValueError("int8-static needs calibration inputs (normalised training images)")
        path = folder / "Q.onnx"
        onnx.save(quantize_q_static(onnx.load(str(path)), calibration), str(path))
        return ["Q"]
    raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def _quantize_dynamic(path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        plain = onnx.load(str(path))
        del plain.graph.value_info[:]  # let the quantizer infer shapes afresh
        src, out = Path(tmp) / "Q.onnx", Path(tmp) / "Q.int8.onnx"
        onnx.save(plain, str(src))
        with _quiet_quantizer():
            quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
        path.write_bytes(out.read_bytes())


class _quiet_quantizer:
    """The quantizer logs advice (pre-processing, static vs dynamic) on the root logger: silence it."""

    def __enter__(self) -> None:
        self._root = logging.getLogger()
        self._level = self._root.level
        self._root.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self._root.setLevel(self._level)


def float_stem(q: onnx.ModelProto) -> list[str]:
    """Names of the nodes kept in float32: the first Conv, when it reads the graph's input (through
    a crop at most) with a product of length <= STEM_MAX_DEPTH, and the pools and activations after
    it up to the next Conv or Gemm. Empty when Q does not start that way."""
    graph = q.graph
    inits = {i.name: i for i in graph.initializer}
    current = graph.input[0].name
    stem: list[str] = []
    for node in graph.node:
        if current not in node.input:
            continue
        if node.op_type == "Slice" and not stem:
            current = node.output[0]
            continue
        if node.op_type == "Conv" and not stem:
            weight = inits.get(node.input[1])
            if weight is None or int(np.prod(weight.dims[1:])) > STEM_MAX_DEPTH:
                return []
        elif not stem or node.op_type not in ("MaxPool", "Relu"):
            break
        stem.append(node.name)
        current = node.output[0]
    return stem


def relu_before_pool(q: onnx.ModelProto, keep: set[str]) -> onnx.ModelProto:
    """Q with every MaxPool -> Relu pair (outside ``keep``) rewritten as Relu -> MaxPool, which is
    the same function to the bit, so that the quantizer can fold each Relu into a convolution."""
    out = onnx.ModelProto()
    out.CopyFrom(q)
    nodes = list(out.graph.node)
    users: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    for i in range(len(nodes) - 1):
        pool, relu = nodes[i], nodes[i + 1]
        if pool.op_type != "MaxPool" or relu.op_type != "Relu" or {pool.name, relu.name} & keep:
            continue
        if len(pool.output) != 1 or relu.input[0] != pool.output[0] or users.get(pool.output[0]) != 1:
            continue
        source, between, result = pool.input[0], pool.output[0], relu.output[0]
        relu.input[0], relu.output[0] = source, between
        pool.input[0], pool.output[0] = between, result
        nodes[i], nodes[i + 1] = relu, pool
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def quantize_q_static(q: onnx.ModelProto, calibration: np.ndarray) -> onnx.ModelProto:
    """Q quantized statically (see the module doc): QOperator form, uint8 activations with MinMax
    ranges measured on ``calibration`` [n, *input_shape], per-channel 7-bit int8 weights."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Batches(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.start = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.start >= len(calibration):
                return None
            batch = np.ascontiguousarray(calibration[self.start : self.start + CALIBRATION_BATCH], np.float32)
            self.start += CALIBRATION_BATCH
            return {q.graph.input[0].name: batch}

    stem = float_stem(q)
    plain = relu_before_pool(q, set(stem))
    del plain.graph.value_info[:]  # let the quantizer infer shapes afresh
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "Q.onnx", Path(tmp) / "Q.int8.onnx"
        onnx.save(plain, str(src))
        with _quiet_quantizer():
            quantize_static(
                str(src),
                str(out),
                Batches(),
                quant_format=QuantFormat.QOperator,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=True,
                nodes_to_exclude=stem,
            )
        quantized = onnx.load(str(out))
    for node in quantized.graph.node:  # the quantizer stamps its own names on the nodes it adds
        node.doc_string = ""
    return quantized


def calibration_sample(images: np.ndarray, count: int = 1024, seed: int = 0) -> np.ndarray:
    """A fixed random sample of ``count`` normalised training inputs, the same on every run."""
    pick = np.random.default_rng(seed).choice(len(images), size=min(count, len(images)), replace=False)
    return np.ascontiguousarray(images[np.sort(pick)], np.float32)
