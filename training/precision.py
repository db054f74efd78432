"""Lower-precision variants of the exported graphs; inputs and outputs stay float32.

- ``fp16``: every graph in half precision (onnxconverter-common, keeping float32 I/O), so clients
  and the serving code need not change. Its residual cannot fall much below fp16's resolution
  (about 1e-3): tight tolerances run to max_iter, and the calibration table shows it.
- ``int8``: Q, which holds nearly all parameters and compute, quantized by ONNX Runtime (dynamic
  int8 weights); T and S stay float32, so the contraction and the stopping rule are unchanged.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import onnx

PRECISIONS = ("fp32", "fp16", "int8")


def convert(folder: Path, precision: str) -> list[str]:
    """Convert Q.onnx, T.onnx and S.onnx in ``folder`` in place; return the roles converted."""
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
        from onnxruntime.quantization import QuantType, quantize_dynamic

        path = folder / "Q.onnx"
        with tempfile.TemporaryDirectory() as tmp:
            plain = onnx.load(str(path))
            del plain.graph.value_info[:]  # let the quantizer infer shapes afresh
            src, out = Path(tmp) / "Q.onnx", Path(tmp) / "Q.int8.onnx"
            onnx.save(plain, str(src))
            quiet = logging.getLogger()
            level = quiet.level
            quiet.setLevel(logging.ERROR)  # the quantizer logs advice meant for static quantization
            try:
                quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
            finally:
                quiet.setLevel(level)
            path.write_bytes(out.read_bytes())
        return ["Q"]
    raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
