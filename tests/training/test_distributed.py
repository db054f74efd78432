"""Data-parallel pieces that hold in one process (the torchrun tests in test_cli.py run two)."""

from __future__ import annotations

import copy

import torch

from training.config import ModelConfig
from training.distributed import GlobalBatchNorm, World, param_divergence, use_global_batchnorm
from training.fpn import FPN


def test_global_batchnorm_keeps_the_parameters_buffers_and_outputs_of_the_model() -> None:
    torch.manual_seed(0)
    model = FPN(ModelConfig(arch="cifar10_resnet", latent_dim=45, in_channels=3))
    plain = copy.deepcopy(model)
    params = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    assert use_global_batchnorm(model) == 57  # every BatchNorm of the ResNet-56 trunk
    assert not any(type(m) is torch.nn.BatchNorm2d for m in model.modules())
    assert sum(isinstance(m, GlobalBatchNorm) for m in model.modules()) == 57
    assert [id(p) for p in model.parameters()] == params  # an optimiser built before still applies
    assert list(model.state_dict()) == keys  # checkpoints load into a plain model
    x = torch.randn(4, 3, 32, 32)
    for train in (True, False):  # one process: plain BatchNorm, running statistics included
        model.train(train)
        plain.train(train)
        torch.testing.assert_close(model.Q(x), plain.Q(x), rtol=0, atol=0)
    for name, buffer in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], buffer), name
    assert param_divergence(model, World()) == 0.0
