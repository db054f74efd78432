"""Backpropagation modes: how a training forward turns a fixed point into a differentiable output.

Each mode takes ``(model, x, tol, max_iter, solver)`` and returns ``(logits, info)`` whose
logits carry the gradient that mode defines.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .fpn import FPN
from .solvers import ActiveSet, SolverInfo


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


def unrolled(
    model: FPN, x: torch.Tensor, tol: float, max_iter: int, solver: str = "fixed_point"
) -> tuple[torch.Tensor, SolverInfo]:
    """Backpropagation through every iteration: exact for the iterate reached, memory grows with depth.

    Each sample stops on its own residual (a stopped sample is carried unchanged), by the solvers' ActiveSet.
    """
    z = model.Q(x)
    weights = model.T.weights()
    u = torch.zeros(z.shape[0], model.config.latent_dim, device=z.device, dtype=z.dtype)
    stop = ActiveSet(z.shape[0], tol, z.device)
    for _ in range(max_iter):
        u = stop.advance(model.T.apply_with(weights, u, z), u, u)
        if stop.done:
            break
    return model.S(u), stop.info()


def _adjoint_fixed_point(
    vjp: Callable[[torch.Tensor], torch.Tensor], g: torch.Tensor, tol: float, max_iter: int
) -> tuple[torch.Tensor, int]:
    """Solve y = J^T y + g by iterating (converges because ||J|| <= gamma < 1); returns (y, VJPs)."""
    y = g
    for k in range(1, max_iter + 1):
        y_next = vjp(y) + g
        if float((y_next - y).norm()) <= tol * (float(y_next.norm()) + 1e-12):
            return y_next, k
        y = y_next
    return y, max_iter


def _adjoint_cg(
    vjp: Callable[[torch.Tensor], torch.Tensor],
    jvp: Callable[[torch.Tensor], torch.Tensor],
    g: torch.Tensor,
    tol: float,
    max_iter: int,
) -> tuple[torch.Tensor, int]:
    """Solve (I - J^T) y = g by conjugate gradient on the normal equations A A^T w = g, y = A^T w
    with A = I - J^T (A^T v = v - J v); relative tolerance on the residual. Returns (y, products)."""

    def a(v: torch.Tensor) -> torch.Tensor:
        return v - vjp(v)

    def at(v: torch.Tensor) -> torch.Tensor:
        return v - jvp(v)

    w = torch.zeros_like(g)
    r = g.clone()
    p = r.clone()
    rr = float((r * r).sum())
    target = (tol * float(g.norm())) ** 2
    products = 0
    for _ in range(max_iter):
        if rr <= target:
            break
        ap = a(at(p))
        products += 2
        alpha = rr / float((p * ap).sum())
        w = w + alpha * p
        r = r - alpha * ap
        rr_new = float((r * r).sum())
        p = r + (rr_new / rr) * p
        rr = rr_new
    return at(w), products + 1


class AdjointCounter:
    """Counts Jacobian-vector products of the implicit backward pass (for metrics)."""

    products = 0


def ift(
    model: FPN,
    x: torch.Tensor,
    tol: float,
    max_iter: int,
    solver: str = "fixed_point",
    adjoint: str = "fixed_point",
    adjoint_tol: float = 1e-5,
    adjoint_max_iter: int = 500,
) -> tuple[torch.Tensor, SolverInfo]:
    """Jacobian-based implicit backprop: the exact gradient of S(u*) through u* = T(u*, Q(d)).

    The incoming gradient g of u is replaced by y solving (I - J^T) y = g, J = dT/du at u*, either
    by the fixed-point adjoint iteration (``adjoint="fixed_point"``, as DEQ) or by conjugate
    gradient on the normal equations (``adjoint="cg"``, as the paper), then flows into T's
    parameters and Q through one application of T.
    """
    z = model.Q(x)
    u_star, info = model.solve(z.detach(), tol, max_iter, solver)
    f = model.T(u_star, z)  # carries the gradient into T's parameters and Q
    if f.requires_grad:
        # a separate graph of T at u* for the Jacobian products, so the hook never calls itself
        u0 = u_star.clone().requires_grad_()
        f0 = model.T(u0, z.detach())

        def vjp(v: torch.Tensor) -> torch.Tensor:
            return torch.autograd.grad(f0, u0, v, retain_graph=True)[0]

        def jvp(v: torch.Tensor) -> torch.Tensor:  # J v as the gradient of <J^T w, v> in w
            w = torch.zeros_like(f0, requires_grad=True)
            jtw = torch.autograd.grad(f0, u0, w, retain_graph=True, create_graph=True)[0]
            return torch.autograd.grad(jtw, w, v, retain_graph=True)[0]

        def hook(g: torch.Tensor) -> torch.Tensor:
            if adjoint == "cg":
                y, n = _adjoint_cg(vjp, jvp, g, adjoint_tol, adjoint_max_iter)
            else:
                y, n = _adjoint_fixed_point(vjp, g, adjoint_tol, adjoint_max_iter)
            AdjointCounter.products += n
            return y

        f.register_hook(hook)
    return model.S(f), info


def explicit(
    model: FPN, x: torch.Tensor, tol: float, max_iter: int, solver: str = "fixed_point"
) -> tuple[torch.Tensor, SolverInfo]:
    """The explicit twin: the same Q and S with one latent layer (``Latent.explicit``, u = T(0, Q(d))
    for most architectures)."""
    z = model.Q(x)
    u = model.T.explicit(z)
    ones = torch.ones(z.shape[0], dtype=torch.int64, device=z.device)
    zero = torch.zeros(z.shape[0], device=z.device)
    return model.S(u), SolverInfo(ones, zero, zero <= tol)


BACKPROP: dict[str, Callable[..., tuple[torch.Tensor, SolverInfo]]] = {
    "jfb": jfb,
    "ift": ift,
    "unrolled": unrolled,
    "explicit": explicit,
}


def get_backprop(name: str) -> Callable[..., tuple[torch.Tensor, SolverInfo]]:
    try:
        return BACKPROP[name]
    except KeyError:
        raise ValueError(f"unknown backprop mode {name!r}; available: {', '.join(sorted(BACKPROP))}") from None
