"""Backpropagation modes: how a training forward turns a fixed point into a differentiable output.

Each mode takes ``(model, x, tol, max_iter, solver)`` and returns ``(logits, info)`` whose
logits carry the gradient that mode defines.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .fpn import FPN
from .solvers import SolverInfo


def jfb(
    model: FPN, x: torch.Tensor, tol: float, max_iter: int, solver: str = "fixed_point"
) -> tuple[torch.Tensor, SolverInfo]:
    """Jacobian-free backprop: solve without a graph, then differentiate one application of T.

    Q is evaluated once, so the fixed point belongs to the very features (dropout included) that
    receive the gradient. The gradient is that of S(T(u*.detach(), Q(d))).
    """
    z = model.Q(x)
    u_star, info = model.solve(z.detach(), tol, max_iter, solver)
    u = model.T(u_star, z)
    return model.S(u), info


BACKPROP: dict[str, Callable[..., tuple[torch.Tensor, SolverInfo]]] = {"jfb": jfb}


def get_backprop(name: str) -> Callable[..., tuple[torch.Tensor, SolverInfo]]:
    try:
        return BACKPROP[name]
    except KeyError:
        raise ValueError(f"unknown backprop mode {name!r}; available: {', '.join(sorted(BACKPROP))}") from None
