"""The fixed-point residual, defined once for training and serving.

For a batch of iterates the residual of sample i at step k is

    r_i = ||u_i^{k+1} - u_i^k||_2 / (||u_i^{k+1}||_2 + RESIDUAL_EPS)

over all latent axes of that sample alone; a sample has converged when r_i <= tol. No batch-wide
maximum, so a sample's answer never depends on the other samples in its batch.
"""

from __future__ import annotations

import numpy as np

RESIDUAL_EPS = 1e-6
RESIDUAL = "per-sample ||u_next - u||_2 / (||u_next||_2 + 1e-06); converged when <= tol"


def residual(u_next: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per-sample relative residual of two float32 iterates [batch, *latent] -> [batch]."""
    b = u_next.shape[0]
    diff = np.linalg.norm((u_next - u).reshape(b, -1), axis=1)
    out: np.ndarray = diff / (np.linalg.norm(u_next.reshape(b, -1), axis=1) + RESIDUAL_EPS)
    return out
