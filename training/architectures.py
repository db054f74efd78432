"""FPN architectures: a registry of (Q, T, S) triples whose T is a contraction in u by construction.

Register a new family with ``@register("name")`` on a function ``ModelConfig -> Parts``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig


class SpectrallyBoundedLinear(nn.Module):
    """A bias-free linear map whose weight has spectral norm <= 1 at every forward.

    The stored parameter V is rescaled to ``W = V / max(1, ||V||_2)``, with the exact largest
    singular value (the matrix is small), so the bound holds after any optimiser step.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.raw = nn.Parameter(torch.empty(features, features))
        nn.init.orthogonal_(self.raw, gain=0.5)

    def weight(self) -> torch.Tensor:
        sigma = torch.linalg.matrix_norm(self.raw, ord=2)
        return self.raw / torch.clamp(sigma, min=1.0)


class ContractiveReLULatent(nn.Module):
    """T(u, z) = ReLU(W (gamma * u + z)) with ||W||_2 <= 1: Lipschitz in u with factor gamma."""

    def __init__(self, features: int, gamma: float) -> None:
        super().__init__()
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"gamma must lie in (0, 1), got {gamma}")
        self.gamma = gamma
        self.linear = SpectrallyBoundedLinear(features)

    def apply_with(self, weight: torch.Tensor, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """T with a precomputed weight, for solver loops that must not redo the SVD."""
        return torch.relu((self.gamma * u + z) @ weight.T)

    def forward(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.apply_with(self.linear.weight(), u, z)

    def lipschitz_bound(self) -> float:
        """Certified bound on the contraction factor of T in u."""
        with torch.no_grad():
            return self.gamma * float(torch.linalg.matrix_norm(self.linear.weight(), ord=2))


@dataclass
class Parts:
    Q: nn.Module
    T: ContractiveReLULatent
    S: nn.Module


_REGISTRY: dict[str, Callable[[ModelConfig], Parts]] = {}


def register(name: str) -> Callable[[Callable[[ModelConfig], Parts]], Callable[[ModelConfig], Parts]]:
    def deco(fn: Callable[[ModelConfig], Parts]) -> Callable[[ModelConfig], Parts]:
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


def build_parts(cfg: ModelConfig) -> Parts:
    try:
        factory = _REGISTRY[cfg.arch]
    except KeyError:
        raise ValueError(f"unknown architecture {cfg.arch!r}; available: {', '.join(available())}") from None
    return factory(cfg)


@register("mnist_conv")
def mnist_conv(cfg: ModelConfig) -> Parts:
    """The paper's MNIST convolutional FPN: 84,182 parameters with the default latent of 46."""
    q = nn.Sequential(
        nn.Conv2d(cfg.in_channels, 96, kernel_size=3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(96, 40, kernel_size=3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(40 * 5 * 5, cfg.latent_dim),
        nn.ReLU(),
        nn.Dropout(cfg.dropout),
    )
    t = ContractiveReLULatent(cfg.latent_dim, cfg.gamma)
    s = nn.Linear(cfg.latent_dim, cfg.num_classes, bias=False)
    return Parts(q, t, s)
