"""The numpy-side forward solvers and the outcome every solver reports (``SolveOutput``).

The residual they stop on is the contract's (``fpn_serve.contract.residual``)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np

from ..contract.residual import RESIDUAL_EPS
from .active import ActiveSet, SolveOutput

__all__ = ["SolveOutput", "anderson"]


def anderson(
    f: Callable[[np.ndarray, np.ndarray], np.ndarray],
    z: np.ndarray,
    tol: float,
    max_iter: int,
    *,
    deadline: float | None = None,
    u0: np.ndarray | None = None,
    active: ActiveSet | None = None,
    inspect: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
    memory: int = 5,
    beta: float = 1.0,
    lam: float = 1e-4,
) -> SolveOutput:
    """Anderson acceleration of u <- f(u, z) from ``u0`` (default 0), per sample, with early exit.

    Stopping is the active set's: by default one of its own with ``tol``, ``max_iter`` and
    ``deadline`` (an absolute ``time.perf_counter()`` value); or ``active``, holding one work of
    ``len(z)`` rows admitted with its rules (then ``tol``, ``max_iter`` and ``deadline`` are
    its), with ``inspect(u, steps)`` for the labels and certificates that a certified stop or a
    trace needs. Each iteration applies f once to every active sample and mixes the last
    ``memory`` pairs (u_i, f(u_i)) by the weights that minimise the mixed residual (regularised by
    ``lam`` times the residuals' mean squared norm). A stopped sample answers f(u), whose
    distance to the fixed point is bounded by gamma / (1 - gamma) * ||f(u) - u|| like a plain step.
    """
    if active is None:
        active = ActiveSet(z.shape[0], tuple(z.shape[1:]))
        active.admit(z.shape[0], tol, max_iter, math.inf if deadline is None else deadline)
    (work,) = active.works
    batch = z.shape[0]
    max_iter = work.max_iter
    n_flat = int(np.prod(z.shape[1:]))
    za = z
    u = np.zeros_like(z) if u0 is None else u0.copy()
    xs = np.zeros((batch, memory, n_flat), np.float32)  # past inputs u_i
    gs = np.zeros((batch, memory, n_flat), np.float32)  # past residual vectors f(u_i) - u_i
    fs = np.zeros((batch, memory, n_flat), np.float32)  # past outputs f(u_i)
    for k in range(1, max_iter + 1):
        fu = f(u, za)
        flat_u, flat_f = u.reshape(len(u), -1), fu.reshape(len(u), -1)
        g = flat_f - flat_u
        step = np.sqrt(np.einsum("ij,ij->i", g, g)).astype(np.float32)
        r = (step / (np.sqrt(np.einsum("ij,ij->i", flat_f, flat_f)) + RESIDUAL_EPS)).astype(np.float32)
        keep, _ = active.advance(
            r, step, fu.__getitem__, None if inspect is None else functools.partial(_at, inspect, fu)
        )
        if not active.n:
            break
        if keep is not None:
            za, fu, u = za[keep], fu[keep], u[keep]
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
    return work.out


def _at(
    inspect: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    u: np.ndarray,
    mask: np.ndarray,
    steps: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """``inspect`` of the iterates ``u[mask]``."""
    return inspect(u[mask], steps)
