"""fpn-serve: serve Fixed Point Networks exported as Q/T/S ONNX graphs, with a per-request tolerance.

Public API::

    from fpn_serve import Engine
    engine = Engine.load("models/mnist")
    result = engine.classify(x, tol=1e-3)   # x: float32 [batch, *input_shape]

This package never imports torch.
"""

from .batching.scheduler import Scheduler
from .contract.manifest import Manifest, load_manifest
from .errors import FPNServeError, ImageError, InputError, ModelError, ModelNotFound, QueueFull
from .runtime.engine import ClassifyResult, Engine

__version__ = "0.1.0"

__all__ = [
    "ClassifyResult",
    "Engine",
    "FPNServeError",
    "ImageError",
    "InputError",
    "Manifest",
    "ModelError",
    "ModelNotFound",
    "QueueFull",
    "Scheduler",
    "__version__",
    "load_manifest",
]
