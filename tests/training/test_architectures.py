from __future__ import annotations

import pytest
import torch

from training.architectures import available, build_parts
from training.config import ModelConfig
from training.fpn import FPN


def test_mnist_conv_has_the_papers_parameter_count() -> None:
    assert FPN(ModelConfig(arch="mnist_conv")).num_parameters() == 84_182


def test_unknown_architecture_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="available: .*mnist_conv"):
        build_parts(ModelConfig(arch="resnet9000"))
    assert "mnist_conv" in available()


@pytest.mark.parametrize("gamma", [0.5, 0.99])
def test_contraction_holds_after_aggressive_optimiser_steps(gamma: float) -> None:
    """Push the raw weight far outside the unit ball; T must stay gamma-Lipschitz in u."""
    torch.manual_seed(0)
    model = FPN(ModelConfig(gamma=gamma))
    opt = torch.optim.SGD(model.T.parameters(), lr=10.0)
    for _ in range(5):
        u = torch.randn(64, 46)
        z = torch.randn(64, 46)
        loss = -model.T(u, z).norm()  # grows the weight without bound
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.linalg.matrix_norm(model.T.linear.raw, ord=2) > 2.0  # the raw weight really grew
    with torch.no_grad():
        u1, u2, z = torch.randn(3, 4096, 46).unbind(0)
        lhs = (model.T(u1, z) - model.T(u2, z)).norm(dim=1)
        rhs = gamma * (u1 - u2).norm(dim=1)
        assert bool((lhs <= rhs * (1 + 1e-5)).all())
    assert model.T.lipschitz_bound() <= gamma * (1 + 1e-6)


def test_gamma_outside_unit_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="gamma"):
        FPN(ModelConfig(gamma=1.0))
