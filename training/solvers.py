"""Forward solvers for u = f(u) in torch, behind one contract.

Every solver takes ``(f, u0, tol, max_iter)`` and returns ``(u, SolverInfo)``; a converged sample
stops being updated, so each sample's result is exactly what it would be alone in the batch. The
residual is the one ``fpn_serve`` uses when serving (see ``fpn_serve.solvers.RESIDUAL``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fpn_serve.solvers import RESIDUAL_EPS

Map = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SolverInfo:
    """Per-sample outcome of a solve: each tensor has shape [batch]."""

    iterations: torch.Tensor  # int64, applications of f for this sample
    residual: torch.Tensor  # float32, relative step size at exit
    converged: torch.Tensor  # bool, residual <= tol


def residual(u_next: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-sample ||u_next - u|| / (||u_next|| + eps) over all non-batch axes."""
    diff = (u_next - u).flatten(1).norm(dim=1)
    return diff / (u_next.flatten(1).norm(dim=1) + RESIDUAL_EPS)


@torch.no_grad()
def fixed_point(f: Map, u0: torch.Tensor, tol: float, max_iter: int) -> tuple[torch.Tensor, SolverInfo]:
    """Plain fixed-point iteration u <- f(u) with per-sample stopping."""
    batch = u0.shape[0]
    u = u0
    iterations = torch.zeros(batch, dtype=torch.int64, device=u0.device)
    res = torch.full((batch,), float("inf"), device=u0.device)
    active = torch.ones(batch, dtype=torch.bool, device=u0.device)
    for _ in range(max_iter):
        u_next = f(u)
        r = residual(u_next, u)
        mask = active.view(-1, *([1] * (u.dim() - 1)))
        u = torch.where(mask, u_next, u)
        res = torch.where(active, r, res)
        iterations += active.long()
        active = active & (r > tol)
        if not bool(active.any()):
            break
    return u, SolverInfo(iterations, res, res <= tol)


SOLVERS: dict[str, Callable[..., tuple[torch.Tensor, SolverInfo]]] = {
    "fixed_point": fixed_point,
}


def get_solver(name: str) -> Callable[..., tuple[torch.Tensor, SolverInfo]]:
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; available: {', '.join(sorted(SOLVERS))}") from None
