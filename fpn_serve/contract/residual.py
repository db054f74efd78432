"""The fixed-point residual, defined once for training, export and serving.

For a batch of iterates the residual of sample i at step k is

    r_i = ||u_i^{k} - u_i^{k-1}||_2 / (||u_i^{k}||_2 + RESIDUAL_EPS)

over all latent axes of that sample alone; a sample has converged when r_i <= tol. There is no
batch-wide maximum, so a sample's answer never depends on the other samples in its batch. The
torch solvers (training/), the fused step graph and the ONNX loops (the exporter) and the numpy
solvers (runtime/) all import ``RESIDUAL_EPS`` from here, and the manifest records ``RESIDUAL``.
"""

from __future__ import annotations

RESIDUAL_EPS = 1e-6
RESIDUAL = f"per-sample ||u_next - u||_2 / (||u_next||_2 + {RESIDUAL_EPS:g}); converged when <= tol"
