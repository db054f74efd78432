"""The paper's training settings (its appendix C) as ``fpn-train --preset NAME``; any flag overrides.

Every preset trains with Adam. The appendix gives the learning rate and its schedule, the loss, the
forward tolerance and iteration cap per dataset; it does not give epochs or batch sizes, so those
keep ``fpn-train``'s defaults unless a preset's note says otherwise.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # C.1: two convolutions, ReLU latent; eps 1e-6 or 100 iterations; lr 1e-5, x0.98 every 10 epochs; MSE
    "mnist": {
        "dataset": "mnist",
        "arch": "mnist_conv",
        "lr": 1e-5,
        "lr_schedule": "step",
        "lr_step_epochs": 10,
        "lr_decay": 0.98,
        "loss": "mse",
        "tol": 1e-6,
        "max_iter": 100,
    },
    # C.2: two convolutions, leaky-ReLU latent; eps 1e-4 or 100 iterations; lr 1e-3, cosine; cross entropy
    "svhn": {
        "dataset": "svhn",
        "arch": "svhn_conv",
        "lr": 1e-3,
        "lr_schedule": "cosine",
        "loss": "ce",
        "tol": 1e-4,
        "max_iter": 100,
    },
    # C.3, unaugmented: three convolutions; eps 1e-3 or 2000 iterations; lr 5e-4, cosine; cross entropy
    "cifar10": {
        "dataset": "cifar10",
        "arch": "cifar10_conv",
        "lr": 5e-4,
        "lr_schedule": "cosine",
        "loss": "ce",
        "tol": 1e-3,
        "max_iter": 2000,
    },
}
# C.1 with the fully connected model of Table 1
PRESETS["mnist-fc"] = {**PRESETS["mnist"], "arch": "mnist_fc"}
# C.3, augmented: ResNet-56 Q into a 45-dim latent; random crop (4-pixel padding) and flip
PRESETS["cifar10-augmented"] = {
    **PRESETS["cifar10"],
    "arch": "cifar10_resnet",
    "augment_shift": 4,
    "augment_flip": True,
}


def describe() -> str:
    """One line per preset, for ``--help``."""
    lines = []
    for name, values in PRESETS.items():
        lines.append(f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    return "; ".join(lines)
