"""The numpy-side forward solvers and the outcome every solver reports (``SolveOutput``).

The residual they stop on is the contract's (``fpn_serve.contract.residual``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..contract.residual import RESIDUAL_EPS


SOLVERS = ("fixed_point", "anderson")


@dataclass
class SolveOutput:
    """The per-sample outcome of a solve, in input order."""

    u: np.ndarray  # float32 [B, *latent], the returned iterate
    iterations: np.ndarray  # int32 [B], applications of T
    residuals: np.ndarray  # float32 [B], relative step at exit
    steps: np.ndarray  # float32 [B], absolute step ||u_k - u_{k-1}|| at exit (for the error bound)


def anderson(
    f: Callable[[np.ndarray, np.ndarray], np.ndarray],
    z: np.ndarray,
    tol: float,
    max_iter: int,
    *,
    memory: int = 5,
    beta: float = 1.0,
    lam: float = 1e-4,
    deadline: float | None = None,
) -> SolveOutput:
    """Anderson acceleration of u <- f(u, z) from u = 0, per sample, with early exit.

    Each iteration applies f once to every active sample and mixes the last ``memory`` pairs
    (u_i, f(u_i)) by the weights that minimise the mixed residual (regularised by ``lam`` times
    the residuals' mean squared norm). A sample stops when ||f(u) - u|| / (||f(u)|| + eps) <= tol
    and answers f(u), whose distance to the fixed point is bounded by gamma / (1 - gamma) *
    ||f(u) - u|| like a plain step.
    """
    batch = z.shape[0]
    n_flat = int(np.prod(z.shape[1:]))
    out_u = np.zeros_like(z)
    iterations = np.zeros(batch, np.int32)
    residuals = np.full(batch, np.inf, np.float32)
    steps = np.full(batch, np.inf, np.float32)
    active = np.arange(batch)
    za = z
    u = np.zeros_like(z)
    xs = np.zeros((batch, memory, n_flat), np.float32)  # past inputs u_i
    gs = np.zeros((batch, memory, n_flat), np.float32)  # past residual vectors f(u_i) - u_i
    fs = np.zeros((batch, memory, n_flat), np.float32)  # past outputs f(u_i)
    for k in range(1, max_iter + 1):
        fu = f(u, za)
        flat_u, flat_f = u.reshape(len(u), -1), fu.reshape(len(u), -1)
        g = flat_f - flat_u
        step = np.sqrt(np.einsum("ij,ij->i", g, g)).astype(np.float32)
        r = step / (np.sqrt(np.einsum("ij,ij->i", flat_f, flat_f)) + RESIDUAL_EPS)
        done = r <= tol
        if k == max_iter or (deadline is not None and time.perf_counter() >= deadline):
            done[:] = True
        if done.any():
            leaving = active[done]
            out_u[leaving], residuals[leaving], steps[leaving], iterations[leaving] = fu[done], r[done], step[done], k
            keep = ~done
            if not keep.any():
                break
            active, za, fu, u = active[keep], za[keep], fu[keep], u[keep]
            xs, gs, fs, g = xs[keep], gs[keep], fs[keep], g[keep]
            flat_u, flat_f = u.reshape(len(u), -1), fu.reshape(len(u), -1)
        slot = (k - 1) % memory
        xs[:, slot], gs[:, slot], fs[:, slot] = flat_u, g, flat_f
        m = min(k, memory)
        # weights alpha minimising ||sum_i alpha_i g_i|| with sum alpha = 1, batched over samples
        gram = np.einsum("bin,bjn->bij", gs[:, :m], gs[:, :m])
        # Tikhonov term relative to the residuals' size, so it neither vanishes nor dominates near the end
        scale = np.maximum(np.einsum("bii->b", gram) / m, 1e-30).astype(np.float32)
        gram = gram + lam * scale[:, None, None] * np.eye(m, dtype=np.float32)
        rhs = np.ones((len(u), m, 1), np.float32)
        try:
            sol = np.linalg.solve(gram, rhs)[..., 0]
        except np.linalg.LinAlgError:
            sol = rhs[..., 0]
        alpha = sol / sol.sum(axis=1, keepdims=True)
        mixed = np.einsum("bi,bin->bn", alpha, beta * fs[:, :m] + (1 - beta) * xs[:, :m])
        u = mixed.reshape(u.shape).astype(np.float32)
    return SolveOutput(out_u, iterations, residuals, steps)
