"""Forward solvers for u = f(u) in torch, behind one contract.

Every solver takes ``(f, u0, tol, max_iter)`` and returns ``(u, SolverInfo)``. Per-sample stopping
is one ``ActiveSet`` that every loop steps (unrolled backprop too): a converged sample stops being
updated, so each sample's result is exactly what it would be alone in the batch. The residual is
the one ``fpn_serve`` uses when serving (see ``fpn_serve.contract.RESIDUAL``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fpn_serve.contract import RESIDUAL_EPS

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
    out: torch.Tensor = diff / (u_next.flatten(1).norm(dim=1) + RESIDUAL_EPS)
    return out


class ActiveSet:
    """Per-sample stopping for one solve, shared by every torch loop (the solvers, unrolled backprop).

    Each sample counts its applications of the map and stops, on its own residual, once that is
    <= tol; a stopped sample is carried unchanged, so its result does not depend on the batch.
    """

    def __init__(self, batch: int, tol: float, device: torch.device) -> None:
        self.tol = tol
        self.iterations = torch.zeros(batch, dtype=torch.int64, device=device)
        self.residual = torch.full((batch,), float("inf"), device=device)
        self.active = torch.ones(batch, dtype=torch.bool, device=device)

    def advance(self, new: torch.Tensor, previous: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """One step: the active samples take ``new`` (the map applied to ``previous``) and its residual
        and count one iteration; those with residual <= tol stop. Returns ``kept`` updated. Where
        ``new`` carries a graph the result does too; the residual never does."""
        with torch.no_grad():
            r = residual(new, previous)
        mask = self.active.view(-1, *([1] * (new.dim() - 1)))
        kept = torch.where(mask, new, kept)
        self.residual = torch.where(self.active, r, self.residual)
        self.iterations += self.active.long()
        self.active = self.active & (r > self.tol)
        return kept

    @property
    def done(self) -> bool:
        return not bool(self.active.any())

    def info(self) -> SolverInfo:
        return SolverInfo(self.iterations, self.residual, self.residual <= self.tol)


@torch.no_grad()
def fixed_point(f: Map, u0: torch.Tensor, tol: float, max_iter: int) -> tuple[torch.Tensor, SolverInfo]:
    """Plain fixed-point iteration u <- f(u) with per-sample stopping."""
    u = u0
    stop = ActiveSet(u0.shape[0], tol, u0.device)
    for _ in range(max_iter):
        u = stop.advance(f(u), u, u)
        if stop.done:
            break
    return u, stop.info()


@torch.no_grad()
def anderson(
    f: Map, u0: torch.Tensor, tol: float, max_iter: int, memory: int = 5, lam: float = 1e-4
) -> tuple[torch.Tensor, SolverInfo]:
    """Anderson acceleration with per-sample stopping (the algorithm of ``fpn_serve``'s numpy Anderson solver).

    Each iteration applies f once and moves every active sample to the mix of its last ``memory``
    outputs f(u_i) whose residuals f(u_i) - u_i combine to the smallest norm (weights summing to 1,
    Tikhonov term ``lam`` relative to the mean squared residual). A sample stops when the residual
    of its latest f(u) is <= tol and keeps that f(u), so the answer and the error bound
    gamma / (1 - gamma) * step mean what they mean for plain iteration.
    """
    batch = u0.shape[0]
    dev = u0.device
    n = u0[0].numel()
    u = u0
    out = u0.clone()
    stop = ActiveSet(batch, tol, dev)
    gs = torch.zeros(batch, memory, n, device=dev, dtype=u0.dtype)  # past residuals f(u_i) - u_i
    fs = torch.zeros(batch, memory, n, device=dev, dtype=u0.dtype)  # past outputs f(u_i)
    eye = torch.eye(memory, device=dev, dtype=u0.dtype)
    for k in range(1, max_iter + 1):
        fu = f(u)
        out = stop.advance(fu, u, out)
        if stop.done:
            break
        slot = (k - 1) % memory
        gs[:, slot] = (fu - u).flatten(1)
        fs[:, slot] = fu.flatten(1)
        m = min(k, memory)
        gram = gs[:, :m] @ gs[:, :m].transpose(1, 2)
        # Tikhonov term relative to the residuals' size, so it neither vanishes nor dominates near the end
        scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)
        gram = gram + lam * scale[:, None, None] * eye[:m, :m]
        sol = torch.linalg.solve(gram, torch.ones(batch, m, 1, device=dev, dtype=u0.dtype))[..., 0]
        alpha = sol / sol.sum(dim=1, keepdim=True)
        u = (alpha[:, None, :] @ fs[:, :m])[:, 0].view_as(u)
    return out, stop.info()


SOLVERS: dict[str, Callable[..., tuple[torch.Tensor, SolverInfo]]] = {
    "fixed_point": fixed_point,
    "anderson": anderson,
}


def measured_contraction(f: Map, points: torch.Tensor, iters: int = 30, seed: int = 0) -> float:
    """Largest ||df/du|| over the samples of ``points``, by power iteration on J^T J per sample.

    f must act on each sample alone (as every T does). J^T w is a vector-Jacobian product and J v
    the gradient of <J^T w, v> in w, so this needs no Jacobian matrix: about ``3 * iters`` products.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(points.shape, generator=gen).to(points)
    sigma = torch.zeros(points.shape[0], device=points.device)
    with torch.enable_grad():
        u = points.detach().requires_grad_()
        out = f(u)
        w = torch.zeros_like(out, requires_grad=True)
        (jtw,) = torch.autograd.grad(out, u, w, create_graph=True)
        for _ in range(iters):
            v = v / (v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1))) + 1e-30)
            (jv,) = torch.autograd.grad(jtw, w, v, retain_graph=True)
            (v,) = torch.autograd.grad(out, u, jv, retain_graph=True)
            sigma = jv.flatten(1).norm(dim=1)
    return float(sigma.max())


def get_solver(name: str) -> Callable[..., tuple[torch.Tensor, SolverInfo]]:
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; available: {', '.join(sorted(SOLVERS))}") from None
