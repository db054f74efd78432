"""FPN architectures: a registry of (Q, T, S) triples whose T is a contraction in u by construction.

Every T is a ``Latent``: its maps on the u-path have spectral norm <= 1 (exact spectral
normalisation at every forward), its activations are 1-Lipschitz, and one factor gamma < 1 scales
the u-path, so ``lipschitz_bound()`` is a certificate, not an estimate. Each architecture also has
an explicit twin (``--backprop explicit``): the same Q and S with one latent layer,
``Latent.explicit``.

Register a new family with ``@register("name", latent_dim=...)`` on a function ``ModelConfig -> Parts``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig

Weights = tuple[torch.Tensor, ...]


class SpectrallyBoundedLinear(nn.Module):
    """A linear map whose weight has spectral norm <= 1 at every forward.

    The stored parameter V is rescaled to ``W = V / max(1, ||V||_2)``, with the exact largest
    singular value (the matrices are small), so the bound holds after any optimiser step.
    """

    def __init__(self, out_features: int, in_features: int | None = None, gain: float = 0.5) -> None:
        super().__init__()
        self.raw = nn.Parameter(torch.empty(out_features, in_features or out_features))
        nn.init.orthogonal_(self.raw, gain=gain)

    def weight(self) -> torch.Tensor:
        sigma = torch.linalg.matrix_norm(self.raw, ord=2)
        return self.raw / torch.clamp(sigma, min=1.0)


def _spectral(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w.detach(), ord=2))


class Latent(nn.Module):
    """T(u, z), a contraction in u. Subclasses give ``weights``, ``apply_with`` and ``lipschitz_bound``.

    ``weights()`` returns the normalised tensors T uses (one SVD each), so a solver loop computes
    them once per solve and calls ``apply_with`` at every iteration; the export freezes them.
    """

    def __init__(self, features: int, gamma: float) -> None:
        super().__init__()
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"gamma must lie in (0, 1), got {gamma}")
        self.features = features
        self.gamma = gamma

    def weights(self) -> Weights:
        raise NotImplementedError

    def apply_with(self, weights: Weights, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.apply_with(self.weights(), u, z)

    def apply_for_export(self, weights: Weights, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """T as written to T.onnx: the function of ``apply_with``, arranged where it helps so that the
        terms in z alone are nodes of their own, which FPN.onnx and FPN1.onnx compute once before
        their loop instead of at every iteration."""
        return self.apply_with(weights, u, z)

    def explicit(self, z: torch.Tensor) -> torch.Tensor:
        """The explicit twin's single latent layer: T applied once from u = 0."""
        u: torch.Tensor = self(torch.zeros_like(z), z)
        return u

    def lipschitz_bound(self) -> float:
        """Certified bound on the contraction factor of T in u (from the spectral norms)."""
        raise NotImplementedError


class _OneMatrixLatent(Latent):
    """A latent whose u-path has one spectrally bounded matrix W: Lipschitz in u with factor gamma ||W||."""

    def __init__(self, features: int, gamma: float) -> None:
        super().__init__(features, gamma)
        self.linear = SpectrallyBoundedLinear(features)

    def weights(self) -> Weights:
        return (self.linear.weight(),)

    def lipschitz_bound(self) -> float:
        with torch.no_grad():
            return self.gamma * _spectral(self.linear.weight())


class ContractiveReLULatent(_OneMatrixLatent):
    """T(u, z) = ReLU(W (gamma * u + z)) with ||W||_2 <= 1: Lipschitz in u with factor gamma."""

    def apply_with(self, weights: Weights, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.relu((self.gamma * u + z) @ weights[0].T)

    def apply_for_export(self, weights: Weights, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        w = weights[0]
        return torch.relu(u @ (self.gamma * w).T + z @ w.T)


class LinearOfReLULatent(_OneMatrixLatent):
    """T(u, z) = W (gamma * ReLU(u) + z) with ||W||_2 <= 1 (the paper's CIFAR-10 latent)."""

    def apply_with(self, weights: Weights, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (self.gamma * torch.relu(u) + z) @ weights[0].T

    def apply_for_export(self, weights: Weights, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        w = weights[0]
        return torch.relu(u) @ (self.gamma * w).T + z @ w.T


class ResidualLeakyLatent(Latent):
    """T(u, z) = gamma * W2 LeakyReLU(W1 LeakyReLU(u) + b1) + z with ||W1||, ||W2|| <= 1 (SVHN).

    Its explicit twin applies the block once to the injection itself, u = T(z, z): from u = 0 the
    block would only add a constant to z.
    """

    def __init__(self, features: int, gamma: float, slope: float = 0.1) -> None:
        super().__init__(features, gamma)
        self.slope = slope
        self.linear1 = SpectrallyBoundedLinear(features)
        self.bias1 = nn.Parameter(torch.zeros(features))
        self.linear2 = SpectrallyBoundedLinear(features)

    def weights(self) -> Weights:
        return (self.linear1.weight(), self.bias1, self.linear2.weight())

    def apply_with(self, weights: Weights, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        w1, b1, w2 = weights
        act = nn.functional.leaky_relu
        hidden = act(act(u, self.slope) @ w1.T + b1, self.slope)
        return self.gamma * hidden @ w2.T + z

    def explicit(self, z: torch.Tensor) -> torch.Tensor:
        u: torch.Tensor = self(z, z)
        return u

    def lipschitz_bound(self) -> float:
        with torch.no_grad():
            return self.gamma * _spectral(self.linear1.weight()) * _spectral(self.linear2.weight())


@dataclass
class Parts:
    Q: nn.Module
    T: Latent
    S: nn.Module


@dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable[[ModelConfig], Parts]
    latent_dim: int  # the default latent size (the paper's)
    input_shape: tuple[int, int, int]  # (C, H, W) it is built for
    summary: str


_REGISTRY: dict[str, Architecture] = {}


def register(
    name: str, *, latent_dim: int, input_shape: tuple[int, int, int], summary: str
) -> Callable[[Callable[[ModelConfig], Parts]], Callable[[ModelConfig], Parts]]:
    def deco(fn: Callable[[ModelConfig], Parts]) -> Callable[[ModelConfig], Parts]:
        _REGISTRY[name] = Architecture(name, fn, latent_dim, input_shape, summary)
        return fn

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> Architecture:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; available: {', '.join(available())}") from None


def build_parts(cfg: ModelConfig) -> Parts:
    arch = get(cfg.arch)
    if cfg.in_channels != arch.input_shape[0]:
        raise ValueError(
            f"{cfg.arch} takes {arch.input_shape[0]}-channel images of {arch.input_shape[1]}x{arch.input_shape[2]}; "
            f"the data has {cfg.in_channels} channel(s)"
        )
    return arch.build(cfg)


@register("mnist_conv", latent_dim=46, input_shape=(1, 28, 28), summary="MNIST convolutional FPN, 84,182 parameters")
def mnist_conv(cfg: ModelConfig) -> Parts:
    """The paper's MNIST convolutional FPN: 84,182 parameters with the default latent of 46."""
    q = nn.Sequential(
        nn.Conv2d(cfg.in_channels, 96, kernel_size=3),
        nn.MaxPool2d(2),  # pooling first: max and ReLU commute, and ReLU then sees 4x fewer values
        nn.ReLU(),
        nn.Conv2d(96, 40, kernel_size=3),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(40 * 5 * 5, cfg.latent_dim),
        nn.ReLU(),
        nn.Dropout(cfg.dropout),
    )
    t = ContractiveReLULatent(cfg.latent_dim, cfg.gamma)
    s = nn.Linear(cfg.latent_dim, cfg.num_classes, bias=False)
    return Parts(q, t, s)


@register("mnist_fc", latent_dim=40, input_shape=(1, 28, 28), summary="MNIST fully connected FPN, 84,550 parameters")
def mnist_fc(cfg: ModelConfig) -> Parts:
    """A fully connected FPN of the paper's size: Q = 784 -> 100 -> latent, T on a 40-dim latent."""
    q = nn.Sequential(
        nn.Flatten(),
        nn.Linear(cfg.in_channels * 28 * 28, 100),
        nn.ReLU(),
        nn.Linear(100, cfg.latent_dim),
        nn.ReLU(),
        nn.Dropout(cfg.dropout),
    )
    t = ContractiveReLULatent(cfg.latent_dim, cfg.gamma)
    s = nn.Linear(cfg.latent_dim, cfg.num_classes)
    return Parts(q, t, s)


@register("svhn_conv", latent_dim=100, input_shape=(3, 32, 32), summary="SVHN convolutional FPN, 153,530 parameters")
def svhn_conv(cfg: ModelConfig) -> Parts:
    """The paper's SVHN FPN: two 5x5 convolutions and a linear map into a 100-dim latent."""
    act = nn.LeakyReLU(0.1)
    q = nn.Sequential(
        nn.Conv2d(cfg.in_channels, 30, kernel_size=5),
        nn.MaxPool2d(2),
        act,
        nn.Conv2d(30, 40, kernel_size=5),
        nn.MaxPool2d(2),
        act,
        nn.Flatten(),
        nn.Linear(40 * 5 * 5, cfg.latent_dim),
        act,
        nn.Dropout(cfg.dropout),
    )
    t = ResidualLeakyLatent(cfg.latent_dim, cfg.gamma)
    s = nn.Linear(cfg.latent_dim, cfg.num_classes)
    return Parts(q, t, s)


@register(
    "cifar10_conv", latent_dim=52, input_shape=(3, 32, 32), summary="CIFAR-10 convolutional FPN, 172,316 parameters"
)
def cifar10_conv(cfg: ModelConfig) -> Parts:
    """The paper's unaugmented CIFAR-10 FPN: three convolutions into a 52-dim latent."""
    q = nn.Sequential(
        nn.Conv2d(cfg.in_channels, 80, kernel_size=3),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Conv2d(80, 90, kernel_size=3),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Conv2d(90, 100, kernel_size=3),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(100 * 2 * 2, cfg.latent_dim),
        nn.Dropout(cfg.dropout),
    )
    t = LinearOfReLULatent(cfg.latent_dim, cfg.gamma)
    s = nn.Linear(cfg.latent_dim, cfg.num_classes)
    return Parts(q, t, s)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet_trunk(in_channels: int, blocks_per_stage: int = 9) -> nn.Sequential:
    """The CIFAR ResNet of depth 6n + 2 (n = 9: ResNet-56) up to its global average pool."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(blocks_per_stage):
            layers.append(_BasicBlock(cin, cout, stride if i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


@register(
    "cifar10_resnet",
    latent_dim=45,
    input_shape=(3, 32, 32),
    summary="CIFAR-10 FPN on a ResNet-56 trunk, 860,530 parameters (train with augmentation)",
)
def cifar10_resnet(cfg: ModelConfig) -> Parts:
    """The paper's augmented CIFAR-10 FPN: a ResNet-56 Q whose last layer maps to a 45-dim latent."""
    q = nn.Sequential(resnet_trunk(cfg.in_channels), nn.Linear(64, cfg.latent_dim), nn.Dropout(cfg.dropout))
    t = LinearOfReLULatent(cfg.latent_dim, cfg.gamma)
    s = nn.Linear(cfg.latent_dim, cfg.num_classes)
    return Parts(q, t, s)
