"""The runtime: numpy and ONNX Runtime only, no threads and no asyncio.

Execution providers and session options (``providers``), a request validated once (``request``),
the active set that owns per-sample stopping (``active``), the step runner that applies T on
bound buffers (``runner``), the numpy solvers (``solvers``) and the engine that ties them to a
model folder (``engine``).
"""

from .active import ActiveSet, SolveOutput, Work
from .engine import Engine
from .request import DEFAULT_MAX_ITER_CAP, SOLVERS, Prepared, RequestRules
from .result import ClassifyResult, softmax

__all__ = [
    "DEFAULT_MAX_ITER_CAP",
    "SOLVERS",
    "ActiveSet",
    "ClassifyResult",
    "Engine",
    "Prepared",
    "RequestRules",
    "SolveOutput",
    "Work",
    "softmax",
]
