"""An empirical check of the exported T: is it really a contraction in u at the data?

Two estimates, both on the exported graph through ONNX Runtime (not torch):

- power iteration on finite-difference Jacobian-vector products at each sample's fixed point,
  ``J v ~ (T(u* + h v, z) - T(u*, z)) / h``, which estimates the spectral radius of dT/du;
- the largest ratio ``||T(u1, z) - T(u2, z)|| / ||u1 - u2||`` over random pairs near u*, a direct
  lower bound on the Lipschitz constant.

The measured factor is the larger of the two. It complements the architectural bound (which
holds everywhere by construction) and catches an export that broke it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fpn_serve import Engine


def measure_contraction(
    engine: Engine, x: np.ndarray, *, power_steps: int = 30, pairs: int = 8, seed: int = 0
) -> dict[str, Any]:
    with np.errstate(over="ignore", invalid="ignore"):  # an expanding T may overflow: that is the finding
        found = _measure(engine, x, power_steps, pairs, seed)
    if not np.isfinite(found["measured_factor"]):
        found["measured_factor"] = float("inf")
    return found


def _measure(engine: Engine, x: np.ndarray, power_steps: int, pairs: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    z = engine.encode(x)
    u_star = engine.solve(z, 1e-6, 200).u
    if not np.isfinite(u_star).all():  # the iteration blew up: certainly no contraction
        return {"measured_factor": float("inf"), "samples": len(z), "method": "the fixed-point iteration diverged"}

    def t(u: np.ndarray) -> np.ndarray:
        return engine.apply_t(u.astype(np.float32), z)

    flat = u_star.reshape(len(z), -1)
    scale = np.linalg.norm(flat, axis=1, keepdims=True) + 1e-3
    h = 1e-3 * scale
    base = t(u_star).reshape(len(z), -1)
    v = rng.standard_normal(flat.shape).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    radius = np.zeros(len(z))
    for _ in range(power_steps):
        jv = (t((flat + h * v).reshape(u_star.shape)).reshape(len(z), -1) - base) / h
        radius = np.linalg.norm(jv, axis=1)
        v = (jv / np.maximum(radius[:, None], 1e-12)).astype(np.float32)
    ratios = []
    for _ in range(pairs):
        d1 = rng.standard_normal(flat.shape).astype(np.float32) * 0.1 * scale
        d2 = rng.standard_normal(flat.shape).astype(np.float32) * 0.1 * scale
        u1, u2 = (flat + d1).reshape(u_star.shape), (flat + d2).reshape(u_star.shape)
        num = np.linalg.norm((t(u1) - t(u2)).reshape(len(z), -1), axis=1)
        ratios.append(num / np.linalg.norm(d1 - d2, axis=1))
    pair_max = float(np.max(ratios))
    return {
        "measured_factor": max(float(radius.max()), pair_max),
        "power_iteration_max": float(radius.max()),
        "power_iteration_mean": float(radius.mean()),
        "random_pairs_max": pair_max,
        "samples": len(z),
        "method": f"ONNX Runtime on the exported T at each sample's fixed point: {power_steps} steps of power "
        f"iteration on finite-difference Jacobian-vector products, and {pairs} random pairs per sample",
    }
