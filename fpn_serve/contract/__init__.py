"""The model-folder contract, shared by training/ (which writes model folders) and the runtime
(which serves them): the manifest, the store of model folders, the residual's definition, and how
an image becomes a model input."""

from .manifest import FORMAT, InputSpec, Manifest, load_manifest, sha256_file
from .residual import RESIDUAL, RESIDUAL_EPS
from .store import default_store, discover

__all__ = [
    "FORMAT",
    "RESIDUAL",
    "RESIDUAL_EPS",
    "InputSpec",
    "Manifest",
    "default_store",
    "discover",
    "load_manifest",
    "sha256_file",
]
