"""Training side of fpn-serve: architectures, solvers, JFB training and ONNX export (needs torch)."""

__all__ = ["__version__"]

from fpn_serve import __version__
