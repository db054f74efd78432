"""The Fixed Point Network module: M(d) = S(u*) with u* = T(u*, Q(d)), solved from u = 0."""

from __future__ import annotations

import torch
from torch import nn

from .architectures import build_parts
from .config import ModelConfig
from .solvers import SolverInfo, get_solver


class FPN(nn.Module):
    """Composes Q (data -> injection z), T (contractive latent update) and S (latent -> logits).

    The solver loop lives in ``training.solvers``, the gradient in ``training.backprop``; this
    module only wires them together.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        parts = build_parts(cfg)
        self.Q = parts.Q
        self.T = parts.T
        self.S = parts.S

    @torch.no_grad()
    def solve(
        self, z: torch.Tensor, tol: float, max_iter: int, solver: str = "fixed_point"
    ) -> tuple[torch.Tensor, SolverInfo]:
        """Find u* = T(u*, z) from u = 0 without building a graph."""
        weights = self.T.weights()
        u0 = torch.zeros(z.shape[0], self.config.latent_dim, device=z.device, dtype=z.dtype)
        return get_solver(solver)(lambda u: self.T.apply_with(weights, u, z), u0, tol, max_iter)

    def forward(
        self, x: torch.Tensor, tol: float = 1e-4, max_iter: int = 100, solver: str = "fixed_point"
    ) -> tuple[torch.Tensor, SolverInfo]:
        """Inference: logits S(u*) [batch, classes] and per-sample solver info."""
        u, info = self.solve(self.Q(x), tol, max_iter, solver)
        return self.S(u), info

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
